"""The XLA implementation (`jax.lax.ragged_dot`): the reference every backend matches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import quantize

# lhs [M, K] ragged in M, contracted with rhs [G, N, K] on its last axis.
_GMM_TRANSPOSED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
# lhs [K, P] and rhs [N, P] contracted on their ragged, group-aligned P: out [G, K, N].
_TGMM_FP8_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (1,)), ((), ())),
    lhs_ragged_dimensions=[1],
    rhs_group_dimensions=[],
)
# lhs [M, K] and rhs [M, N] contracted over their ragged rows: out [G, K, N].
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def gmm_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
            transpose_rhs: bool, out_dtype: jnp.dtype) -> jax.Array:
  """out[rows of group g] = lhs[rows of g] @ rhs[g] (or rhs[g].T); [M, N] in out_dtype.

  Rows past sum(group_sizes) are zero. Accumulates in float32.
  """
  if transpose_rhs:
    out = jax.lax.ragged_dot_general(
        lhs, rhs, group_sizes, _GMM_TRANSPOSED_DIMS,
        preferred_element_type=jnp.float32)
  else:
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes,
                             preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def tgmm_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
             out_dtype: jnp.dtype) -> jax.Array:
  """out[g] = lhs[rows of g].T @ rhs[rows of g]; [G, K, N] in out_dtype, zero for empty g."""
  out = jax.lax.ragged_dot_general(
      lhs, rhs, group_sizes, _TGMM_DIMS, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def scaled_srelu_xla(h: jax.Array, p: jax.Array) -> jax.Array:
  """a = relu(h)**2 * p[:, None] in float32; [M, F] in h.dtype."""
  return quantize.srelu_f32(h, p).astype(h.dtype)


def scaled_srelu_bwd_xla(da: jax.Array, h: jax.Array,
                         p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(da, h [M, F], p [M]) -> (dh [M, F] in h.dtype, dp [M] float32)."""
  relu = jnp.maximum(h.astype(jnp.float32), 0.0)
  da = da.astype(jnp.float32)
  dh = da * p[:, None].astype(jnp.float32) * (2.0 * relu)
  return dh.astype(h.dtype), jnp.sum(da * relu * relu, axis=1)


def gmm_srelu_xla(x: jax.Array, w1: jax.Array, group_sizes: jax.Array,
                  p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(h, a): h = x_g @ w1_g, a = relu(h)**2 * p; both [M, F] in x.dtype."""
  h = gmm_xla(x, w1, group_sizes, transpose_rhs=False, out_dtype=x.dtype)
  return h, scaled_srelu_xla(h, p)


def gmm_dsrelu_xla(dy: jax.Array, w2: jax.Array, group_sizes: jax.Array,
                   h: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(dh [M, F] in h.dtype, dp [M] f32) from da = dy_g @ w2_g.T (float32)."""
  da = gmm_xla(dy, w2, group_sizes, transpose_rhs=True, out_dtype=jnp.float32)
  return scaled_srelu_bwd_xla(da, h, p)


def gmm_fp8_xla(lhs_values: jax.Array, lhs_scales: jax.Array, rhs_values: jax.Array,
                rhs_scales: jax.Array, group_sizes: jax.Array, *,
                out_dtype: jnp.dtype) -> jax.Array:
  """`gmm_fp8_mgpu`'s reference: ragged_dot of the dequantised operands in float32.

  lhs: values [M, K] e4m3, scales [K // 128, M]; rhs: values [G, N, K] e4m3 (contracted
  on K), scales [G, K // 128, N // 128]. Every product of two dequantised values is the
  kernel's, so the two differ only in float32 summation order. [M, N] in out_dtype,
  zero past sum(group_sizes).
  """
  lhs = quantize.dequantize_rows(quantize.RowQuantized(lhs_values, lhs_scales))
  g, n, k = rhs_values.shape
  block = quantize.BLOCK
  blocks = quantize.fp8_to_f32(rhs_values).reshape(g, n // block, block, k // block, block)
  scales = jnp.swapaxes(rhs_scales, 1, 2)[:, :, None, :, None]  # [G, N/128, 1, K/128, 1]
  rhs = (blocks * scales).reshape(g, n, k)
  out = jax.lax.ragged_dot_general(
      lhs, rhs, group_sizes, _GMM_TRANSPOSED_DIMS, precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)
  return _rounded(out, out_dtype)


def gmm_fp8_dsrelu_xla(dy_values, dy_scales, w2_values, w2_scales, group_sizes, h, p
                       ) -> tuple[jax.Array, jax.Array]:
  """`gmm_fp8_dsrelu_mgpu`'s reference: (dh [M, F] in h.dtype, dp [M] f32) from the
  float32 da = `gmm_fp8_xla` of dy and w2 (contracted on H)."""
  da = gmm_fp8_xla(dy_values, dy_scales, w2_values, w2_scales, group_sizes,
                   out_dtype=jnp.dtype(jnp.float32))
  return scaled_srelu_bwd_xla(da, h, p)


def tgmm_fp8_xla(lhs_values: jax.Array, lhs_scales: jax.Array, rhs_values: jax.Array,
                 rhs_scales: jax.Array, group_sizes: jax.Array, *, num_rows: int,
                 out_dtype: jnp.dtype) -> jax.Array:
  """`tgmm_fp8_mgpu`'s reference: out[g] = dequant(lhs)[:, rows of g] @
  dequant(rhs)[:, rows of g].T in float32, on `quantize.quantize_columns` layouts of
  [num_rows, K] and [num_rows, N] (lhs [K, P], rhs [N, P]). [G, K, N] in out_dtype.
  """
  lhs = quantize.dequantize_rows(quantize.RowQuantized(lhs_values, lhs_scales))
  rhs = quantize.dequantize_rows(quantize.RowQuantized(rhs_values, rhs_scales))
  aligned_sizes = quantize.group_blocks(group_sizes, num_rows).count * quantize.BLOCK
  out = jax.lax.ragged_dot_general(
      lhs, rhs, aligned_sizes, _TGMM_FP8_DIMS, precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)
  return _rounded(out, out_dtype)


def _rounded(out: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
  """A float32 result rounded as a kernel rounds its output, even where XLA's excess
  precision would fuse the next op into the float32 value (the result then depends on
  the fusion)."""
  out = out.astype(out_dtype)
  finfo = jnp.finfo(out_dtype)
  return jax.lax.reduce_precision(out, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant)
