"""Where a traced step's time went: the busiest ops on each stream of a profiler trace.

    with jax.profiler.trace(trace_dir):
      ...
    print(profile_report.summary(trace_dir))
"""

from __future__ import annotations

import collections
import glob
import os

import jax


def latest_xspace(trace_dir: str) -> str:
  """The newest `*.xplane.pb` that `jax.profiler.trace(trace_dir)` wrote."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise ValueError(f"No *.xplane.pb under {trace_dir!r}; was it a jax.profiler.trace dir?")
  return max(paths, key=os.path.getmtime)


def busiest_events(trace_dir: str, top: int = 12) -> dict[str, list[tuple[str, int, float]]]:
  """{"plane / line": [(event name, count, total ms)], busiest first} for every line
  of the device planes and of the host planes other than the Python tracer's."""
  data = jax.profiler.ProfileData.from_file(latest_xspace(trace_dir))
  report = {}
  for plane in data.planes:
    if plane.name in ("/host:metadata", "Task Environment"):
      continue
    for line in plane.lines:
      if plane.name == "/host:CPU" and line.name == "python":
        continue
      totals = collections.defaultdict(lambda: [0, 0.0])
      for event in line.events:
        totals[event.name][0] += 1
        totals[event.name][1] += event.duration_ns / 1e6
      busiest = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
      if busiest:
        report[f"{plane.name} / {line.name}"] = [(n, c, ms) for n, (c, ms) in busiest]
  return report


def summary(trace_dir: str, top: int = 12) -> str:
  """`busiest_events` as text, one block per line, names cut to 90 characters."""
  blocks = []
  for where, events in busiest_events(trace_dir, top).items():
    rows = [f"  {ms:10.3f} ms {count:6d}x  {name[:90]}" for name, count, ms in events]
    blocks.append("\n".join([where, *rows]))
  return "\n".join(blocks)
