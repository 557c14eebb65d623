"""On a Hopper GPU: the FP8 expert MLP on the Mosaic GPU kernels against the XLA
reference (same quantisation), forward and gradients, and the step time of both, of
the FP8 MLP with FP8 weight gradients (`BlockwiseRecipe(wgrad_dtype="float8_e4m3fn")`)
and of the bf16 fused MLP, timed side by side (`timing.interleaved_ms`, medians).

    PYTHONPATH=. python benchmarks/fp8_mlp_check.py [--tokens 16384 --hidden 2048 --ffn 4096 --experts 8] \
        [--out result.json] [--profile DIR]

--profile traces a few steps of each timed run (`jax.profiler`, one directory each)
and prints each step's busiest GPU ops (`jaxmoe.profile_report`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxmoe
from jaxmoe import profile_report

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_ms  # noqa: E402


def parse_shape(argv, description: str, profile: bool = False):
  """(args, (M, H, F, G)) from --tokens --hidden --ffn --experts, --out and, where
  `profile`, --profile."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--ffn", type=int, default=4096)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--out", help="write the times here as JSON")
  if profile:
    p.add_argument("--profile", help="trace the timed steps into this directory")
  args = p.parse_args(argv)
  return args, (args.tokens, args.hidden, args.ffn, args.experts)


def write_result(path, script: str, argv, shape, **fields) -> None:
  """The times as JSON with the card, jax version, date and command."""
  m, h, f, g = shape
  with open(path, "w") as file:
    json.dump(dict(card=jax.devices()[0].device_kind, jax=jax.__version__,
                   date=datetime.date.today().isoformat(),
                   command=f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:]),
                   M=m, H=h, F=f, G=g, **fields), file, indent=1)


def main(argv=None) -> None:
  args, (m, h, f, g) = parse_shape(argv, "the FP8 expert MLP's step against bf16's",
                                    profile=True)
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (m, h), jnp.bfloat16)
  w1 = jax.random.normal(keys[1], (g, h, f), jnp.float32) / np.sqrt(h)
  w2 = jax.random.normal(keys[2], (g, f, h), jnp.float32) / np.sqrt(f)
  scales = jax.random.uniform(keys[3], (m,), jnp.float32, 0.1, 1.0)
  dy = jax.random.normal(keys[4], (m, h), jnp.bfloat16)
  rng = np.random.default_rng(0)
  cuts = np.sort(rng.integers(0, m - 1000, g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [m - 1000]])).astype(np.int32)
  sizes[1] = 0
  sizes[0] += m - 1000 - sizes.sum()
  gs = jnp.asarray(sizes)

  def step(backend, fp8):
    def f_(x, w1, w2, scales):
      ww1, ww2 = (w1, w2) if fp8 else (w1.astype(jnp.bfloat16), w2.astype(jnp.bfloat16))
      return jaxmoe.grouped_mlp(x, ww1, ww2, gs, scales, backend=backend, fp8=fp8)

    @jax.jit
    def run(x, w1, w2, scales, dy):  # dy an argument: XLA would fold it as a constant
      y, vjp = jax.vjp(f_, x, w1, w2, scales)
      return (y,) + vjp(dy)
    return run

  recipe = jaxmoe.BlockwiseRecipe()
  fp8_wgrad = jaxmoe.BlockwiseRecipe(wgrad_dtype="float8_e4m3fn")
  runs = {name: step(backend, fp8) for name, backend, fp8 in (
      ("fp8_kernels", "mosaic_gpu", recipe), ("fp8_xla", "xla", recipe),
      ("fp8_wgrad_kernels", "mosaic_gpu", fp8_wgrad), ("fp8_wgrad_xla", "xla", fp8_wgrad),
      ("bf16_kernels", "mosaic_gpu", None))}
  operands = (x, w1, w2, scales, dy)
  out = {name: [np.asarray(a.astype(jnp.float32)) for a in run(*operands)]
         for name, run in runs.items()}
  timed = ("fp8_kernels", "fp8_wgrad_kernels", "bf16_kernels")
  ms = interleaved_ms({name: (runs[name], operands) for name in timed}, calls=10)
  for name, t in ms.items():
    print(f"{name}: fwd+bwd {t:.2f} ms ({6 * 2 * m * h * f / t / 1e9:.0f} TF/s)")
  for name in timed[:2]:
    print(f"{name} / bf16 kernels speed: {ms['bf16_kernels'] / ms[name]:.2f}x")
  if args.profile:
    for name in timed:
      trace_dir = os.path.join(args.profile, name)
      with jax.profiler.trace(trace_dir):
        for _ in range(3):
          jax.block_until_ready(runs[name](*operands))
      with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as file:
        file.write(runs[name].lower(*operands).compile().as_text())
      print(f"{name}: 3 steps\n{profile_report.summary(trace_dir, top=24)}")
  if args.out:
    write_result(args.out, "fp8_mlp_check.py", argv, (m, h, f, g), fwd_bwd_ms=ms)
  labels = ["y", "dx", "dw1", "dw2", "dscales"]
  used = int(sizes.sum())
  rel = lambda u, v: np.linalg.norm(u - v) / np.linalg.norm(v)  # noqa: E731
  for prefix in ("fp8", "fp8_wgrad"):
    kernels, xla = out[f"{prefix}_kernels"], out[f"{prefix}_xla"]
    for label, a, b, c in zip(labels, kernels, xla, out["bf16_kernels"]):
      print(f"{prefix} {label}: nan={np.isnan(a).any()} kernels vs xla ref {rel(a, b):.2e}, "
            f"vs bf16 {rel(a, c):.2e}")
    assert (kernels[0][used:] == 0).all()


if __name__ == "__main__":
  main()
