"""The weight gradient's FP8 operands in one pass (Pallas, Triton backend):
`quantize.quantize_columns`, the 1x128 quantisation of x's group-aligned transpose.

XLA builds that layout as a gather of x's rows, a transpose and `quantize_rows`'
reduce and scaled cast. Here each program owns one 128-row block of the aligned
layout (rows of one group, `quantize.column_blocks`) and 128 columns of x: it reads
the block's rows once (masked past the group's end), takes each column's amax, and
writes the e4m3 values transposed, [128 columns, 128 positions], and the columns'
scales. A row-quantised x (`quantize.RowQuantized`, e.g. the saved FP8
activations) is dequantised on the fly, so its float copy never reaches HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import quantize

_NUM_WARPS = 8


def _kernel(row0_ref, rows_ref, x_ref, *refs, dequantize: bool):
  if dequantize:
    x_scales_ref, values_ref, scales_ref = refs
  else:
    values_ref, scales_ref = refs
  b, kb = pl.program_id(0), pl.program_id(1)
  row0, valid = row0_ref[b], jnp.arange(quantize.BLOCK) < rows_ref[b]
  rows, cols = pl.ds(row0, quantize.BLOCK), pl.ds(kb * quantize.BLOCK, quantize.BLOCK)
  # Masked lanes are undefined (e4m3 has no `other` to fill them with): zeroed here.
  x = pl_triton.load(x_ref.at[rows, cols], mask=valid[:, None]).astype(jnp.float32)
  if dequantize:
    x = x * pl_triton.load(x_scales_ref.at[kb, rows], mask=valid)[:, None]
  x = jnp.where(valid[:, None], x, 0.0)
  scales = quantize.scale_of(jnp.max(jnp.abs(x), axis=0))  # [128 columns]
  values_ref[...] = (x / scales[None, :]).astype(quantize.FP8).T
  scales_ref[...] = scales


def quantize_columns_triton(x: jax.Array | quantize.RowQuantized, group_sizes: jax.Array,
                            *, interpret: bool = False) -> quantize.RowQuantized:
  """`quantize.quantize_columns(x, group_sizes)`, the same numbers: x [M, K] float or
  a RowQuantized x (values [M, K] e4m3, scales [K // 128, M]), K % 128 == 0 ->
  values [K, P] e4m3, scales [P // 128, K] float32, P = `quantize.aligned_rows(M, G)`.
  """
  dequantize = isinstance(x, quantize.RowQuantized)
  values_in = x.values if dequantize else x
  if values_in.ndim != 2:
    raise ValueError(f"Expected a 2-D x [M, K], got shape {tuple(values_in.shape)}.")
  quantize.check_blocks("x", values_in, (1,))
  m, k = values_in.shape
  if m == 0:
    raise NotImplementedError("M=0: no rows to quantise.")
  row0, rows = quantize.column_blocks(group_sizes, m)
  p, blk = row0.shape[0] * quantize.BLOCK, quantize.BLOCK
  whole = pl.BlockSpec(memory_space=pl.ANY)
  values, scales = pl.pallas_call(
      functools.partial(_kernel, dequantize=dequantize),
      grid=(p // blk, k // blk),
      in_specs=[whole] * (4 if dequantize else 3),
      out_specs=[pl.BlockSpec((blk, blk), lambda b, kb: (kb, b)),
                 pl.BlockSpec((None, blk), lambda b, kb: (b, kb))],
      out_shape=[jax.ShapeDtypeStruct((k, p), quantize.FP8),
                 jax.ShapeDtypeStruct((p // blk, k), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="quantize_columns",
  )(row0, rows, values_in, *([x.scales] if dequantize else []))
  return quantize.RowQuantized(values, scales)
