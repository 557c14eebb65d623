"""Group/tile bookkeeping for the grouped GEMM kernels, computed with XLA ops.

The kernels read these small int32 arrays from global memory, one scalar per
work item, so the kernel body has no Python loop over the groups: G = 256
lowers to the same code as G = 1.

gmm (out [M, N] = rows of lhs times their group's rhs)
------------------------------------------------------
Rows [0, M) are cut into segments: group 0, group 1, ..., group G-1, and a final
"padding" segment [sum(group_sizes), M) whose output rows must be zeros. Each
segment is cut into tiles of block_m rows counted from its own first row
rounded down to a multiple of 8 (TMA reads lhs in 8-row tiles), not from row 0,
so a group of s rows costs about cdiv(s, block_m) tiles wherever it starts::

    rows   |---- group 0 ----|------- group 1 -------|-- pad --|
    items  [  0   ][  1  ]  [  2   ][  3   ][  4  ]  [  5  ]
                            tile_row0 of item 2 = start of group 1, rounded down to 8

Each item computes a full block_m-row tile of lhs @ rhs[group] (rows past the
segment belong to the next one and are computed but not stored) and stores only
rows [row_start, row_end). A tile that would run past M is moved up to end at M
(tile_row0 = M - block_m), so every load stays in bounds. Padding items compute
nothing and store zeros. The G + 1 segments together take at most
(M + (G + 1) * (block_m + 6)) / block_m tiles, which `gmm_num_items` rounds up to
a static bound; unused items have row_start == row_end and do nothing.

tgmm (out [G, K, N], out[g] = lhs_g.T @ rhs_g)
----------------------------------------------
Per group: blocks of block_m rows counted from the group's first row rounded
down to 8, so a group of s rows takes cdiv(s + row_start % 8, block_m) blocks.
Only the first block (up to 7 rows of the previous group) and the last one
(rows of the next groups or padding) hold rows of others; the kernel masks them::

    rows    |.. group g-1 ..|====== group g ======|.. group g+1 ..
    blocks              [  b0   ][  b1   ][  b2   ]
                        ^ first_row = row_start rounded down to 8
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GmmMetadata:
  """Work items of `gmm_mgpu`, each an int32 array of shape [num_items].

  Attributes:
    group_id: the rhs group the item multiplies by, in [0, G) (clamped to a
      valid group for padding and unused items, which never read it).
    tile_row0: first lhs row of the item's block_m-row tile: a multiple of 8,
      not of block_m; max(0, M - block_m) at most.
    row_start: first output row (absolute) the item writes, >= tile_row0.
    row_end: one past the last output row the item writes (== row_start for an
      unused item), <= tile_row0 + block_m.
    compute: 1 if the rows are lhs @ rhs[group_id], 0 if they are zeros
      (padding rows past sum(group_sizes), or an unused item).
    counts: int32 [2]: the number of compute items C and of used items U.
      Items [0, C) compute, [C, U) are padding, [U, num_items) are unused.
  """
  group_id: jax.Array
  tile_row0: jax.Array
  row_start: jax.Array
  row_end: jax.Array
  compute: jax.Array
  counts: jax.Array

  @property
  def num_items(self) -> int:
    return self.group_id.shape[0]

  def arrays(self) -> tuple[jax.Array, ...]:
    return (self.group_id, self.tile_row0, self.row_start, self.row_end, self.compute,
            self.counts)


def gmm_num_items(m: int, num_groups: int, block_m: int) -> int:
  """Static upper bound on the number of gmm work items (see the module docstring)."""
  return -(-(m + (num_groups + 1) * (block_m + 6)) // block_m)


def gmm_metadata(group_sizes: jax.Array, m: int, block_m: int) -> GmmMetadata:
  """Work items of gmm for lhs of `m` rows; see the module docstring.

  Args:
    group_sizes: int32 [G], rows per group; sum(group_sizes) <= m (larger sums are
      clipped to m).
    m: rows of lhs and of the output.
    block_m: rows per tile.
  """
  g = group_sizes.shape[0]
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  total = ends[-1] if g else jnp.int32(0)
  # Segment g (== G) is the padding tail.
  seg_start = jnp.concatenate([starts, total[None]])
  seg_end = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  tile_base = seg_start // 8 * 8
  num_tiles = jnp.where(seg_end > seg_start,
                        (seg_end - tile_base + block_m - 1) // block_m, 0)
  item_end = jnp.cumsum(num_tiles)
  item_begin = item_end - num_tiles

  item = jnp.arange(gmm_num_items(m, g, block_m), dtype=jnp.int32)
  # One broadcast compare instead of a binary search: on the GPU the default
  # search is a loop of small kernels, which cost 30-70 us per gmm call (H100).
  seg = jnp.searchsorted(item_end, item, side="right",
                         method="compare_all").astype(jnp.int32)
  used = seg <= g
  seg = jnp.minimum(seg, g)
  tile_start = tile_base[seg] + (item - item_begin[seg]) * block_m
  row_start = jnp.maximum(seg_start[seg], tile_start)
  row_end = jnp.minimum(seg_end[seg], tile_start + block_m)
  tile_row0 = jnp.clip(tile_start, 0, max(m - block_m, 0))
  zero = jnp.zeros_like(item)
  counts = jnp.stack([item_begin[g], item_end[g]]).astype(jnp.int32)
  return GmmMetadata(
      group_id=jnp.minimum(seg, max(g - 1, 0)),
      tile_row0=jnp.where(used, tile_row0, zero),
      row_start=jnp.where(used, row_start, zero),
      row_end=jnp.where(used, row_end, zero),
      compute=(used & (seg < g)).astype(jnp.int32),
      counts=counts,
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TgmmMetadata:
  """Per-group row ranges for `tgmm_mgpu`, each an int32 array of shape [G].

  Attributes:
    row_start: first row of the group (exclusive prefix sum of group_sizes).
    row_end: one past its last row (clipped to M).
    first_row: first row of the group's first block: row_start rounded down to
      a multiple of 8 (TMA reads lhs and rhs in 8-row tiles).
    num_blocks: block_m-row blocks from first_row that cover the group (0 for
      an empty group).
  """
  row_start: jax.Array
  row_end: jax.Array
  first_row: jax.Array
  num_blocks: jax.Array

  def arrays(self) -> tuple[jax.Array, ...]:
    return (self.row_start, self.row_end, self.first_row, self.num_blocks)


def tgmm_metadata(group_sizes: jax.Array, m: int, block_m: int) -> TgmmMetadata:
  """Row ranges of each group for tgmm over `m` rows; see the module docstring."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  first_row = starts // 8 * 8
  num_blocks = jnp.where(ends > starts, (ends - first_row + block_m - 1) // block_m, 0)
  return TgmmMetadata(row_start=starts, row_end=ends, first_row=first_row,
                      num_blocks=num_blocks.astype(jnp.int32))
