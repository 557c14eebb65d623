"""gmm's work items (`metadata.gmm_metadata`) in one small Pallas Triton kernel.

`metadata.gmm_metadata` builds them with XLA ops, which become six small kernels
on the GPU: 7-10 us per gmm call, 3 % of a G=64 forward. This kernel computes the
same arrays in one launch, which made gmm calls 1.015-1.036x faster at G=8 and
G=64 and left G=128 and G=256 unchanged (H100, 2026-11-27, BENCHMARKS.md).
tgmm's metadata (a prefix sum and elementwise ops) stays XLA: it costs 2-3 % of
a G=64 or G=128 tgmm call, but as a kernel of its own it cost as much (a launch).

Every program rebuilds the segment table from `group_sizes` (G + 1 entries in
registers, two prefix sums) and fills `items_block` work items. The segment of
item i is the count of segments that end at or before it; reading a table entry
for it is a one-hot sum over the segments (Triton has no register gather).

The outputs are bitwise those of `metadata.gmm_metadata`, which stays the
reference and the fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import metadata as metadata_lib

try:
  from jax.experimental.pallas import triton as plt
except ImportError:  # JAX has deprecated Pallas' Triton backend; without it, XLA ops.
  plt = None

# Each program holds a few [items_block, next_pow2(G + 1)] int32 tables in
# registers; past this many groups the XLA ops are used instead.
MAX_GROUPS = 2047
_TABLE_ELEMENTS = 8192  # items_block * segments per program.


def _segments(group_sizes_ref, num_groups: int, m: int, width: int):
  """(segment index, start row, end row) of segments [0, width), each int32 [width].

  Segments [0, G) are the groups (rows clipped to m), segment G the padding
  rows [sum, m), and segments past G are empty (start = end = min(sum, m)).
  """
  seg = lax.iota(jnp.int32, width)
  sizes = plt.load(group_sizes_ref.at[pl.ds(0, width)], mask=seg < num_groups, other=0)
  ends = jnp.cumsum(sizes)
  start = jnp.minimum(ends - sizes, m)
  end = jnp.where(seg < num_groups, jnp.minimum(ends, m),
                  jnp.where(seg == num_groups, m, start))
  return seg, start, end


def _cdiv(x, d: int):
  return lax.div(x + (d - 1), d)  # x >= 0 here, so truncation is floor.


def _gmm_kernel(group_sizes_ref, group_id_ref, tile_row0_ref, row_start_ref,
                row_end_ref, compute_ref, counts_ref, *, num_groups: int, m: int,
                block_m: int, num_items: int, width: int, items_block: int):
  g = num_groups
  seg, seg_start, seg_end = _segments(group_sizes_ref, g, m, width)
  tile_base = seg_start & ~7
  num_tiles = jnp.where(seg_end > seg_start, _cdiv(seg_end - tile_base, block_m), 0)
  item_end = jnp.cumsum(num_tiles)
  item_begin = item_end - num_tiles

  first = pl.program_id(0) * items_block
  item = first + lax.iota(jnp.int32, items_block)
  # searchsorted(item_end, item, side="right"): segments past G end where G does.
  item_seg = jnp.sum((item_end[None, :] <= item[:, None]).astype(jnp.int32), axis=1)
  used = item_seg <= g
  item_seg = jnp.minimum(item_seg, g)
  is_item_seg = seg[None, :] == item_seg[:, None]

  def of_item_seg(table):
    return jnp.sum(jnp.where(is_item_seg, table[None, :], 0), axis=1)

  tile_start = of_item_seg(tile_base) + (item - of_item_seg(item_begin)) * block_m
  row_start = jnp.maximum(of_item_seg(seg_start), tile_start)
  row_end = jnp.minimum(of_item_seg(seg_end), tile_start + block_m)
  tile_row0 = jnp.clip(tile_start, 0, max(m - block_m, 0))

  items, in_range = pl.ds(first, items_block), item < num_items
  for ref, value in ((group_id_ref, jnp.minimum(item_seg, max(g - 1, 0))),
                     (tile_row0_ref, jnp.where(used, tile_row0, 0)),
                     (row_start_ref, jnp.where(used, row_start, 0)),
                     (row_end_ref, jnp.where(used, row_end, 0)),
                     (compute_ref, (used & (item_seg < g)).astype(jnp.int32))):
    plt.store(ref.at[items], value, mask=in_range)

  pair = lax.iota(jnp.int32, 2)
  padding = seg == g
  counts = jnp.where(pair == 0, jnp.sum(jnp.where(padding, item_begin, 0)),
                     jnp.sum(jnp.where(padding, item_end, 0)))
  plt.store(counts_ref.at[pl.ds(0, 2)], counts, mask=(pair >= 0) & (first == 0))


def gmm_metadata(group_sizes: jax.Array, m: int, block_m: int, *,
                 interpret: bool = False) -> metadata_lib.GmmMetadata:
  """`metadata.gmm_metadata` in one kernel launch.

  Falls back to the XLA ops past MAX_GROUPS groups, for G = 0, and where this
  JAX no longer has Pallas' Triton backend (JAX 0.11 deprecates it).

  Args:
    group_sizes: int32 [G], rows per group; sum(group_sizes) <= m.
    m: rows of lhs and of the output.
    block_m: rows per tile.
    interpret: run the kernel in the Pallas interpreter (CPU).
  """
  g = group_sizes.shape[0]
  if plt is None or not 1 <= g <= MAX_GROUPS:
    return metadata_lib.gmm_metadata(group_sizes, m, block_m)
  num_items = metadata_lib.gmm_num_items(m, g, block_m)
  width = pl.next_power_of_2(g + 1)
  items_block = max(8, _TABLE_ELEMENTS // width)
  # Varying like group_sizes under jax.shard_map (check_vma needs it said).
  axes = jax.typeof(group_sizes).manual_axis_type
  item_array = jax.ShapeDtypeStruct((num_items,), jnp.int32, manual_axis_type=axes)
  outs = pl.pallas_call(
      functools.partial(_gmm_kernel, num_groups=g, m=m, block_m=block_m,
                        num_items=num_items, width=width, items_block=items_block),
      out_shape=[item_array] * 5 + [jax.ShapeDtypeStruct((2,), jnp.int32,
                                                         manual_axis_type=axes)],
      grid=(pl.cdiv(num_items, items_block),),
      compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret, name="gmm_metadata",
  )(group_sizes.astype(jnp.int32))
  return metadata_lib.GmmMetadata(*outs)
