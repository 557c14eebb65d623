"""Where the grouped GEMM kernels spend their time: Mosaic GPU profiler timelines.

Runs a pass's kernel (default config) once with the Mosaic GPU profiler on (each
consumer warpgroup records the entry and exit times of the kernels'
`jax.named_scope` regions, "mainloop" and "epilogue" of each work item) and
summarises the trace: for each warpgroup, the share of its recorded time span
spent in each region, averaged over the SMs, and the mean length of one
occurrence in thousands of SM clock cycles (the profiler reads %clock). The
profiler keeps its events in shared memory, which the kernels nearly fill:
PROFILE_SPACE regions per warpgroup fit, and later ones are dropped, so a summary
covers each SM's first PROFILE_SPACE / 2 items.

    PYTHONPATH=. python benchmarks/profile_kernels.py --passes fwd,wgrad --shapes 2,3 \
        --out profile.json [--trace-dir DIR]       # on an H100

The Perfetto traces stay in --trace-dir (default: a temporary directory) for
https://ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import json
import os
import statistics
import tempfile

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.config_ab import add_selection_args, pass_setup, run_header, selected_inputs

# Regions recorded per warpgroup: 16 bytes each, times 3 warpgroups, must fit in
# the ~3 KiB of shared memory the 4-slot configs leave.
PROFILE_SPACE = 60


@contextlib.contextmanager
def profiling(trace_dir: str):
  """Kernels built inside get the Mosaic GPU profiler, writing traces to trace_dir."""
  original = plgpu.CompilerParams
  plgpu.CompilerParams = functools.partial(
      original, profile_space=PROFILE_SPACE, profile_dir=trace_dir,
      profile_bounds_check=True)
  try:
    yield
  finally:
    plgpu.CompilerParams = original


def summarise(trace: dict, warpgroups: int) -> dict:
  """{role: {region: {"share": mean fraction of the span, "mean_kcycles": per
  occurrence, "count": per SM}}} from a trace's B/E events; role = "wg<i>" (i-th
  warpgroup).

  tid numbers one warpgroup of one block; i = (tid - 1) % warpgroups. The trace's
  ts is (globaltimer ns at the block's start + SM clock cycles) / 1000, so the
  differences within a warpgroup are thousands of cycles.
  """
  by_tid = collections.defaultdict(list)
  for event in trace["traceEvents"]:
    by_tid[event["tid"]].append(event)
  shares = collections.defaultdict(lambda: collections.defaultdict(list))
  lengths = collections.defaultdict(lambda: collections.defaultdict(list))
  counts = collections.defaultdict(lambda: collections.defaultdict(list))
  for tid, events in by_tid.items():
    role = f"wg{(tid - 1) % warpgroups}"
    span = events[-1]["ts"] - events[0]["ts"]
    open_at, total, count = {}, collections.Counter(), collections.Counter()
    for event in events:
      name = event["name"]
      if event["ph"] == "B":
        open_at[name] = event["ts"]
      elif name in open_at:
        duration = event["ts"] - open_at.pop(name)
        total[name] += duration
        count[name] += 1
        lengths[role][name].append(duration)
    for name in total:
      shares[role][name].append(total[name] / span if span else 0.0)
      counts[role][name].append(count[name])
  return {role: {name: dict(share=statistics.mean(shares[role][name]),
                            mean_kcycles=statistics.mean(lengths[role][name]),
                            count=statistics.mean(counts[role][name]))
                 for name in sorted(shares[role])}
          for role in sorted(shares)}


def profile_pass(pass_, x, w, dy, gs, trace_dir: str) -> tuple[dict, str]:
  """(summary, config) of one profiled run of a pass's kernel (after a warm-up run)."""
  cfg, make, args = pass_setup(pass_, x, w, dy, gs)
  os.makedirs(trace_dir, exist_ok=True)
  traces = os.path.join(trace_dir, "*-trace.json")
  with profiling(trace_dir):
    fn = make(cfg)
    for _ in range(2):  # The warm-up's trace is removed: each call writes the same file.
      for path in glob.glob(traces):
        os.remove(path)
      jax.block_until_ready(fn(*args))
      jax.effects_barrier()  # the trace is written by a host callback
  (path,) = glob.glob(traces)
  warp_specialized = getattr(cfg, "warp_specialized", cfg.num_compute_wgs > 1)
  warpgroups = cfg.num_compute_wgs + 1 if warp_specialized else 1
  with open(path) as f:
    return summarise(json.load(f), warpgroups), str(cfg)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_selection_args(parser, passes="fwd,wgrad")
  parser.add_argument("--trace-dir", default=None)
  args = parser.parse_args()
  trace_root = args.trace_dir or tempfile.mkdtemp(prefix="jaxmoe-profile-")
  result = run_header()
  for passes, shape, x, w, dy, gs in selected_inputs(parser, args):
    for pass_ in passes:
      trace_dir = os.path.join(trace_root, f"{'_'.join(map(str, shape))}_{pass_}")
      summary, config = profile_pass(pass_, x, w, dy, gs, trace_dir)
      result["records"].append(dict(shape=list(shape), pass_=pass_, config=config,
                                    regions=summary, trace_dir=trace_dir))
      print(f"{shape} {pass_}")
      for role, regions in summary.items():
        print(f"  {role}: " + "  ".join(
            f"{name} {r['share']:.0%} ({r['mean_kcycles']:.2f} kcycles x {r['count']:.0f})"
            for name, r in regions.items()), flush=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
