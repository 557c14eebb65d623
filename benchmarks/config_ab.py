"""Same-process A/B of kernel config variants at the benchmark shapes (on an H100).

Each variant is the default config of a pass (`config.gmm_config` / `tgmm_config`
for the shape) with some fields replaced; all variants of a shape and pass, and
a dense matmul of the same FLOPs, are timed in interleaved rounds
(`timing.interleaved_ms`). Each variant's output is first compared with the
default's (max |difference|; the same math in the same order gives 0).

    PYTHONPATH=. python benchmarks/config_ab.py --passes fwd,dgrad \
        --variant cl2:cluster_n=2 --variant cl2_gbn4:cluster_n=2,grid_block_n=4 \
        --out ab.json [--shapes 0,2]

A variant that does not apply to a pass's default config (a field that config
lacks, or a value it rejects) is skipped there, with a line saying why. A variant
with no fields (`--variant same:`) times a second copy of the default: how far
it reads from 1.000 is the noise of the comparison (±2 % on an H100).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import shapes, timing
from pallas_kernels import config as config_lib
from pallas_kernels.gmm_mgpu import gmm_mgpu
from pallas_kernels.tgmm_mgpu import tgmm_mgpu

PASSES = ("fwd", "dgrad", "wgrad")


def parse_variant(text: str) -> tuple[str, dict]:
  """'name:field=value,field=value' -> (name, {field: value}); values are Python literals."""
  name, sep, fields = text.partition(":")
  if not sep or not name:
    raise ValueError(f"--variant {text!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE...].")
  overrides = {}
  for item in filter(None, fields.split(",")):
    field, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--variant {text!r}: {item!r} is not FIELD=VALUE.")
    try:
      overrides[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise ValueError(f"--variant {text!r}: {value!r} is not a Python literal.") from None
  return name, overrides


def add_selection_args(parser: argparse.ArgumentParser, passes: str) -> None:
  parser.add_argument("--passes", default=passes, help=f"some of {','.join(PASSES)}")
  parser.add_argument("--shapes", default=None, help="indices into shapes.SHAPES")
  parser.add_argument("--out", required=True)


def selected_inputs(parser: argparse.ArgumentParser, args):
  """Yields (pass names, shape, x, w, dy, group sizes) for each selected shape:
  random bf16 operands x [M, K], w [G, K, N], dy [M, N] and random group sizes."""
  passes = args.passes.split(",")
  if bad := set(passes) - set(PASSES):
    parser.error(f"unknown passes {sorted(bad)}; expected some of {PASSES}")
  indices = (range(len(shapes.SHAPES)) if args.shapes is None
             else [int(i) for i in args.shapes.split(",")])
  for i in indices:
    m, k, n, g = shape = shapes.SHAPES[i]
    keys = jax.random.split(jax.random.key(i), 3)
    yield (passes, shape, jax.random.normal(keys[0], (m, k), jnp.bfloat16),
           jax.random.normal(keys[1], (g, k, n), jnp.bfloat16),
           jax.random.normal(keys[2], (m, n), jnp.bfloat16),
           jnp.asarray(shapes.random_group_sizes(m, g)))


def run_header() -> dict:
  return {"card": jax.devices()[0].device_kind, "jax": jax.__version__,
          "command": " ".join(["python"] + sys.argv), "records": []}


def default_config(pass_: str, m: int, k: int, n: int, g: int):
  """The kernel config a pass uses by default on x [M, K], w [G, K, N]."""
  if pass_ == "wgrad":
    return config_lib.tgmm_config(m, k, n, g)
  if pass_ == "dgrad":  # dy [M, N] @ w.T: N is contracted, K comes out
    return config_lib.gmm_config(m, n, k, g, transpose_rhs=True)
  return config_lib.gmm_config(m, k, n, g)


def pass_setup(pass_: str, x, w, dy, gs):
  """(default config, kernel(config) -> jitted fn, args) of one pass."""
  m, k = x.shape
  g, _, n = w.shape
  base = default_config(pass_, m, k, n, g)
  if pass_ == "wgrad":
    return base, lambda cfg: jax.jit(functools.partial(tgmm_mgpu, config=cfg)), (x, dy, gs)
  dgrad = pass_ == "dgrad"
  make = lambda cfg: jax.jit(functools.partial(gmm_mgpu, transpose_rhs=dgrad, config=cfg))  # noqa: E731
  return base, make, (dy, w, gs) if dgrad else (x, w, gs)


def variants_of(base, variants: dict[str, dict], log) -> dict:
  """{"base": base, name: base with the overrides} for the variants that apply."""
  out = {"base": base}
  for name, overrides in variants.items():
    try:
      out[name] = dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as e:
      log(f"  {name} skipped: {e}")
  return out


def ab_record(shape, pass_, x, w, dy, gs, variants, log) -> dict:
  base, make, args = pass_setup(pass_, x, w, dy, gs)
  configs = variants_of(base, variants, log)
  fns = {name: make(cfg) for name, cfg in configs.items()}
  ref = np.asarray(fns["base"](*args).astype(jnp.float32))
  diffs = {}
  for name in list(fns)[1:]:
    try:
      out = np.asarray(fns[name](*args).astype(jnp.float32))
    except Exception as e:  # noqa: BLE001 -- report and go on with the others
      log(f"  {name} failed: {str(e)[:300]}")
      del fns[name]
      continue
    diffs[name] = float(np.max(np.abs(out - ref))) if np.isfinite(out).all() else None
  timed = {name: (fn, args) for name, fn in fns.items()}
  timed["dense"] = (jax.jit(lambda a, b: a @ b), (x, w[0]))
  ms = timing.interleaved_ms(timed, rounds=5, calls=30, repeats=3)
  flop = shapes.flops(*shape[:3])
  return dict(shape=list(shape), pass_=pass_,
              tflops={name: flop / (t * 1e-3) / 1e12 for name, t in ms.items()},
              max_abs_diff_vs_base=diffs,
              configs={name: str(cfg) for name, cfg in configs.items()})


def format_record(rec: dict) -> str:
  tf = rec["tflops"]
  ratios = "  ".join(f"{name} {tf[name] / tf['base']:.3f}"
                     for name in tf if name not in ("base", "dense"))
  return (f"{tuple(rec['shape'])} {rec['pass_']:6s} base {tf['base']:6.1f}  dense "
          f"{tf['dense']:6.1f} | × base: {ratios} | max diff {rec['max_abs_diff_vs_base']}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_selection_args(parser, passes=",".join(PASSES))
  parser.add_argument("--variant", action="append", default=[], type=parse_variant,
                      help="NAME:FIELD=VALUE[,FIELD=VALUE...] (repeatable)")
  args = parser.parse_args()
  log = functools.partial(print, file=sys.stderr, flush=True)
  result = run_header()
  for passes, shape, x, w, dy, gs in selected_inputs(parser, args):
    for pass_ in passes:
      rec = ab_record(shape, pass_, x, w, dy, gs, dict(args.variant), log)
      result["records"].append(rec)
      print(format_record(rec), flush=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
