"""torch._grouped_mm anchor for benchmarks/grouped_gemm.py (run in its own process).

Prints one JSON record per line: {"M","K","N","G","pass","impl":"torch_grouped_mm","tflops"}.
Timing: CUDA events around 30 back-to-back calls after a warm-up, median of 5.

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

CALLS, REPEATS = 30, 5


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

    def fwd():
      with torch.no_grad():
        return torch._grouped_mm(x, w, offs=offs)

    def fwd_bwd():
      x.grad = w.grad = None
      y = torch._grouped_mm(x, w, offs=offs)
      y.backward(dy)

    for name, fn, passes in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
      try:
        ms = _time_ms(fn)
        tflops = flops(m, k, n, passes) / ms / 1e9
      except Exception as e:  # noqa: BLE001 -- report and go on
        print(f"# torch {name} {(m, k, n, g)} failed: {e!r}", file=sys.stderr)
        continue
      print(json.dumps({"M": m, "K": k, "N": n, "G": g, "pass": name,
                        "impl": "torch_grouped_mm", "tflops": round(tflops, 1)}),
            flush=True)
    del x, w, dy
    torch.cuda.empty_cache()


if __name__ == "__main__":
  main()
