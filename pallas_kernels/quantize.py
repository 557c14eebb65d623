"""Blockwise FP8 (e4m3) quantisation: the layouts every FP8 kernel reads, in XLA.

The recipe (DeepSeek-V3's, TransformerEngine's `Float8BlockScaling`):

  * activations and gradients, x [M, K], in 1x128 tiles along K: one float32 scale
    per row per 128 columns (`quantize_rows`);
  * weights, w [G, K, N], in 128x128 blocks: one scale per block (`quantize_blocks`),
    so that the transposed weight needs no requantisation.

A scale is amax(|tile|) / 448 (448 = e4m3's largest finite value; 1 for an all-zero
tile), the values round(x / scale) in e4m3, and x ~= values * scale.

Hopper's FP8 wgmma reads both operands K-major (the contracted axis contiguous),
so each pass wants its own layout; the quantisers produce them directly:

  pass                     lhs (K-major)                 rhs (K-major)
  fwd   y  = x @ w         rows of x      [M, K]         w transposed  [G, N, K]
  dgrad dx = dy @ w.T      rows of dy     [M, N]         w as stored   [G, K, N]
  wgrad dw = x.T @ dy      columns of x   [K, M]         columns of dy [N, M]

Row scales are stored transposed, [K // 128, M]: one K block's scales of
consecutive rows are contiguous (one TMA copy per pipeline step).

The weight gradient contracts over the rows of x and dy, which are sorted by group,
so their column tiles must not span two groups: `quantize_columns` quantises the
group-aligned transpose, where each group starts a fresh 128-row block
(`group_blocks`) and the rest of its last block is zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128  # scale tile: 1x128 for activations, 128x128 for weights


class RowQuantized(NamedTuple):
  """x [M, K] in 1x128 tiles: values [M, K] e4m3, scales [K // 128, M] float32."""
  values: jax.Array
  scales: jax.Array


class BlockQuantized(NamedTuple):
  """w [G, K, N] in 128x128 blocks: values [G, K, N] and values_t [G, N, K] e4m3
  (the same numbers, both layouts), scales [G, K // 128, N // 128] float32."""
  values: jax.Array
  values_t: jax.Array
  scales: jax.Array


class GroupBlocks(NamedTuple):
  """The 128-row blocks of each group in the group-aligned layout: group g's rows
  are rows [128 * first[g], 128 * first[g] + size[g]) of it, rows [row_start[g],
  row_start[g] + size[g]) of the unaligned tensor. int32 [G] each."""
  first: jax.Array
  count: jax.Array
  row_start: jax.Array
  size: jax.Array


def check_blocks(name: str, x: jax.Array, axes: tuple[int, ...]) -> None:
  for axis in axes:
    if x.shape[axis] % BLOCK:
      raise ValueError(f"FP8 quantisation of '{name}' needs its axis {axis} to be a "
                       f"multiple of {BLOCK}; got shape {tuple(x.shape)}.")


def scale_of(amax: jax.Array) -> jax.Array:
  """A tile's scale from its amax: amax / 448, or 1 for an all-zero tile."""
  return jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)


def srelu_f32(h: jax.Array, p: jax.Array) -> jax.Array:
  """a = relu(h)**2 * p[:, None], [M, F] float32 (FC1's activation as FP8 quantises it)."""
  relu = jnp.maximum(h.astype(jnp.float32), 0.0)
  return relu * relu * p[:, None].astype(jnp.float32)


def quantize_rows(x: jax.Array, srelu_scales: jax.Array | None = None) -> RowQuantized:
  """x [M, K] float -> RowQuantized, one scale per row per 128 columns (K % 128 == 0).

  With srelu_scales p [M], quantises a = `srelu_f32(x, p)` instead of x.
  """
  check_blocks("x", x, (1,))
  m, k = x.shape
  if srelu_scales is not None:
    x = srelu_f32(x, srelu_scales)
  tiles = x.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK)
  scales = scale_of(jnp.max(jnp.abs(tiles), axis=2))  # [M, K // 128]
  values = (tiles / scales[:, :, None]).astype(FP8).reshape(m, k)
  return RowQuantized(values, scales.T)


def quantize_blocks(w: jax.Array) -> BlockQuantized:
  """w [G, K, N] float -> BlockQuantized, one scale per 128x128 block."""
  check_blocks("w", w, (1, 2))
  g, k, n = w.shape
  blocks = w.astype(jnp.float32).reshape(g, k // BLOCK, BLOCK, n // BLOCK, BLOCK)
  scales = scale_of(jnp.max(jnp.abs(blocks), axis=(2, 4)))  # [G, K // 128, N // 128]
  values = (blocks / scales[:, :, None, :, None]).astype(FP8).reshape(g, k, n)
  return BlockQuantized(values, jnp.swapaxes(values, 1, 2), scales)


def fp8_to_f32(values: jax.Array) -> jax.Array:
  """e4m3 values -> float32, exactly.

  The optimisation barrier keeps the e4m3 rounding: XLA's GPU pipeline
  (`SimplifyFPConversions`, on under the default xla_allow_excess_precision)
  rewrites a chain of float converts f32 -> e4m3 -> f32 as no convert at all, so a
  quantise-dequantise in one jit would otherwise compute on unquantised values.
  """
  return jax.lax.optimization_barrier(values).astype(jnp.float32)


def dequantize_rows(q: RowQuantized) -> jax.Array:
  """RowQuantized -> x [M, K] float32."""
  m, k = q.values.shape
  tiles = fp8_to_f32(q.values).reshape(m, k // BLOCK, BLOCK)
  return (tiles * q.scales.T[:, :, None]).reshape(m, k)


def dequantize_blocks(q: BlockQuantized) -> jax.Array:
  """BlockQuantized -> w [G, K, N] float32."""
  g, k, n = q.values.shape
  blocks = fp8_to_f32(q.values).reshape(g, k // BLOCK, BLOCK, n // BLOCK, BLOCK)
  return (blocks * q.scales[:, :, None, :, None]).reshape(g, k, n)


def aligned_rows(m: int, num_groups: int) -> int:
  """P, the rows of the group-aligned layout of m rows in num_groups groups: a static
  bound (each group's last block may be partly zeros)."""
  return BLOCK * (-(-m // BLOCK) + num_groups)


def group_blocks(group_sizes: jax.Array, m: int) -> GroupBlocks:
  """Each group's blocks in the group-aligned layout of `m` rows (sizes clipped to m)."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  sizes = jnp.diff(ends, prepend=0)
  count = (sizes + BLOCK - 1) // BLOCK
  return GroupBlocks(first=jnp.cumsum(count) - count, count=count, row_start=ends - sizes,
                     size=sizes)


def column_blocks(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """For each 128-row block b of the group-aligned layout of m rows: the row of x
  its first position holds and how many rows it holds (0 past the last group's
  blocks), int32 [P // 128] each (P = `aligned_rows(m, G)`)."""
  num_groups = group_sizes.shape[0]
  blocks = group_blocks(group_sizes, m)
  b = jnp.arange(aligned_rows(m, num_groups) // BLOCK)
  ends = jnp.cumsum(blocks.count)
  group = jnp.minimum(jnp.searchsorted(ends, b, side="right"), num_groups - 1)
  offset = BLOCK * (b - blocks.first[group])  # within the group
  rows = jnp.where(b < ends[-1], jnp.clip(blocks.size[group] - offset, 0, BLOCK), 0)
  return (blocks.row_start[group] + offset).astype(jnp.int32), rows.astype(jnp.int32)


def quantize_columns(x: jax.Array | RowQuantized, group_sizes: jax.Array) -> RowQuantized:
  """x [M, K] float, rows sorted by group -> `quantize_rows` of its group-aligned
  transpose [K, P] (P = `aligned_rows(M, G)`): values [K, P] e4m3, scales [P // 128, K],
  one per column of x per 128 rows of one group. Rows past sum(group_sizes) are left
  out; positions that hold no row are zeros. The layout of `tgmm_fp8`'s operands.
  A RowQuantized x is requantised from its dequantised values.
  """
  if isinstance(x, RowQuantized):
    x = dequantize_rows(x)
  m, k = x.shape
  row0, rows = column_blocks(group_sizes, m)
  pos = jnp.arange(row0.shape[0] * BLOCK)
  offset = pos % BLOCK
  row = row0[pos // BLOCK] + offset
  valid = offset < rows[pos // BLOCK]
  aligned = jnp.where(valid[:, None], x[jnp.clip(row, 0, m - 1)].astype(jnp.float32), 0.0)
  return quantize_rows(aligned.T)


def quantize_rows_and_columns(x: jax.Array, group_sizes: jax.Array,
                              srelu_scales: jax.Array | None = None
                              ) -> tuple[RowQuantized, RowQuantized]:
  """(`quantize_rows(x, srelu_scales)`, `quantize_columns` of the same float tensor):
  an activation's or gradient's operands for both its GEMMs, the row-major one for
  gmm and the group-aligned transpose for `tgmm_fp8`, each quantised from x (or
  a = `srelu_f32(x, p)`) itself."""
  if srelu_scales is not None:
    x = srelu_f32(x, srelu_scales)
  return quantize_rows(x), quantize_columns(x, group_sizes)
