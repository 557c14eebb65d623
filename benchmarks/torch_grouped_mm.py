"""torch._grouped_mm anchor for benchmarks/grouped_gemm.py (run in its own process).

Prints one JSON record per line: {"M","K","N","G","pass","impl","tflops"} for
impl "torch_grouped_mm" and "torch_dense" (x @ w[0], cuBLAS, the same FLOPs): the
two are timed in 5 interleaved rounds, so that the ratio torch_grouped_mm /
torch_dense can be set against jaxmoe / dense of the JAX process, whatever state
the card was in for each process. Timing: CUDA events around 30 back-to-back
calls after a warm-up, median of 3 per round, median over the rounds.

    python benchmarks/torch_grouped_mm.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES, flops, random_group_sizes  # noqa: E402

CALLS, REPEATS, ROUNDS = 30, 3, 5


def _time_ms(fn) -> float:
  for _ in range(3):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(REPEATS):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CALLS):
      fn()
    stop.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(stop) / CALLS)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="first two shapes only")
  args = parser.parse_args()
  dev = "cuda"
  for m, k, n, g in SHAPES[:2] if args.quick else SHAPES:
    sizes = random_group_sizes(m, g)
    offs = torch.tensor(sizes.cumsum(), dtype=torch.int32, device=dev)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(g, k, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    w0 = w[0].detach().clone().requires_grad_(True)
    grouped = lambda: torch._grouped_mm(x, w, offs=offs)  # noqa: E731
    dense = lambda: x @ w0  # noqa: E731

    def fwd(mm):
      def run():
        with torch.no_grad():
          return mm()
      return run

    def fwd_bwd(mm):
      def run():
        x.grad = w.grad = w0.grad = None
        mm().backward(dy)
      return run

    for name, make, passes in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
      fns = {"torch_grouped_mm": make(grouped), "torch_dense": make(dense)}
      times = {impl: [] for impl in fns}
      try:
        for _ in range(ROUNDS):
          for impl, fn in fns.items():
            times[impl].append(_time_ms(fn))
      except Exception as e:  # noqa: BLE001 -- report and go on
        print(f"# torch {name} {(m, k, n, g)} failed: {e!r}", file=sys.stderr)
        continue
      for impl, ts in times.items():
        tflops = flops(m, k, n, passes) / statistics.median(ts) / 1e9
        print(json.dumps({"M": m, "K": k, "N": n, "G": g, "pass": name,
                          "impl": impl, "tflops": round(tflops, 1)}), flush=True)
    del x, w, w0, dy
    torch.cuda.empty_cache()


if __name__ == "__main__":
  main()
