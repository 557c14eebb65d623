"""Timing on the GPU with dispatch amortised: many back-to-back calls, one sync."""

from __future__ import annotations

import statistics

from pallas_kernels import autotune

CALLS, REPEATS = 30, 5


def time_ms(fn, *args, calls: int = CALLS, repeats: int = REPEATS) -> float:
  """Median over `repeats` of the mean time of `calls` back-to-back calls, in ms
  (`pallas_kernels.autotune.time_ms`: the host dispatches `calls` calls, waits once)."""
  return autotune.time_ms(fn, args, calls=calls, repeats=repeats)


def interleaved_ms(fns: dict, rounds: int = 5, calls: int = 40, repeats: int = 3) -> dict:
  """{name: median ms} for fns = {name: (fn, args)}, timed in interleaved rounds.

  Each round times every function in turn (`time_ms`, which warms it up first, so
  compilation happens in the first round, untimed), so all of them see the same
  clock and power state; one function's run-to-run drift (the dense anchor alone
  read 675-795 TF/s across runs on one H100) does not bias the ratios. Round r
  starts at the r-th function (a rotation), because a function reads a few
  percent slower right after heavy ones (the same tgmm kernel read 2-4 % lower
  third in a round than second).
  """
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, args = fns[name]
      times[name].append(time_ms(fn, *args, calls=calls, repeats=repeats))
  return {name: statistics.median(t) for name, t in times.items()}
