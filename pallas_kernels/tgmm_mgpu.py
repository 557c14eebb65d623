"""Transposed grouped GEMM, `tgmm_mgpu`: out[g] = lhs_g.T @ rhs_g (weight gradients).

A persistent Pallas Mosaic GPU kernel for Hopper. Work items are (group, k-tile,
n-tile) triples; each runs a TMA + wgmma pipeline over the row blocks its group
touches (`metadata.tgmm_metadata`, computed with XLA ops, so no loop over groups
in the kernel) and writes one block_k x block_n tile of out[g]. An empty group
runs no pipeline and writes the zero accumulator. Two kernels: one warpgroup
with a pipeline per item (`_tgmm_kernel`), or, the default, warp-specialised
(`_tgmm_kernel_ws`): a producer warpgroup streams the row blocks of all of an
SM's items through one ring of buffers, so short items (small groups) do not
each pay for filling a pipeline, to one consumer warpgroup or, with
config.num_compute_wgs=2, to two that compute the halves of a wider tile: side
by side, sharing its lhs tile, or (config.split_rows, the default) one above the
other, sharing its rhs tile.

Row blocks are block_m rows of lhs [M, K] and rhs [M, N], counted from the
group's first row rounded down to 8. A group's first block can hold up to 7
rows of the previous group, its last block rows of the next groups, padding
rows past the sum, or rows past M that TMA fills with zeros::

    rows:   |.. group g-1 ..|==== group g ====|.. group g+1 ..|
    blocks:              [    b0    ][    b1    ]
                          ^ masked          ^ masked

In a block that straddles the group's bounds, the other rows are set to zero in
shared memory before the wgmma reads them: in lhs only (0 * x = 0 for the
finite rows of other groups), and also in rhs where the block reaches past
sum(group_sizes), so that a NaN in a padding row cannot leak in through
0 * NaN. In the warp-specialised kernel the producer warpgroup masks, a few
steps behind its loads, so the consumers never stop for it. Output tiles go out
by TMA (config.epilogue_rows rows at a time) and the last store of a tile is
left in flight over the next item's main loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels import config as config_lib
from pallas_kernels import metadata as metadata_lib
from pallas_kernels.gmm_mgpu import (_smem_transforms, check_dtypes, check_hopper, stage,
                                     tile_chunk, warpgroup_kernel)


def check_supported(lhs, rhs, group_sizes, *, out_dtype=None, interpret: bool = False,
                    config: config_lib.TgmmConfig | None = None) -> config_lib.TgmmConfig:
  """Raises NotImplementedError for inputs `tgmm_mgpu` does not handle; returns the config.

  Supported: bf16/fp16 operands of one dtype, M a positive multiple of 8, K and
  N multiples of 64 (and of the block sizes), a Hopper GPU unless interpreting.
  """
  out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
  check_dtypes(lhs.dtype, rhs.dtype, out_dtype)
  (m, k), n = lhs.shape, rhs.shape[1]
  common.check_kernel_sizes(m, k, n)
  if config is None:
    config = config_lib.tgmm_config(m, k, n, group_sizes.shape[0], out_dtype.itemsize,
                                    dtype=lhs.dtype)
  config.validate_for(k, n, jnp.dtype(lhs.dtype).itemsize, out_dtype.itemsize)
  check_hopper(interpret)
  return config


def _mask_rows(x_smem, block_row0, row_start, row_end):
  """Zeroes rows of a [block_m, cols] smem tile outside [row_start, row_end)."""
  x = x_smem[...]
  rows = block_row0 + plgpu.layout_cast(
      lax.broadcasted_iota(jnp.int32, x.shape, 0), plgpu.Layout.WGMMA)
  keep = (rows >= row_start) & (rows < row_end)
  x_smem[...] = jnp.where(keep, x, jnp.zeros_like(x))


def _straddles(block_row0, row_start, row_end, cfg):
  """Whether a row block holds rows outside the group's [row_start, row_end)."""
  return (block_row0 < row_start) | (block_row0 + cfg.block_m > row_end)


def _mask_outside_group(lhs_smem, rhs_smem, block_row0, row_start, row_end, total, cfg):
  """Zeroes the rows of a straddling block outside the group: in lhs, and in rhs
  too where the block reaches the padding rows past `total` (which may hold NaN:
  0 * NaN would leak it); then fences them for the wgmma (the async proxy).
  """
  _mask_rows(lhs_smem, block_row0, row_start, row_end)
  pl.when(block_row0 + cfg.block_m > total)(
      lambda: _mask_rows(rhs_smem, block_row0, row_start, row_end))
  plgpu.commit_smem()


def _block_row0(first_row, b, cfg):
  """First row of a group's row block b (a multiple of 8, which TMA needs)."""
  return pl.multiple_of(first_row + b * cfg.block_m, 8)


def _item_tiles(loop_info: plgpu.NDLoopInfo, grid_k: int, grid_n: int, cfg):
  """(group, k-tile, n-tile) of an item of the (G, grid_k * grid_n) item loop."""
  k_tile, n_tile = plgpu.planar_snake(
      loop_info.index[1], (grid_k, grid_n), 1, cfg.grid_block_n)
  return loop_info.index[0], k_tile, n_tile


def _tgmm_kernel(row_start_gmem, row_end_gmem, first_row_gmem, num_blocks_gmem,
                 lhs_gmem, rhs_gmem, out_gmem, *, cfg):
  num_groups = out_gmem.shape[0]
  k, n = lhs_gmem.shape[1], rhs_gmem.shape[1]
  grid_k, grid_n = k // cfg.block_k, n // cfg.block_n
  lhs_transforms = _smem_transforms(cfg.block_k, lhs_gmem.dtype)
  rhs_transforms = _smem_transforms(cfg.block_n, rhs_gmem.dtype)
  out_transforms = _smem_transforms(cfg.staged_cols, out_gmem.dtype)
  total = row_end_gmem[num_groups - 1]

  @functools.partial(
      pl.run_scoped,
      o_smem=plgpu.SMEM((cfg.staged_rows, cfg.staged_cols), out_gmem.dtype,
                        transforms=out_transforms))
  def _(o_smem):
    @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
    def _item_loop(loop_info: plgpu.NDLoopInfo):
      g, k_tile, n_tile = _item_tiles(loop_info, grid_k, grid_n, cfg)
      row_start, row_end = row_start_gmem[g], row_end_gmem[g]
      first_row, num_blocks = first_row_gmem[g], num_blocks_gmem[g]

      def acc_scope(acc_ref):
        def step(idx, lhs_smem, rhs_smem):
          (b,) = idx

          block_row0 = _block_row0(first_row, b, cfg)
          pl.when(_straddles(block_row0, row_start, row_end, cfg))(
              lambda: _mask_outside_group(lhs_smem, rhs_smem, block_row0, row_start,
                                          row_end, total, cfg))
          plgpu.wgmma(acc_ref, lhs_smem.T, rhs_smem)
          if cfg.max_concurrent_steps == 1:
            # Without a second buffer the slot must be free before the next load.
            plgpu.wgmma_wait(0)

        release = 1 if cfg.max_concurrent_steps > 1 else 0

        @pl.when(num_blocks > 0)  # An empty group keeps the zero accumulator.
        def _():
          plgpu.emit_pipeline(
              step,
              grid=(num_blocks,),
              in_specs=[
                  plgpu.BlockSpec((pl.Element(cfg.block_m), cfg.block_k),
                                  lambda b: (_block_row0(first_row, b, cfg), k_tile),
                                  transforms=lhs_transforms, delay_release=release),
                  plgpu.BlockSpec((pl.Element(cfg.block_m), cfg.block_n),
                                  lambda b: (_block_row0(first_row, b, cfg), n_tile),
                                  transforms=rhs_transforms, delay_release=release),
              ],
              max_concurrent_steps=cfg.max_concurrent_steps,
          )(lhs_gmem, rhs_gmem)
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((cfg.block_k, cfg.block_n)))
      _store_tile(acc, o_smem, out_gmem.at[g], k_tile, n_tile, cfg)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _tgmm_kernel_ws(row_start_gmem, row_end_gmem, first_row_gmem, num_blocks_gmem,
                    lhs_gmem, rhs_gmem, out_gmem, *, cfg):
  """Warp-specialised tgmm (cfg.warp_specialized): the last warpgroup loads and
  masks, cfg.num_compute_wgs consumer warpgroups compute.

  All walk the same (group, k-tile, n-tile) items and count their row blocks
  with one running step t across items; step t uses ring slot t % S. The
  producer waits for every consumer to release a slot (`consumed`) before it
  reloads it, so the loads of an item's first blocks overlap the previous
  item's last wgmmas and its store. The consumers wait for a block's loads
  (`produced`), or, for a block that straddles the group's bounds, for the
  producer to have masked it (`masked`): the producer loads such a block
  against its own barrier (`landed`), and S-1 steps later, when the load has
  most likely landed, waits for it, masks it and signals `masked`. So the
  masking runs beside the consumers' wgmmas, not in their way. With two
  consumers, consumer c computes columns [c, c+1) * block_n of the item's
  block_k x (2*block_n) tile, or with cfg.split_rows its rows [c, c+1) * block_k
  of a (2*block_k) x block_n tile.
  """
  num_groups = out_gmem.shape[0]
  k, n = lhs_gmem.shape[1], rhs_gmem.shape[1]
  bm, bk, bn = cfg.block_m, cfg.block_k, cfg.block_n
  cta_k, cta_n = cfg.cta_tile_rows, cfg.cta_block_n
  num_consumers = cfg.num_compute_wgs
  slots = cfg.max_concurrent_steps
  grid_k, grid_n = k // cta_k, n // cta_n
  total = row_end_gmem[num_groups - 1]

  def for_each_item(body, init_carry):
    """body(g, k_tile, n_tile, carry) -> carry over this SM's items."""
    @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm",
                   init_carry=init_carry)
    def _item_loop(loop_info: plgpu.NDLoopInfo, carry):
      return body(*_item_tiles(loop_info, grid_k, grid_n, cfg), carry)
    return _item_loop

  @functools.partial(
      pl.run_scoped,
      lhs_smem=plgpu.SMEM((slots, bm, cta_k), lhs_gmem.dtype,
                          transforms=_smem_transforms(cta_k, lhs_gmem.dtype)),
      rhs_smem=plgpu.SMEM((slots, bm, cta_n), rhs_gmem.dtype,
                          transforms=_smem_transforms(cta_n, rhs_gmem.dtype)),
      o_smem=plgpu.SMEM((num_consumers, cfg.staged_rows, cfg.staged_cols), out_gmem.dtype,
                        transforms=_smem_transforms(cfg.staged_cols, out_gmem.dtype)),
      produced=plgpu.Barrier(num_arrivals=2, num_barriers=slots),
      landed=plgpu.Barrier(num_arrivals=2, num_barriers=slots),
      masked=plgpu.Barrier(num_arrivals=1, num_barriers=slots),
      consumed=plgpu.Barrier(num_arrivals=num_consumers, num_barriers=slots),
      collective_axes="wg",
  )
  def _(lhs_smem, rhs_smem, o_smem, produced, landed, masked, consumed):
    wg = lax.axis_index("wg")

    @pl.when(wg == num_consumers)
    def _producer():
      def mask_pending(block):
        """Masks a block loaded S-1 steps ago if it straddles its group's bounds.

        `block` is (loaded, slot, group, block index), loop indices only (under
        shard_map a value loaded from memory would change the carry's type).
        """
        loaded, slot, g, b = block
        row_start, row_end = row_start_gmem[g], row_end_gmem[g]
        block_row0 = _block_row0(first_row_gmem[g], b, cfg)

        @pl.when((loaded != 0) & _straddles(block_row0, row_start, row_end, cfg))
        def _():
          plgpu.barrier_wait(landed.at[slot])
          _mask_outside_group(lhs_smem.at[slot], rhs_smem.at[slot], block_row0,
                              row_start, row_end, total, cfg)
          plgpu.barrier_arrive(masked.at[slot])

      def produce(g, k_tile, n_tile, carry):
        row_start, row_end = row_start_gmem[g], row_end_gmem[g]
        first_row = first_row_gmem[g]

        def step(b, carry):
          t, pending = carry
          # Block t - (S-1), loaded S-1 steps ago (so most likely landed by now),
          # is masked before the wait for slot t's release: the consumers need it
          # before they release that slot.
          mask_pending(pending[0])
          slot = lax.rem(t, slots)
          pl.when(t >= slots)(lambda: plgpu.barrier_wait(consumed.at[slot]))
          block_row0 = _block_row0(first_row, b, cfg)
          rows = pl.ds(block_row0, bm)
          straddles = _straddles(block_row0, row_start, row_end, cfg)

          def load(barrier):
            plgpu.copy_gmem_to_smem(lhs_gmem.at[rows, pl.ds(k_tile * cta_k, cta_k)],
                                    lhs_smem.at[slot], barrier.at[slot])
            plgpu.copy_gmem_to_smem(rhs_gmem.at[rows, pl.ds(n_tile * cta_n, cta_n)],
                                    rhs_smem.at[slot], barrier.at[slot])

          pl.when(straddles)(lambda: load(landed))
          pl.when(~straddles)(lambda: load(produced))
          return t + 1, (*pending[1:], (jnp.int32(1), slot, g, b))

        return lax.fori_loop(0, num_blocks_gmem[g], step, carry)

      zero = jnp.int32(0)
      # The last S-1 blocks loaded, oldest first (entries not loaded mask nothing).
      steps, pending = for_each_item(produce, (zero, ((zero,) * 4,) * (slots - 1)))
      for block in pending:
        mask_pending(block)
      # Observe the last releases, so no barrier is left with an unseen phase.
      for i in range(slots):
        t = steps - slots + i
        pl.when(t >= 0)(lambda t=t: plgpu.barrier_wait(consumed.at[lax.rem(t, slots)]))

    @pl.when(wg < num_consumers)
    def _consumer():
      def consume(g, k_tile, n_tile, t):
        row_start, row_end = row_start_gmem[g], row_end_gmem[g]
        first_row = first_row_gmem[g]

        def acc_scope(acc_ref):
          def step(b, t):
            slot = lax.rem(t, slots)
            straddles = _straddles(_block_row0(first_row, b, cfg), row_start, row_end, cfg)
            pl.when(straddles)(lambda: plgpu.barrier_wait(masked.at[slot]))
            pl.when(~straddles)(lambda: plgpu.barrier_wait(produced.at[slot]))
            if cfg.split_rows:
              plgpu.wgmma(acc_ref, lhs_smem.at[slot].at[:, pl.ds(wg * bk, bk)].T,
                          rhs_smem.at[slot])
            else:
              plgpu.wgmma(acc_ref, lhs_smem.at[slot].T,
                          rhs_smem.at[slot].at[:, pl.ds(wg * bn, bn)])
            # One wgmma stays in flight: the previous one is done, free its slot.
            plgpu.wgmma_wait(1)
            pl.when(b > 0)(lambda: plgpu.barrier_arrive(consumed.at[lax.rem(t - 1, slots)]))
            return t + 1

          num_blocks = num_blocks_gmem[g]
          t_end = lax.fori_loop(0, num_blocks, step, t)
          plgpu.wgmma_wait(0)
          pl.when(num_blocks > 0)(
              lambda: plgpu.barrier_arrive(consumed.at[lax.rem(t_end - 1, slots)]))
          return acc_ref[...], t_end

        # Named scopes are regions of the Mosaic GPU profiler's timeline
        # (benchmarks/profile_kernels.py); without the profiler they cost nothing.
        with jax.named_scope("mainloop"):
          acc, t = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn)))
        with jax.named_scope("epilogue"):
          # This consumer's block_k x block_n tile within the item's.
          wg_k_tile, wg_n_tile = ((k_tile * num_consumers + wg, n_tile) if cfg.split_rows
                                  else (k_tile, n_tile * num_consumers + wg))
          _store_tile(acc, o_smem.at[wg], out_gmem.at[g], wg_k_tile, wg_n_tile, cfg)
        return t

      for_each_item(consume, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _store_tile(acc, o_smem, out_g, k_tile, n_tile, cfg) -> None:
  """out_g[k-tile, n-tile] = acc via o_smem, a staged_rows x staged_cols chunk at
  a time; the last chunk's store drains under the next item.

  Each chunk waits first for the previous store to have read o_smem.
  """
  tile = acc.astype(o_smem.dtype)
  rows, cols = cfg.staged_rows, cfg.staged_cols
  for r in range(0, cfg.block_k, rows):
    for c in range(0, cfg.block_n, cols):
      stage(tile_chunk(tile, r, c, rows, cols), o_smem)
      plgpu.copy_smem_to_gmem(
          o_smem, out_g.at[pl.ds(k_tile * cfg.block_k + r, rows),
                           pl.ds(n_tile * cfg.block_n + c, cols)])


def tgmm_mgpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
              out_dtype=None, interpret: bool = False,
              config: config_lib.TgmmConfig | None = None) -> jax.Array:
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ rhs[rows of g].

  Args:
    lhs: [M, K] bf16 or fp16, rows sorted by group.
    rhs: [M, N], same dtype and row order.
    group_sizes: int32 [G]; sum(group_sizes) <= M; rows past the sum are ignored
      (they may hold anything, NaN too). A non-finite rhs value in a group's
      first or last 64-row block can reach the neighbouring group's result
      (its rows are zeroed in lhs only).
    out_dtype: bf16, fp16 or f32 (default lhs.dtype); accumulation is float32.
    interpret: run the same kernel in the Pallas Mosaic GPU interpreter (CPU).
    config: block sizes; default `config.tgmm_config(M, K, N, G)`.

  Returns:
    [G, K, N] in out_dtype; zeros for empty groups.

  Raises:
    NotImplementedError: for inputs the kernel does not support (see
      `check_supported`).
  """
  out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
  cfg = check_supported(lhs, rhs, group_sizes, out_dtype=out_dtype,
                        interpret=interpret, config=config)
  m, k = lhs.shape
  n = rhs.shape[1]
  g = group_sizes.shape[0]
  meta = metadata_lib.tgmm_metadata(group_sizes, m, cfg.block_m)
  ws = cfg.warp_specialized
  kernel = warpgroup_kernel(
      functools.partial(_tgmm_kernel_ws if ws else _tgmm_kernel, cfg=cfg),
      out_type=jax.ShapeDtypeStruct((g, k, n), out_dtype),
      grid=(config_lib.num_sms(),), grid_names=("sm",),
      num_threads=cfg.num_compute_wgs + 1 if ws else None, interpret=interpret)
  return kernel(*meta.arrays(), lhs, rhs)
