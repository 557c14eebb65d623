"""On a Hopper GPU: the FP8 expert MLP on the Mosaic GPU kernels against the XLA
reference (same quantisation), forward and gradients, and the step time of both and of
the bf16 fused MLP.

    PYTHONPATH=. python benchmarks/fp8_mlp_check.py [--tokens 16384 --hidden 2048 --ffn 4096 --experts 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmoe


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--ffn", type=int, default=4096)
  p.add_argument("--experts", type=int, default=8)
  args = p.parse_args(argv)
  m, h, f, g = args.tokens, args.hidden, args.ffn, args.experts
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
      return jaxmoe.grouped_mlp(x, ww1, ww2, gs, scales, backend=backend,
                                fp8=jaxmoe.BlockwiseRecipe() if fp8 else None)

    @jax.jit
    def run(x, w1, w2, scales):
      y, vjp = jax.vjp(f_, x, w1, w2, scales)
      return (y,) + vjp(dy)
    return run

  out = {}
  for name, backend, fp8 in (("fp8_kernels", "mosaic_gpu", True), ("fp8_xla", "xla", True),
                             ("bf16_kernels", "mosaic_gpu", False)):
    run = step(backend, fp8)
    res = jax.block_until_ready(run(x, w1, w2, scales))
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
      r = run(x, w1, w2, scales)
    jax.block_until_ready(r)
    ms = (time.perf_counter() - t0) / n * 1e3
    out[name] = [np.asarray(a.astype(jnp.float32)) for a in res]
    print(f"{name}: fwd+bwd {ms:.2f} ms ({6 * 2 * m * h * f / ms / 1e9:.0f} TF/s)", flush=True)
  labels = ["y", "dx", "dw1", "dw2", "dscales"]
  used = int(sizes.sum())
  for label, a, b, c in zip(labels, out["fp8_kernels"], out["fp8_xla"], out["bf16_kernels"]):
    rel = lambda u, v: np.linalg.norm(u - v) / np.linalg.norm(v)  # noqa: E731
    print(f"{label}: nan={np.isnan(a).any()} kernels vs xla ref {rel(a, b):.2e}, "
          f"fp8 vs bf16 {rel(a, c):.2e}")
  assert (out["fp8_kernels"][0][used:] == 0).all()


if __name__ == "__main__":
  main()
