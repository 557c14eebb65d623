"""A dependency-free one-line progress bar for training loops."""

from __future__ import annotations

import sys
import time


class ProgressBar:
  """Redraws `[#####.....] step/total  key=value ...` on one terminal line.

  On a non-terminal stream (CI logs) it prints a line every `log_every` steps
  instead of redrawing.
  """

  def __init__(self, total: int, *, width: int = 30, stream=None,
               log_every: int = 25):
    self.total = total
    self.width = width
    self.stream = sys.stderr if stream is None else stream
    self.log_every = log_every
    self.start = time.perf_counter()
    self._interactive = getattr(self.stream, "isatty", lambda: False)()

  def update(self, step: int, **metrics) -> None:
    done = int(self.width * step / max(self.total, 1))
    text = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
    elapsed = time.perf_counter() - self.start
    line = (f"[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} "
            f"{elapsed:5.1f}s {text}")
    if self._interactive:
      self.stream.write("\r" + line)
    elif step % self.log_every == 0 or step == self.total:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self._interactive:
      self.stream.write("\n")
      self.stream.flush()


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
  return str(value)
