"""Grouped GEMM benchmark: our Mosaic GPU kernels against dense matmul and grouped GEMMs.

Anchors: a dense matmul of the same FLOPs, `jax.lax.ragged_dot`, JAX's
`ragged_dot_mgpu` (a small config sweep, only up to G=64: it unrolls a loop over
the groups) and `torch._grouped_mm` (benchmarks/torch_grouped_mm.py, run in its
own process when torch is importable).

Passes: fwd (gmm), dgrad (gmm(dy, w, transpose_rhs=True)), wgrad (tgmm(x, dy)),
fwd+bwd (the three back to back in one jit; for the anchors `jax.vjp` with a
random cotangent). TFLOP/s count 2*M*K*N per pass (3x for fwd+bwd).

Timing: each function is jitted; after a warm-up, 40 calls are dispatched back to
back and the host waits once (dispatch overlaps the GPU), median of 3 such
runs; all functions of a shape are timed in turn, in 5 interleaved rounds
(`timing.interleaved_ms`), and each gets its median over the rounds, so that the
GPU's clock and power state drift alike for all of them. Our kernels run their
default configs (`config.gmm_config` / `tgmm_config`: the tuning cache, else the
heuristic; `python -m pallas_kernels.autotune` makes the cache); ragged_dot_mgpu's
config is picked by a short sweep first, timed one after another.
Inputs are random normal bf16 (never zeros), group sizes random (shapes.py).

    PYTHONPATH=. python benchmarks/grouped_gemm.py [--quick] [--no-torch] [--fp8]

Writes benchmarks/results/grouped_gemm.json (format in docs/performance.md) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES, flops, random_group_sizes  # noqa: E402
from timing import interleaved_ms, time_ms  # noqa: E402

from pallas_kernels import config as config_lib  # noqa: E402
from pallas_kernels import quantize  # noqa: E402
from pallas_kernels.gmm_fp8_mgpu import gmm_fp8_mgpu  # noqa: E402
from pallas_kernels.gmm_mgpu import gmm_mgpu  # noqa: E402
from pallas_kernels.tgmm_mgpu import tgmm_mgpu  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "grouped_gemm.json")
# (block_m, block_n, block_k, max_concurrent_steps, grid_block_n) for ragged_dot_mgpu.
RAGGED_MGPU_CONFIGS = ((128, 128, 64, 4, 1), (128, 128, 64, 4, 4), (64, 128, 64, 5, 4),
                       (128, 64, 64, 5, 4), (192, 128, 64, 3, 4))
def _tflops(m, k, n, passes, ms):
  return round(flops(m, k, n, passes) / ms / 1e9, 1)


def jaxmoe_entries(x, w, gs, dy):
  """Our kernels' entries with their default configs: fwd, dgrad, wgrad, fwd+bwd."""
  fwd = jax.jit(gmm_mgpu)
  dgrad = jax.jit(functools.partial(gmm_mgpu, transpose_rhs=True))
  wgrad = jax.jit(tgmm_mgpu)

  @jax.jit
  def fwd_bwd(x, w, gs, dy):
    return gmm_mgpu(x, w, gs), gmm_mgpu(dy, w, gs, transpose_rhs=True), tgmm_mgpu(x, dy, gs)

  return [_entry("fwd", "jaxmoe", fwd, (x, w, gs), 1),
          _entry("dgrad", "jaxmoe", dgrad, (dy, w, gs), 1),
          _entry("wgrad", "jaxmoe", wgrad, (x, dy, gs), 1),
          _entry("fwd+bwd", "jaxmoe", fwd_bwd, (x, w, gs, dy), 3)]


def fp8_entries(x, w, gs, dy):
  """FP8 entries (blockwise recipe, `quantize.py`): our FP8 kernel on operands
  quantised beforehand (fwd, dgrad) with its default config and the variants of
  FP8_VARIANTS, fwd with x's quantisation included ("fwd+quant"), and XLA's dense
  e4m3 dot."""
  xq, dyq, wq = quantize.quantize_rows(x), quantize.quantize_rows(dy), quantize.quantize_blocks(w)
  (m, k), n, g = x.shape, w.shape[2], w.shape[0]
  fwd_args = (xq.values, xq.scales, wq.values_t, wq.scales, gs)
  dgrad_args = (dyq.values, dyq.scales, wq.values, jnp.swapaxes(wq.scales, 1, 2), gs)
  entries = []
  for impl, fields in FP8_VARIANTS.items():
    cfg = config_lib.fp8_gmm_config(m, k, n, g, **fields) if fields else None
    fn = jax.jit(lambda v, s, wv, wsc, gs, cfg=cfg: gmm_fp8_mgpu(v, s, wv, wsc, gs, config=cfg))
    entries += [_entry("fwd", impl, fn, fwd_args, 1, cfg),
                _entry("dgrad", impl, fn, dgrad_args, 1, cfg)]

  @jax.jit
  def fwd_quant(x, wv, wsc, gs):
    q = quantize.quantize_rows(x)
    return gmm_fp8_mgpu(q.values, q.scales, wv, wsc, gs)

  x8, w8 = x.astype(jnp.float8_e4m3fn), w[0].astype(jnp.float8_e4m3fn)
  dense_fp8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.bfloat16))
  return entries + [
      _entry("fwd+quant", "jaxmoe_fp8", fwd_quant, (x, wq.values_t, wq.scales, gs), 1),
      _entry("fwd", "dense_fp8_xla", dense_fp8, (x8, w8), 1)]


# Our FP8 kernel's configs, as fp8_gmm_config arguments ({} = its default: chained
# items, the consumers one above the other on 128 x 128 items where the mean expert
# has 512 rows or more, else side by side on 64 x 256): each choice forced either
# way, and one warpgroup on 64-row tiles (promotion="pairs") and on 128-row tiles.
FP8_VARIANTS = {
    "jaxmoe_fp8": {},
    "jaxmoe_fp8_unchained": dict(split_rows=False, chain_items=False),
    "jaxmoe_fp8_split": dict(split_rows=True, chain_items=False),
    "jaxmoe_fp8_chain": dict(split_rows=False, chain_items=True),
    "jaxmoe_fp8_split_chain": dict(split_rows=True, chain_items=True),
    "jaxmoe_fp8_pairs": dict(promotion="pairs"),
    "jaxmoe_fp8_serial": dict(block_m=128, num_compute_wgs=1),
}


def _entry(pass_, impl, fn, args, passes, config=None):
  """One timed function of a shape: its pass, implementation, fn(*args), pass count."""
  return dict(pass_=pass_, impl=impl, fn=fn, args=args, passes=passes,
              config=None if config is None else str(config))


def _vjp_fn(f):
  @jax.jit
  def fwd_bwd(x, w, gs, dy):
    y, pull = jax.vjp(lambda x, w: f(x, w, gs), x, w)
    return (y, *pull(dy))
  return fwd_bwd


def anchor_entries(x, w, gs, dy, m, k, n, g, log, dense_only=False):
  """The anchors' entries; ragged_dot_mgpu's config is picked by a short sweep."""
  w0 = w[0]
  dense = lambda x, w, gs: x @ w  # noqa: E731
  entries = [_entry("fwd", "dense", jax.jit(dense), (x, w0, gs), 1),
             _entry("fwd+bwd", "dense", _vjp_fn(dense), (x, w0, gs, dy), 3)]
  if dense_only:
    return entries
  if m * n * g <= 16384 * 4096 * 64:  # XLA's ragged_dot runs out of memory beyond.
    ragged = lambda x, w, gs: jax.lax.ragged_dot(x, w, gs)  # noqa: E731
    entries += [_entry("fwd", "ragged_dot", jax.jit(ragged), (x, w, gs), 1),
                _entry("fwd+bwd", "ragged_dot", _vjp_fn(ragged), (x, w, gs, dy), 3)]
  if g <= 64:  # ragged_dot_mgpu unrolls a loop over G.
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    best = None
    for bm, bn, bk, steps, gbn in RAGGED_MGPU_CONFIGS:
      if n % (bn * gbn):
        continue
      fn = jax.jit(lambda x, w, gs, bm=bm, bn=bn, bk=bk, steps=steps, gbn=gbn:
                   ragged_dot_mgpu.ragged_dot(
                       x, w, group_sizes=gs, block_m=bm, block_n=bn, block_k=bk,
                       max_concurrent_steps=steps, grid_block_n=gbn))
      try:
        ms = time_ms(fn, x, w, gs)
      except Exception as e:  # noqa: BLE001
        log(f"  ragged_dot_mgpu {(bm, bn, bk, steps, gbn)} failed: {str(e)[:120]}")
        continue
      if best is None or ms < best[0]:
        best = (ms, fn, (bm, bn, bk, steps, gbn))
    if best is not None:
      entries.append(_entry("fwd", "ragged_dot_mgpu", best[1], (x, w, gs), 1,
                            "block_m,block_n,block_k,max_concurrent_steps,grid_block_n="
                            + ",".join(map(str, best[2]))))
  return entries


def time_entries(entries, m, k, n) -> list[dict]:
  """Times all entries of one shape in interleaved rounds; one record each."""
  ms = interleaved_ms({i: (e["fn"], e["args"]) for i, e in enumerate(entries)})
  records = []
  for i, e in enumerate(entries):
    record = dict(pass_=e["pass_"], impl=e["impl"],
                  tflops=_tflops(m, k, n, e["passes"], ms[i]))
    if e["config"] is not None:
      record["config"] = e["config"]
    records.append(record)
  return records


def run_torch(quick: bool, log) -> list[dict]:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_grouped_mm.py")
  cmd = [os.environ.get("TORCH_PYTHON", sys.executable), script] + (["--quick"] if quick else [])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  except Exception as e:  # noqa: BLE001
    log(f"torch benchmark failed to start: {e!r}")
    return []
  if proc.returncode:
    log(f"torch benchmark failed: {proc.stderr[-1000:]}")
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def print_table(records) -> None:
  """TFLOP/s per shape and pass; "vs torch" is (jaxmoe / dense) over (torch_grouped_mm /
  torch_dense), each pair timed in the same rounds of its own process."""
  by = {(r["M"], r["K"], r["N"], r["G"], r["pass"], r["impl"]): r["tflops"] for r in records}
  impls = ("jaxmoe", "dense", "ragged_dot", "ragged_dot_mgpu", "torch_grouped_mm",
           "torch_dense", *FP8_VARIANTS, "dense_fp8_xla")
  print("\nTFLOP/s (ratio jaxmoe/dense; vs torch normalised by each process's dense)")
  print(f"{'M,K,N,G':>24} {'pass':>8} " + " ".join(f"{i.removeprefix('jaxmoe_')[:12]:>12}" for i in impls)
        + "  vs dense  vs torch")
  shapes = sorted({k[:4] for k in by}, key=lambda s: (s[3], s))
  for s in shapes:
    for p in ("fwd", "dgrad", "wgrad", "fwd+bwd", "fwd+quant"):
      row = [by.get((*s, p, i)) for i in impls]
      if all(v is None for v in row):
        continue
      ratio = (f"{row[0] / row[1]:.2f}" if row[0] and row[1] else "-")
      vs_torch = (f"{row[0] / row[1] / (row[4] / row[5]):.2f}" if all(row[i] for i in
                                                                    (0, 1, 4, 5)) else "-")
      print(f"{','.join(map(str, s)):>24} {p:>8} "
            + " ".join(f"{v if v is not None else '-':>12}" for v in row)
            + f"  {ratio:>8}  {vs_torch:>8}")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="first two shapes only")
  parser.add_argument("--shapes", default=None,
                      help="comma-separated indices into shapes.SHAPES (default: all)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--anchors", choices=("all", "dense", "none"), default="all")
  parser.add_argument("--fp8", action="store_true", help="add the FP8 rows (fp8_entries)")
  parser.add_argument("--log", default=None)
  parser.add_argument("--out", default=RESULTS, help="where the JSON goes")
  args = parser.parse_args()
  log_file = open(args.log, "a") if args.log else None

  def log(msg):
    print(msg, file=sys.stderr, flush=True)
    if log_file:
      print(msg, file=log_file, flush=True)

  records = []
  shapes = SHAPES[:2] if args.quick else SHAPES
  if args.shapes is not None:
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
  for m, k, n, g in shapes:
    keys = jax.random.split(jax.random.key(m + k + n + g), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (g, k, n), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    gs = jnp.asarray(random_group_sizes(m, g))
    entries = jaxmoe_entries(x, w, gs, dy)
    if args.anchors != "none":
      entries += anchor_entries(x, w, gs, dy, m, k, n, g, log, args.anchors == "dense")
    if args.fp8:
      entries += fp8_entries(x, w, gs, dy)
    recs = time_entries(entries, m, k, n)
    for r in recs:
      r = {"M": m, "K": k, "N": n, "G": g, "pass": r.pop("pass_"), **r}
      log(json.dumps(r))
      records.append(r)
    del x, w, dy, entries
  if not args.no_torch:
    records += run_torch(args.quick, log)
  device = jax.devices()[0]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"card": device.device_kind, "jax": jax.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "command": " ".join(["python"] + sys.argv), "records": records}, f,
              indent=1)
  print_table(records)


if __name__ == "__main__":
  main()
