"""How close issue 3's targets are to the H100's memory roofline.

A grouped GEMM pass must at least read its two operands and write its result
once: bytes = 2 * (M*K + G*K*N + M*N) for bf16, the same for fwd, dgrad and
wgrad, and three times that for fwd+bwd. The G*K*N weights (or weight
gradients) dominate once G is large. The pass then takes at least

    floor = max(FLOPs / dense matmul rate, bytes / HBM bandwidth)

and its best possible ratio to the dense matmul (the issue's measure) is
(FLOPs / dense rate) / floor. This script measures the HBM bandwidth on the GPU
(a copy, `a + 1` on a 2 GiB bf16 array: read and write, like the kernels), takes
the dense rates and the kernels' TF/s from a grouped_gemm.py results file, and
writes one record per shape and pass: bytes, the floor, the attainable and the
measured ratios to dense, and the target.

    PYTHONPATH=. python benchmarks/roofline.py --out benchmarks/results/roofline.json
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks import timing
from benchmarks.shapes import flops

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Issue 3's targets, as ratios to dense: (at G=8, at G >= 64).
TARGETS = {"fwd": (0.90, 0.75), "fwd+bwd": (0.80, 0.65)}


def _gemms(pass_: str) -> int:
  """GEMMs in a pass: fwd+bwd is fwd, dgrad and wgrad."""
  return 3 if pass_ == "fwd+bwd" else 1


def min_bytes(m: int, k: int, n: int, g: int, pass_: str, itemsize: int = 2) -> int:
  """Bytes a pass moves if it reads each operand and writes its result once."""
  return itemsize * (m * k + g * k * n + m * n) * _gemms(pass_)


def _compute_and_memory_s(m, k, n, g, pass_, dense_tflops: float, hbm_gbps: float):
  """(its FLOPs at the dense rate, its bytes at the HBM bandwidth) in seconds."""
  return (flops(m, k, n, _gemms(pass_)) / (dense_tflops * 1e12),
          min_bytes(m, k, n, g, pass_) / (hbm_gbps * 1e9))


def attainable_ratio(m, k, n, g, pass_, dense_tflops: float, hbm_gbps: float) -> float:
  """The best ratio to dense a pass can reach: compute at the dense rate, its
  bytes at the HBM bandwidth, perfectly overlapped."""
  compute_s, memory_s = _compute_and_memory_s(m, k, n, g, pass_, dense_tflops, hbm_gbps)
  return compute_s / max(compute_s, memory_s)


def measure_hbm_gbps(gib: float = 2.0) -> float:
  """Copy bandwidth (bytes read + written per second / 1e9) of a bf16 array."""
  import jax
  import jax.numpy as jnp
  size = int(gib * 2**30) // 2
  a = jax.random.normal(jax.random.key(0), (size // 4096, 4096), jnp.bfloat16)
  ms = timing.time_ms(jax.jit(lambda x: x + 1), a, calls=20, repeats=5)
  return 2 * a.nbytes / (ms * 1e-3) / 1e9


def records(gemm: dict, hbm_gbps: float) -> list[dict]:
  """One record per (shape, pass) of a grouped_gemm.py results file."""
  tf = {(r["M"], r["K"], r["N"], r["G"], r["pass"], r["impl"]): r["tflops"]
        for r in gemm["records"] if r.get("tflops")}
  out = []
  for (m, k, n, g, pass_, impl), ours in tf.items():
    if impl != "jaxmoe":
      continue
    # The dense anchor is timed for fwd and fwd+bwd; dgrad and wgrad use fwd's.
    dense = tf.get((m, k, n, g, "fwd+bwd" if pass_ == "fwd+bwd" else "fwd", "dense"))
    if dense is None:
      continue
    target = TARGETS.get(pass_, (None, None))[0 if g <= 8 else 1]
    floor_s = max(_compute_and_memory_s(m, k, n, g, pass_, dense, hbm_gbps))
    out.append(dict(
        M=m, K=k, N=n, G=g, pass_=pass_, bytes=min_bytes(m, k, n, g, pass_),
        floor_ms=round(floor_s * 1e3, 4),
        attainable_vs_dense=round(attainable_ratio(m, k, n, g, pass_, dense, hbm_gbps), 3),
        measured_vs_dense=round(ours / dense, 3), target_vs_dense=target))
  return out


def format_table(recs: list[dict], hbm_gbps: float) -> str:
  lines = [f"HBM copy bandwidth {hbm_gbps:.0f} GB/s",
           f"{'M,K,N,G':24s} {'pass':8s} {'GiB':>6s} {'floor ms':>9s} {'attainable':>10s} "
           f"{'measured':>9s} {'target':>7s}"]
  for r in recs:
    shape = ",".join(str(r[x]) for x in "MKNG")
    target = f"{r['target_vs_dense']:.2f}" if r["target_vs_dense"] else "-"
    lines.append(f"{shape:24s} {r['pass_']:8s} {r['bytes'] / 2**30:6.2f} {r['floor_ms']:9.3f} "
                 f"{r['attainable_vs_dense']:10.2f} {r['measured_vs_dense']:9.2f} {target:>7s}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gemm-results", default=os.path.join(RESULTS, "grouped_gemm.json"))
  parser.add_argument("--hbm-gbps", type=float, default=None,
                      help="skip the measurement (no GPU needed)")
  parser.add_argument("--hbm-source", default=None,
                      help="with --hbm-gbps: where that bandwidth was measured (recorded)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  import jax
  hbm = args.hbm_gbps or measure_hbm_gbps()
  with open(args.gemm_results) as f:
    gemm = json.load(f)
  recs = records(gemm, hbm)
  measured = args.hbm_gbps is None
  result = dict(jax=jax.__version__, hbm_gbps=round(hbm, 1),
                hbm_source=(f"measured here on {jax.devices()[0].device_kind}" if measured
                            else args.hbm_source or "given with --hbm-gbps"),
                gemm_results=os.path.basename(args.gemm_results),
                gemm_card=gemm.get("card"), records=recs)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(format_table(recs, hbm))


if __name__ == "__main__":
  main()
