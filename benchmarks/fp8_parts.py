"""On a Hopper GPU: the parts of the FP8 expert MLP's step timed one by one beside their
bf16 counterparts (`timing.interleaved_ms`, medians), to show where the FP8 step's
time goes: the quantisations (XLA fusions and our kernels), the FP8 GEMMs and the
weight gradients.

    PYTHONPATH=. python benchmarks/fp8_parts.py [--tokens 16384 --hidden 2048 --ffn 4096 \
        --experts 8] [--out parts.json]
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import config as config_lib
from pallas_kernels import quantize
from pallas_kernels.tgmm_fp8_mgpu import tgmm_fp8_mgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_mlp_check import parse_shape, write_result  # noqa: E402
from timing import interleaved_ms  # noqa: E402


# tgmm_fp8's other configs (float32 out; the default is two consumers one above the
# other, `config.fp8_tgmm_config`): one warpgroup, and two consumers side by side.
TGMM_FP8_VARIANTS = {
    "one warpgroup": config_lib.Fp8TgmmConfig(),
    "ws side by side": config_lib.Fp8TgmmConfig(block_k=64, max_concurrent_steps=3,
                                                num_compute_wgs=2),
}


def main(argv=None) -> None:
  args, (m, h, f, g) = parse_shape(argv, "the FP8 expert MLP's parts one by one")
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (m, h), jnp.bfloat16)
  a = jax.random.normal(keys[1], (m, f), jnp.bfloat16)  # also h, FC1's output
  p = jax.random.uniform(keys[3], (m,), jnp.float32, 0.1, 1.0)
  w1 = jax.random.normal(keys[2], (g, h, f), jnp.float32) / np.sqrt(h)
  sizes = np.full(g, (m - 1000) // g, np.int32)
  sizes[0] += m - 1000 - sizes.sum()
  gs = jnp.asarray(sizes)
  xq, aq, w1q = quantize.quantize_rows(x), quantize.quantize_rows(a), quantize.quantize_blocks(w1)
  xc, ac = quantize.quantize_columns(x, gs), quantize.quantize_columns(a, gs)
  w1b = w1.astype(jnp.bfloat16)
  jit = jax.jit
  parts = {
      "quantize_rows x [M,H] (XLA)": (jit(quantize.quantize_rows), (x,)),
      "quantize_rows x [M,H] (kernel)": (jit(pallas_kernels.quantize_rows), (x,)),
      "quantize_rows srelu(h) [M,F] (XLA)": (jit(quantize.quantize_rows), (a, p)),
      "quantize_rows srelu(h) [M,F] (kernel)": (
          jit(lambda h, p: pallas_kernels.quantize_rows(h, srelu_scales=p)), (a, p)),
      "quantize_blocks w1 [G,H,F] (XLA)": (jit(quantize.quantize_blocks), (w1,)),
      "quantize_blocks w1 [G,H,F] (kernel)": (jit(pallas_kernels.quantize_blocks), (w1,)),
      "cast w1 to bf16 [G,H,F]": (jit(lambda w: w.astype(jnp.bfloat16)), (w1,)),
      "quantize_columns x [M,H] (XLA)": (jit(quantize.quantize_columns), (x, gs)),
      "quantize_columns x [M,H] (kernel)": (jit(pallas_kernels.quantize_columns), (x, gs)),
      "quantize_columns xq [M,H] (XLA)": (jit(quantize.quantize_columns), (xq, gs)),
      "quantize_columns xq [M,H] (kernel)": (jit(pallas_kernels.quantize_columns), (xq, gs)),
      "quantize_columns aq [M,F] (kernel)": (jit(pallas_kernels.quantize_columns), (aq, gs)),
      "quantize_rows_and_columns x [M,H] (kernel)": (
          jit(pallas_kernels.quantize_rows_and_columns), (x, gs)),
      "quantize_rows_and_columns srelu(h) [M,F] (kernel)": (
          jit(lambda h, s, p: pallas_kernels.quantize_rows_and_columns(h, s, srelu_scales=p)),
          (a, gs, p)),
      "dequantize_rows xq -> bf16": (
          jit(lambda q: quantize.dequantize_rows(q).astype(jnp.bfloat16)), (xq,)),
      "gmm fp8 x @ w1": (jit(lambda q, w, s: pallas_kernels.gmm_fp8(q, w, s)), (xq, w1q, gs)),
      "gmm bf16 x @ w1": (jit(pallas_kernels.gmm), (x, w1b, gs)),
      "tgmm fp8 x.T @ a": (jit(lambda u, v, s: pallas_kernels.tgmm_fp8(u, v, s, num_rows=m)),
                           (xc, ac, gs)),
      **{f"tgmm fp8 x.T @ a ({name})": (jit(functools.partial(
          lambda u, v, s, cfg: tgmm_fp8_mgpu(*u, *v, s, num_rows=m, config=cfg), cfg=cfg)),
          (xc, ac, gs)) for name, cfg in TGMM_FP8_VARIANTS.items()},
      "tgmm bf16 x.T @ a": (jit(lambda u, v, s: pallas_kernels.tgmm(
          u, v, s, preferred_element_type=jnp.float32)), (x, a, gs)),
  }
  ms = interleaved_ms(parts, rounds=3, calls=20)
  width = max(map(len, ms))
  for name, t in ms.items():
    print(f"{name:<{width}}  {t:7.3f} ms")
  if args.out:
    write_result(args.out, "fp8_parts.py", argv, (m, h, f, g), ms=ms)


if __name__ == "__main__":
  main()
