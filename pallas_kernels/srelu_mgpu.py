"""Scaled squared ReLU as standalone Mosaic GPU kernels (the unfused path), and the
tile math that the fused GEMM epilogues share.

    forward:   a  = relu(h)**2 * p[:, None]
    backward:  dh = da * p[:, None] * 2 * relu(h)
               dp = sum_j da_j * relu(h_j)**2

Each kernel block handles a [block_m, block_f] tile: TMA in, math in registers
(float32, WGMMA layout, p broadcast along rows), TMA out. Rows past M are read as
zeros and never stored (TMA clips), so any M works.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels import gmm_mgpu

ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)  # a [block_m] vector, one value per tile row


@dataclasses.dataclass(frozen=True)
class SReLUConfig:
  """A kernel block is block_m rows (any M: the last block is clipped) by block_f
  columns (a multiple of 64 that divides F)."""
  block_m: int = 64
  block_f: int = 128


def srelu_config(f: int) -> SReLUConfig:
  """The default: 64 x 128 blocks, 64 x 64 where F (a multiple of 64) is not a
  multiple of 128."""
  return SReLUConfig(block_f=128 if f % 128 == 0 else 64)


def srelu_tile(h: jax.Array, p: jax.Array) -> jax.Array:
  """h [bm, bf] float32 (WGMMA layout), p [bm] float32 (ROW_LAYOUT) -> a, float32."""
  relu = jnp.maximum(h, 0.0)
  return relu * relu * lax.broadcast_in_dim(p, h.shape, [0])


def dsrelu_tile(da: jax.Array, h: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(da, h) [bm, bf] float32, p [bm] -> (dh [bm, bf], partial dp [bm] over these columns)."""
  relu = jnp.maximum(h, 0.0)
  dh = da * lax.broadcast_in_dim(p, h.shape, [0]) * (2.0 * relu)
  return dh, jnp.sum(da * relu * relu, axis=1)


def check_supported(h: jax.Array, interpret: bool,
                    cfg: SReLUConfig | None = None) -> SReLUConfig:
  """Raises NotImplementedError for inputs the kernels do not take (a dtype other
  than bf16/fp16, F not a multiple of 64 or of cfg.block_f); returns the config,
  by default `srelu_config(F)`."""
  if h.dtype not in gmm_mgpu.SUPPORTED_IN_DTYPES:
    raise NotImplementedError(f"scaled SReLU kernels take bf16 or fp16, not {h.dtype}.")
  f = h.shape[1]
  common.check_kernel_multiple("F", f)
  cfg = cfg or srelu_config(f)
  if f % cfg.block_f:
    raise NotImplementedError(f"F={f} is not a multiple of block_f={cfg.block_f}.")
  gmm_mgpu.check_hopper(interpret)
  return cfg


def _launch(body, out_type, m: int, f: int, cfg: SReLUConfig, interpret: bool):
  return gmm_mgpu.warpgroup_kernel(
      body, out_type=out_type,
      grid=(pl.cdiv(m, cfg.block_m), f // cfg.block_f), grid_names=("m", "f"),
      interpret=interpret)


def _tile_slices(cfg: SReLUConfig):
  i, j = lax.axis_index("m"), lax.axis_index("f")
  return pl.ds(i * cfg.block_m, cfg.block_m), pl.ds(j * cfg.block_f, cfg.block_f), j


def _load_tiles(pairs, barriers):
  """Copies each (gmem slice, smem) pair in with TMA and waits for all of them."""
  for idx, (src, dst) in enumerate(pairs):
    plgpu.copy_gmem_to_smem(src, dst, barriers.at[idx])
  for idx in range(len(pairs)):
    plgpu.barrier_wait(barriers.at[idx])


def scaled_srelu_fwd_mgpu(h: jax.Array, p: jax.Array, *, interpret: bool = False,
                          config: SReLUConfig | None = None) -> jax.Array:
  """a = relu(h)**2 * p[:, None]: h [M, F] bf16/fp16, p [M] float32 -> [M, F] in h.dtype."""
  cfg = check_supported(h, interpret, config)
  tile = (cfg.block_m, cfg.block_f)

  def body(h_gmem, p_gmem, a_gmem):
    rows, cols, _ = _tile_slices(cfg)

    def scoped(h_smem, p_smem, barriers):
      _load_tiles([(h_gmem.at[rows, cols], h_smem), (p_gmem.at[rows], p_smem)], barriers)
      a = srelu_tile(plgpu.load(h_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32),
                     plgpu.load(p_smem, layout=ROW_LAYOUT))
      h_smem[...] = a.astype(h_smem.dtype)  # The h tile is dead: reuse it for a.
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(h_smem, a_gmem.at[rows, cols])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM(tile, h.dtype), plgpu.SMEM((cfg.block_m,), jnp.float32),
                  plgpu.Barrier(num_barriers=2))

  out_type = jax.ShapeDtypeStruct(h.shape, h.dtype)
  return _launch(body, out_type, *h.shape, cfg, interpret)(h, p.astype(jnp.float32))


def scaled_srelu_bwd_mgpu(da: jax.Array, h: jax.Array, p: jax.Array, *,
                          interpret: bool = False, config: SReLUConfig | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """(da [M, F], h [M, F], p [M]) -> (dh [M, F] in h.dtype, dp [M] float32)."""
  cfg = check_supported(h, interpret, config)
  m, f = h.shape
  tile = (cfg.block_m, cfg.block_f)

  def body(da_gmem, h_gmem, p_gmem, dh_gmem, dp_part_gmem):
    rows, cols, f_tile = _tile_slices(cfg)

    def scoped(da_smem, h_smem, p_smem, dp_smem, barriers):
      _load_tiles([(da_gmem.at[rows, cols], da_smem), (h_gmem.at[rows, cols], h_smem),
                   (p_gmem.at[rows], p_smem)], barriers)
      load = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      dh, dp = dsrelu_tile(load(da_smem), load(h_smem), plgpu.load(p_smem, layout=ROW_LAYOUT))
      h_smem[...] = dh.astype(h_smem.dtype)
      dp_smem[...] = dp
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(h_smem, dh_gmem.at[rows, cols])
      plgpu.copy_smem_to_gmem(dp_smem, dp_part_gmem.at[f_tile, rows])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM(tile, da.dtype), plgpu.SMEM(tile, h.dtype),
                  plgpu.SMEM((cfg.block_m,), jnp.float32),
                  plgpu.SMEM((cfg.block_m,), jnp.float32), plgpu.Barrier(num_barriers=3))

  out_type = (jax.ShapeDtypeStruct(h.shape, h.dtype),
              jax.ShapeDtypeStruct((f // cfg.block_f, m), jnp.float32))
  dh, dp_partial = _launch(body, out_type, m, f, cfg, interpret)(
      da.astype(h.dtype), h, p.astype(jnp.float32))
  return dh, jnp.sum(dp_partial, axis=0)
