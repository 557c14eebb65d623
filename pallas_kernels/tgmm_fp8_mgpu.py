"""Blockwise-scaled FP8 weight-gradient GEMM, `tgmm_fp8_mgpu`: a persistent Mosaic GPU kernel.

out[g] = dequant(lhs)[rows of g].T @ dequant(rhs)[rows of g] for lhs [M, K] and
rhs [M, N] sorted by group, read in the group-aligned transposed layout of
`quantize.quantize_columns`:

  lhs  values [K, P] e4m3, scales [P // 128, K] f32   (1x128 tiles of lhs.T)
  rhs  values [N, P] e4m3, scales [P // 128, N] f32   (1x128 tiles of rhs.T)

Hopper's FP8 wgmma reads both operands K-major, here with the contracted rows
contiguous, hence the transposed layouts. Each group starts a fresh 128-row
block of P (`quantize.group_blocks`), so no scale tile spans two groups and no
block needs masking, unlike bf16's `tgmm_mgpu`.

Design: work items are (group, k-tile, n-tile) triples in a persistent loop over
the SMs (`tgmm_mgpu`'s); each runs a pipeline over its group's 128-row blocks,
loading the lhs tile [block_k, 128], the rhs tile [block_n, 128] and both tiles'
scales [1, block_k] and [1, block_n] by TMA, and promotes each block's partial
sum in float32 registers (as `gmm_fp8_mgpu`):

    acc += (lhs_tile @ rhs_tile.T) * lhs_scales[:, None] * rhs_scales[None, :]

An empty group runs no pipeline and stores zeros. The output tile goes out
through shared memory by TMA (`tgmm_mgpu._store_tile`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import config as config_lib
from pallas_kernels import gmm_mgpu
from pallas_kernels import quantize
from pallas_kernels import srelu_mgpu
from pallas_kernels.gmm_fp8_mgpu import check_dtypes, partial_sum
from pallas_kernels.tgmm_mgpu import _item_tiles, _store_tile

BLOCK = quantize.BLOCK
# A [block_n] vector, one value per tile column.
COL_LAYOUT = plgpu.Layout.WGMMA.reduce(0)


def _check_shapes(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes) -> None:
  """ValueError unless the operands have the shapes of `quantize_columns`' layout."""
  k, p = lhs_values.shape
  n = rhs_values.shape[0]
  expected = {"lhs_scales": (p // BLOCK, k), "rhs_values": (n, p),
              "rhs_scales": (p // BLOCK, n)}
  got = {"lhs_scales": lhs_scales.shape, "rhs_values": rhs_values.shape,
         "rhs_scales": rhs_scales.shape}
  for name, shape in expected.items():
    if tuple(got[name]) != shape:
      raise ValueError(
          f"Expected '{name}' of shape {shape} for lhs_values [K, P] = {(k, p)}, got "
          f"{tuple(got[name])}.")
  if p % BLOCK:
    raise ValueError(f"Expected P, the group-aligned rows, a multiple of {BLOCK}; got {p}.")
  if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
    raise ValueError(f"Expected int32 'group_sizes' of shape [G], got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}.")


def check_supported(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes, *,
                    out_dtype, interpret: bool,
                    config: config_lib.Fp8TgmmConfig | None) -> config_lib.Fp8TgmmConfig:
  """Raises ValueError for inconsistent shapes, NotImplementedError for inputs the
  kernel does not take; returns the config."""
  _check_shapes(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes)
  check_dtypes("FP8 tgmm", lhs_values, lhs_scales, rhs_values, rhs_scales, out_dtype)
  k, n, out_itemsize = lhs_values.shape[0], rhs_values.shape[0], jnp.dtype(out_dtype).itemsize
  cfg = config or config_lib.fp8_tgmm_config(k, n, out_itemsize)
  cfg.validate_for(k, n, 1, out_itemsize)
  gmm_mgpu.check_hopper(interpret)
  return cfg


def _scaled(partial, lhs_scales_smem, rhs_scales_smem):
  """partial [block_k, block_n] * lhs scales [block_k] (rows) * rhs scales [block_n]
  (columns), both from shared memory."""
  rows = plgpu.load(lhs_scales_smem, layout=srelu_mgpu.ROW_LAYOUT)
  cols = plgpu.load(rhs_scales_smem, layout=COL_LAYOUT)
  return (partial * lax.broadcast_in_dim(rows, partial.shape, [0])
          * lax.broadcast_in_dim(cols, partial.shape, [1]))


def _tgmm_fp8_kernel(first_block_gmem, num_blocks_gmem, lhs_gmem, rhs_gmem,
                     lhs_scales_gmem, rhs_scales_gmem, out_gmem, *, cfg):
  num_groups = out_gmem.shape[0]
  k, n = lhs_gmem.shape[0], rhs_gmem.shape[0]
  bk, bn = cfg.block_k, cfg.block_n
  grid_k, grid_n = k // bk, n // bn
  zeros = plgpu.layout_cast(jnp.zeros((bk, bn), jnp.float32), plgpu.Layout.WGMMA)

  @functools.partial(
      pl.run_scoped,
      o_smem=plgpu.SMEM((cfg.staged_rows, cfg.staged_cols), out_gmem.dtype,
                        transforms=gmm_mgpu._smem_transforms(cfg.staged_cols,
                                                             out_gmem.dtype)))
  def _(o_smem):
    @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
    def _item_loop(loop_info: plgpu.NDLoopInfo):
      g, k_tile, n_tile = _item_tiles(loop_info, grid_k, grid_n, cfg)
      first_block, num_blocks = first_block_gmem[g], num_blocks_gmem[g]

      def step(indices, lhs_smem, rhs_smem, lhs_scales_smem, rhs_scales_smem, acc):
        del indices
        return acc + _scaled(partial_sum(lhs_smem, rhs_smem), lhs_scales_smem.at[0],
                             rhs_scales_smem.at[0])

      def accumulate():
        return plgpu.emit_pipeline(
            step,
            grid=(num_blocks,),
            in_specs=[
                plgpu.BlockSpec((bk, BLOCK), lambda b: (k_tile, first_block + b)),
                plgpu.BlockSpec((bn, BLOCK), lambda b: (n_tile, first_block + b)),
                plgpu.BlockSpec((1, bk), lambda b: (first_block + b, k_tile)),
                plgpu.BlockSpec((1, bn), lambda b: (first_block + b, n_tile)),
            ],
            max_concurrent_steps=cfg.max_concurrent_steps,
            init_carry=zeros,
        )(lhs_gmem, rhs_gmem, lhs_scales_gmem, rhs_scales_gmem)

      # An empty group stores the zero tile.
      acc = lax.cond(num_blocks > 0, accumulate, lambda: zeros)
      _store_tile(acc, o_smem, out_gmem.at[g], k_tile, n_tile, cfg)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _tgmm_fp8_kernel_ws(first_block_gmem, num_blocks_gmem, lhs_gmem, rhs_gmem,
                        lhs_scales_gmem, rhs_scales_gmem, out_gmem, *, cfg):
  """Warp-specialised (cfg.num_compute_wgs == 2): warpgroup 2 issues the TMA loads
  of each item's row blocks, consumer warpgroups 0 and 1 promote those of the left
  and right (cfg.split_rows: top and bottom) block_k x block_n halves of the item's
  tile, so that one's promotion runs while the other's wgmma does, and store them."""
  num_groups = out_gmem.shape[0]
  bk, bn, cta_k, cta_n = cfg.block_k, cfg.block_n, cfg.cta_tile_rows, cfg.cta_block_n
  grid_k, grid_n = lhs_gmem.shape[0] // cta_k, rhs_gmem.shape[0] // cta_n
  transforms = gmm_mgpu._smem_transforms(BLOCK, lhs_gmem.dtype)

  def get_pipeline(body, compute_context, k_tile=0, n_tile=0, first_block=0,
                   num_blocks=cfg.max_concurrent_steps):
    """The pipeline over one group's row blocks (the defaults: a static grid as deep
    as the pipeline, for its allocations)."""
    def spec(shape, index_map, **kwargs):
      return plgpu.BlockSpec(shape, index_map, memory_space=plgpu.SMEM, **kwargs)

    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(num_blocks,),
        memory_registers=40,
        in_specs=[
            spec((cta_k, BLOCK), lambda b: (k_tile, first_block + b), transforms=transforms),
            spec((cta_n, BLOCK), lambda b: (n_tile, first_block + b), transforms=transforms),
            spec((1, cta_k), lambda b: (first_block + b, k_tile)),
            spec((1, cta_n), lambda b: (first_block + b, n_tile)),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  operands = (lhs_gmem, rhs_gmem, lhs_scales_gmem, rhs_scales_gmem)
  ignore = lambda *_, **__: None  # noqa: E731 -- allocations ignore the bodies

  @functools.partial(
      pl.run_scoped,
      pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(*operands),
      o_smem=plgpu.SMEM((2, cfg.staged_rows, cfg.staged_cols), out_gmem.dtype,
                        transforms=gmm_mgpu._smem_transforms(cfg.staged_cols,
                                                             out_gmem.dtype)),
      collective_axes="wg",
  )
  def _(pipeline_allocs, o_smem):
    wg = lax.axis_index("wg")
    zeros = plgpu.layout_cast(jnp.zeros((bk, bn), jnp.float32), plgpu.Layout.WGMMA)

    def mma(_, lhs_smem, rhs_smem, lhs_scales_smem, rhs_scales_smem, acc):
      if cfg.split_rows:
        rows = pl.ds(wg * bk, bk)
        lhs_smem, lhs_scales = lhs_smem.at[rows], lhs_scales_smem.at[0, rows]
        rhs_scales = rhs_scales_smem.at[0]
      else:
        cols = pl.ds(wg * bn, bn)
        rhs_smem, rhs_scales = rhs_smem.at[cols], rhs_scales_smem.at[0, cols]
        lhs_scales = lhs_scales_smem.at[0]
      return acc + _scaled(partial_sum(lhs_smem, rhs_smem), lhs_scales, rhs_scales)

    def store(acc, g, k_tile, n_tile):
      k_tile, n_tile = ((k_tile * 2 + wg, n_tile) if cfg.split_rows
                        else (k_tile, n_tile * 2 + wg))
      _store_tile(acc, o_smem.at[wg], out_gmem.at[g], k_tile, n_tile, cfg)

    @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
    def _item_loop(loop_info: plgpu.NDLoopInfo):
      g, k_tile, n_tile = _item_tiles(loop_info, grid_k, grid_n, cfg)
      first_block, num_blocks = first_block_gmem[g], num_blocks_gmem[g]

      @pl.when(num_blocks > 0)
      def _():
        get_pipeline(mma, lambda pipeline: store(pipeline(zeros), g, k_tile, n_tile),
                     k_tile, n_tile, first_block, num_blocks)(
            *operands, allocations=pipeline_allocs)

      # An empty group's tiles: zeros, written by the consumers.
      pl.when((num_blocks == 0) & (wg < 2))(lambda: store(zeros, g, k_tile, n_tile))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm_fp8_mgpu(lhs_values: jax.Array, lhs_scales: jax.Array, rhs_values: jax.Array,
                  rhs_scales: jax.Array, group_sizes: jax.Array, *, num_rows: int,
                  out_dtype=jnp.float32, interpret: bool = False,
                  config: config_lib.Fp8TgmmConfig | None = None) -> jax.Array:
  """Blockwise-scaled FP8 transposed grouped matmul (the weight gradient).

  out[g] = (lhs * lhs_scales)[rows of g].T @ (rhs * rhs_scales)[rows of g], each
  scale broadcast over its 128-row tile, on `quantize.quantize_columns` layouts.

  Args:
    lhs_values: [K, P] float8_e4m3fn, `quantize_columns(lhs, group_sizes).values`
      for lhs [num_rows, K].
    lhs_scales: [P // 128, K] float32, its `.scales`.
    rhs_values: [N, P] float8_e4m3fn, `quantize_columns(rhs, group_sizes).values`
      for rhs [num_rows, N].
    rhs_scales: [P // 128, N] float32.
    group_sizes: int32 [G], the sizes both were quantised with.
    num_rows: M, the rows of lhs and rhs before alignment.
    out_dtype: bf16 or f32; accumulation is float32.
    interpret: run the same kernel in the Pallas Mosaic GPU interpreter (CPU).
    config: block sizes; default `config.fp8_tgmm_config(K, N)`.

  Returns:
    [G, K, N] in out_dtype; zeros for empty groups.

  Raises:
    ValueError: for shapes that do not fit together.
    NotImplementedError: for inputs the kernel does not support (dtypes, K or N
      not a multiple of the block sizes, no Hopper GPU).
  """
  out_dtype = jnp.dtype(out_dtype)
  cfg = check_supported(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes,
                        out_dtype=out_dtype, interpret=interpret, config=config)
  k, n, g = lhs_values.shape[0], rhs_values.shape[0], group_sizes.shape[0]
  blocks = quantize.group_blocks(group_sizes, num_rows)
  warp_specialized = cfg.num_compute_wgs > 1
  kernel = gmm_mgpu.warpgroup_kernel(
      functools.partial(_tgmm_fp8_kernel_ws if warp_specialized else _tgmm_fp8_kernel,
                        cfg=cfg),
      out_type=jax.ShapeDtypeStruct((g, k, n), out_dtype),
      grid=(config_lib.num_sms(),), grid_names=("sm",),
      num_threads=3 if warp_specialized else None, interpret=interpret)
  return kernel(blocks.first, blocks.count, lhs_values, rhs_values, lhs_scales, rhs_scales)
