"""How close the grouped GEMM targets are to the H100's memory roofline.

A grouped GEMM pass must at least read its two operands and write its result
once: bytes = 2 * (M*K + G*K*N + M*N) for bf16, the same for fwd, dgrad and
wgrad, and three times that for fwd+bwd. The G*K*N weights (or weight
gradients) dominate once G is large. The pass then takes at least

    floor = max(FLOPs / dense matmul rate, bytes / HBM bandwidth)

and its best possible ratio to the dense matmul (the issue's measure) is
(FLOPs / dense rate) / floor.

The kernels also compute rows they do not keep: a gmm work item is a whole
128-row tile from its group's first row, so a group of s rows costs cdiv(s, 128)
tiles (`metadata.gmm_metadata`), and tgmm steps over 64-row blocks the same way.
The tile efficiency (useful rows / computed rows, at the benchmark's group
sizes) caps a pass whose MMAs set its pace at that share of the dense rate;
`attainable_with_tiles` takes it into account:
(FLOPs / dense rate) / max(FLOPs / dense rate / efficiency, bytes / bandwidth).

This script measures the HBM bandwidth on the GPU
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

import numpy as np

from benchmarks import timing
from benchmarks.config_ab import default_config
from benchmarks.shapes import flops, random_group_sizes
from pallas_kernels import metadata as metadata_lib

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


def attainable_ratio(m, k, n, g, pass_, dense_tflops: float, hbm_gbps: float,
                     efficiency: float = 1.0) -> float:
  """The best ratio to dense a pass can reach: compute at the dense rate (of
  which `efficiency` is useful work), its bytes at the HBM bandwidth, perfectly
  overlapped."""
  compute_s, memory_s = _compute_and_memory_s(m, k, n, g, pass_, dense_tflops, hbm_gbps)
  return compute_s / max(compute_s / efficiency, memory_s)


def gmm_tile_efficiency(group_sizes, m: int, tile_rows: int) -> float:
  """Rows of the groups / rows the gmm kernel's compute items multiply."""
  meta = metadata_lib.gmm_metadata(np.asarray(group_sizes, np.int32), m, tile_rows)
  return float(np.sum(group_sizes)) / (int(meta.counts[0]) * tile_rows)


def tgmm_tile_efficiency(group_sizes, m: int, block_rows: int) -> float:
  """Rows of the groups / rows of the row blocks the tgmm kernel steps over."""
  meta = metadata_lib.tgmm_metadata(np.asarray(group_sizes, np.int32), m, block_rows)
  return float(np.sum(group_sizes)) / (int(np.sum(meta.num_blocks)) * block_rows)


def tile_efficiency(m: int, k: int, n: int, g: int, pass_: str) -> float:
  """Useful share of the MMA work of a pass's default kernels at the benchmark's
  group sizes (`shapes.random_group_sizes`); fwd+bwd weighs its three GEMMs by
  time (equal FLOPs each)."""
  sizes = random_group_sizes(m, g)
  per_pass = {
      p: gmm_tile_efficiency(sizes, m, default_config(p, m, k, n, g).cta_tile_rows)
      for p in ("fwd", "dgrad")}
  per_pass["wgrad"] = tgmm_tile_efficiency(sizes, m, default_config("wgrad", m, k, n, g).block_m)
  if pass_ == "fwd+bwd":
    return 3 / sum(1 / e for e in per_pass.values())
  return per_pass[pass_]


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
    efficiency = tile_efficiency(m, k, n, g, pass_)
    out.append(dict(
        M=m, K=k, N=n, G=g, pass_=pass_, bytes=min_bytes(m, k, n, g, pass_),
        floor_ms=round(floor_s * 1e3, 4),
        attainable_vs_dense=round(attainable_ratio(m, k, n, g, pass_, dense, hbm_gbps), 3),
        tile_efficiency=round(efficiency, 3),
        attainable_with_tiles=round(
            attainable_ratio(m, k, n, g, pass_, dense, hbm_gbps, efficiency), 3),
        measured_vs_dense=round(ours / dense, 3), target_vs_dense=target))
  return out


def format_table(recs: list[dict], hbm_gbps: float) -> str:
  lines = [f"HBM copy bandwidth {hbm_gbps:.0f} GB/s",
           f"{'M,K,N,G':24s} {'pass':8s} {'GiB':>6s} {'floor ms':>9s} {'attainable':>10s} "
           f"{'tile eff':>8s} {'w/ tiles':>8s} {'measured':>9s} {'target':>7s}"]
  for r in recs:
    shape = ",".join(str(r[x]) for x in "MKNG")
    target = f"{r['target_vs_dense']:.2f}" if r["target_vs_dense"] else "-"
    lines.append(f"{shape:24s} {r['pass_']:8s} {r['bytes'] / 2**30:6.2f} {r['floor_ms']:9.3f} "
                 f"{r['attainable_vs_dense']:10.2f} {r['tile_efficiency']:8.2f} "
                 f"{r['attainable_with_tiles']:8.2f} {r['measured_vs_dense']:9.2f} {target:>7s}")
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
