"""The weight gradient's FP8 operands in one pass (Pallas, Triton backend):
`quantize.quantize_columns`, the 1x128 quantisation of x's group-aligned transpose,
and `quantize.quantize_rows_and_columns`, that and x's own 1x128 row quantisation
from the same read of x.

XLA builds the column layout as a gather of x's rows, a transpose and
`quantize_rows`' reduce and scaled cast. Here each program owns one 128-row block of
the aligned layout (rows of one group, `quantize.column_blocks`) and 128 columns of
x: it reads the block's rows once (masked past the group's end), takes each
column's amax, and writes the e4m3 values transposed, [128 columns, 128 positions],
and the columns' scales; with rows, also each row's amax, values and scale. The
aligned layout has at least as many blocks past the last group's as x has 128-row
chunks of padding rows (past sum(group_sizes)), and those programs row-quantise the
padding rows, so every row of the row output is written. A row-quantised x
(`quantize.RowQuantized`, e.g. the saved FP8 activations) is dequantised on the fly,
so its float copy never reaches HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import quantize

_NUM_WARPS = 8


def _kernel(row0_ref, rows_ref, in_group_ref, x_ref, *refs, dequantize: bool, srelu: bool,
            with_rows: bool):
  refs = list(refs)
  x_scales_ref = refs.pop(0) if dequantize else None
  p_ref = refs.pop(0) if srelu else None
  row_values_ref, row_scales_ref = (refs.pop(0), refs.pop(0)) if with_rows else (None, None)
  values_ref, scales_ref = refs
  b, kb = pl.program_id(0), pl.program_id(1)
  row0, valid = row0_ref[b], jnp.arange(quantize.BLOCK) < rows_ref[b]
  rows, cols = pl.ds(row0, quantize.BLOCK), pl.ds(kb * quantize.BLOCK, quantize.BLOCK)
  # Masked lanes are undefined (e4m3 has no `other` to fill them with): zeroed here.
  x = pl_triton.load(x_ref.at[rows, cols], mask=valid[:, None]).astype(jnp.float32)
  if dequantize:
    x = x * pl_triton.load(x_scales_ref.at[kb, rows], mask=valid)[:, None]
  if srelu:
    x = quantize.srelu_f32(x, pl_triton.load(p_ref.at[rows], mask=valid))
  x = jnp.where(valid[:, None], x, 0.0)
  if with_rows:
    row_scales = quantize.scale_of(jnp.max(jnp.abs(x), axis=1))  # [128 rows]
    pl_triton.store(row_values_ref.at[rows, cols],
                    (x / row_scales[:, None]).astype(quantize.FP8), mask=valid[:, None])
    pl_triton.store(row_scales_ref.at[kb, rows], row_scales, mask=valid)
  x = jnp.where(in_group_ref[b] > 0, x, 0.0)  # padding rows stay out of the columns
  scales = quantize.scale_of(jnp.max(jnp.abs(x), axis=0))  # [128 columns]
  values_ref[...] = (x / scales[None, :]).astype(quantize.FP8).T
  scales_ref[...] = scales


def _check_x(values: jax.Array) -> None:
  if values.ndim != 2:
    raise ValueError(f"Expected a 2-D x [M, K], got shape {tuple(values.shape)}.")
  quantize.check_blocks("x", values, (1,))
  if values.shape[0] == 0:
    raise NotImplementedError("M=0: no rows to quantise.")


def _call(x, group_sizes, *, x_scales=None, srelu_scales=None, with_rows: bool,
          interpret: bool):
  """The kernel over the aligned layout's blocks: (row values, row scales)
  (with_rows) + (column values, column scales)."""
  m, k = x.shape
  row0, rows = quantize.column_blocks(group_sizes, m)
  in_group = (rows > 0).astype(jnp.int32)
  if with_rows:  # the blocks past the last group's take the padding rows, 128 at a time
    first_padding_row = jnp.minimum(jnp.sum(group_sizes.astype(jnp.int32)), m)
    spare = jnp.cumsum(1 - in_group) - 1  # the index of each spare block among them
    pad_row0 = first_padding_row + quantize.BLOCK * spare
    pad_rows = jnp.clip(m - pad_row0, 0, quantize.BLOCK)
    row0 = jnp.where(in_group > 0, row0, jnp.where(pad_rows > 0, pad_row0, 0))
    rows = jnp.where(in_group > 0, rows, pad_rows)
  p, blk = row0.shape[0] * quantize.BLOCK, quantize.BLOCK
  whole = pl.BlockSpec(memory_space=pl.ANY)
  inputs = [row0, rows, in_group, x]  # int32 [P // 128] each, then x
  inputs += [a for a in (x_scales, srelu_scales) if a is not None]
  out_specs = [pl.BlockSpec((blk, blk), lambda b, kb: (kb, b)),
               pl.BlockSpec((None, blk), lambda b, kb: (b, kb))]
  out_shape = [jax.ShapeDtypeStruct((k, p), quantize.FP8),
               jax.ShapeDtypeStruct((p // blk, k), jnp.float32)]
  if with_rows:
    out_specs = [whole, whole] + out_specs
    out_shape = [jax.ShapeDtypeStruct((m, k), quantize.FP8),
                 jax.ShapeDtypeStruct((k // blk, m), jnp.float32)] + out_shape
  return pl.pallas_call(
      functools.partial(_kernel, dequantize=x_scales is not None,
                        srelu=srelu_scales is not None, with_rows=with_rows),
      grid=(p // blk, k // blk),
      in_specs=[whole] * len(inputs),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pl_triton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="quantize_rows_and_columns" if with_rows else "quantize_columns",
  )(*inputs)


def quantize_columns_triton(x: jax.Array | quantize.RowQuantized, group_sizes: jax.Array,
                            *, interpret: bool = False) -> quantize.RowQuantized:
  """`quantize.quantize_columns(x, group_sizes)`, the same numbers: x [M, K] float or
  a RowQuantized x (values [M, K] e4m3, scales [K // 128, M]), K % 128 == 0 ->
  values [K, P] e4m3, scales [P // 128, K] float32, P = `quantize.aligned_rows(M, G)`.
  """
  dequantize = isinstance(x, quantize.RowQuantized)
  values_in = x.values if dequantize else x
  _check_x(values_in)
  return quantize.RowQuantized(*_call(
      values_in, group_sizes, x_scales=x.scales if dequantize else None, with_rows=False,
      interpret=interpret))


def quantize_rows_and_columns_triton(
    x: jax.Array, group_sizes: jax.Array, srelu_scales: jax.Array | None = None, *,
    interpret: bool = False) -> tuple[quantize.RowQuantized, quantize.RowQuantized]:
  """`quantize.quantize_rows_and_columns(x, group_sizes, srelu_scales)`, the same
  numbers from one read of x [M, K] float (K % 128 == 0): (rows: values [M, K] e4m3,
  scales [K // 128, M]; columns: values [K, P] e4m3, scales [P // 128, K]), of
  relu(x)**2 * p with srelu_scales p [M].
  """
  _check_x(x)
  row_values, row_scales, values, scales = _call(
      x, group_sizes, srelu_scales=srelu_scales, with_rows=True, interpret=interpret)
  return (quantize.RowQuantized(row_values, row_scales),
          quantize.RowQuantized(values, scales))
