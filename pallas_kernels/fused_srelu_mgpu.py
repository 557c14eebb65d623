"""The expert MLP's activation fused into the grouped GEMM epilogues (Mosaic GPU).

FC1 forward, `gmm_srelu_mgpu`: from the float32 accumulator of x @ w1, one pass
writes h ("activation_input") and a = relu(h)**2 * p ("fc2_input"); no separate
activation kernel and no second read of h.

FC2 backward, `gmm_dsrelu_mgpu` (and `gmm_fp8_dsrelu_mgpu`: the same epilogue
after `gmm_fp8_mgpu`'s main loop): the input-gradient GEMM da = dy @ w2.T ends in
an epilogue that reads h and p and writes dh = da * p * 2 relu(h) and the per-row
dp = sum_j da_j relu(h_j)**2; da never reaches HBM. dp is summed over n-tiles: each
(item, n-tile) stores its [block_m] partial sums in its own slot, which a small
XLA scatter adds up by row (items of one tile own disjoint rows, see metadata.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels import config as config_lib
from pallas_kernels import gmm_fp8_mgpu
from pallas_kernels import gmm_mgpu
from pallas_kernels import srelu_mgpu

MAX_DSRELU_BLOCK_N = 128


def _load_rows(src_gmem, dst_smem, barrier) -> None:
  plgpu.copy_gmem_to_smem(src_gmem, dst_smem, barrier)
  plgpu.barrier_wait(barrier)


class _RowScaledEpilogue(gmm_mgpu.Epilogue):
  """Shared by both: reads p for the tile's rows into a [block_m] smem vector."""

  def check_supported(self, m, cfg):
    del m  # Fewer rows than block_m: the wrappers pad p and h to block_m rows.
    if not takes(cfg):
      raise NotImplementedError(
          "fused SReLU epilogues need split_rows=False and epilogue_cols=None.")

  def _load_p(self, p_gmem, p_smem, barrier, where):
    rows = pl.ds(pl.multiple_of(where["tile_row0"], 8), where["cfg"].block_m)
    _load_rows(p_gmem.at[rows], p_smem, barrier)
    return plgpu.load(p_smem, layout=srelu_mgpu.ROW_LAYOUT)


class SReLUEpilogue(_RowScaledEpilogue):
  """ins (p [M] f32,) -> outs (h [M, N], a [M, N])."""

  num_barriers = 1

  def out_types(self, m, n, out_dtype, num_items, cfg):
    return (jax.ShapeDtypeStruct((m, n), out_dtype),) * 2

  def scratch(self, cfg):
    return (((cfg.block_m,), jnp.float32),)

  def __call__(self, acc, o_smem, ins, outs, scratch, barriers, *, item, where):
    (p_gmem,), (h_gmem, a_gmem), (p_smem,) = ins, outs, scratch
    p = self._load_p(p_gmem, p_smem, barriers[0], where)
    h = acc.astype(h_gmem.dtype)
    gmm_mgpu.store_rows(h, o_smem, h_gmem, **where)
    # a from the rounded h, as the backward (which reads the stored h) sees it.
    a = srelu_mgpu.srelu_tile(h.astype(jnp.float32), p)
    gmm_mgpu.store_rows(a.astype(a_gmem.dtype), o_smem, a_gmem, **where)


class DSReLUEpilogue(_RowScaledEpilogue):
  """ins (h [M, N], p [M] f32) -> outs (dh [M, N], dp partials [items, N/block_n, block_m])."""

  num_barriers = 2

  def check_supported(self, m, cfg):
    super().check_supported(m, cfg)
    if cfg.staged_rows != cfg.block_m:
      raise NotImplementedError(
          "the dSReLU epilogue loads a whole h tile through the staging buffer: "
          f"it needs epilogue_rows=None or {cfg.block_m}, got {cfg.epilogue_rows}.")

  def out_types(self, m, n, out_dtype, num_items, cfg):
    return (jax.ShapeDtypeStruct((m, n), out_dtype),
            jax.ShapeDtypeStruct((num_items, n // cfg.block_n, cfg.block_m), jnp.float32))

  def scratch(self, cfg):
    return (((cfg.block_m,), jnp.float32), ((cfg.block_m,), jnp.float32))

  def __call__(self, acc, o_smem, ins, outs, scratch, barriers, *, item, where):
    (h_gmem, p_gmem), (dh_gmem, dp_gmem), (p_smem, dp_smem) = ins, outs, scratch
    cfg = where["cfg"]
    p = self._load_p(p_gmem, p_smem, barriers[0], where)
    # The h tile comes in through o_smem, once its previous stores have read it.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    rows = pl.ds(pl.multiple_of(where["tile_row0"], 8), cfg.block_m)
    cols = pl.ds(where["n_tile"] * cfg.block_n, cfg.block_n)
    _load_rows(h_gmem.at[rows, cols], o_smem.plain, barriers[1])
    h = plgpu.load(o_smem.plain, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    dh, dp = srelu_mgpu.dsrelu_tile(acc, h, p)
    dp_smem[...] = dp
    gmm_mgpu.store_rows(dh.astype(dh_gmem.dtype), o_smem, dh_gmem, **where)
    plgpu.copy_smem_to_gmem(dp_smem, dp_gmem.at[item, where["n_tile"]])


def takes(cfg: config_lib.GmmConfig) -> bool:
  """Whether the fused epilogues run with cfg: the dp partial slots are per
  (item, n-tile), the h tile of dSReLU one staging buffer."""
  return not cfg.split_rows and not cfg.epilogue_cols


def srelu_gmm_config(m: int, k: int, n: int, g: int, *, dtype) -> config_lib.GmmConfig:
  """The config of `gmm_srelu_mgpu` on x [M, K], w1 [G, K, N]: gmm's (`gmm_config`),
  or its heuristic one where a tuned config does not suit the epilogue."""
  itemsize = jnp.dtype(dtype).itemsize
  cfg = config_lib.gmm_config(m, k, n, g, itemsize, dtype=dtype)
  return cfg if takes(cfg) else config_lib.heuristic_gmm_config(m, k, n, g, itemsize)


def dsrelu_gmm_config(m: int, k: int, n: int, g: int, *, dtype,
                      out_itemsize: int | None = None) -> config_lib.GmmConfig:
  """The config of `gmm_dsrelu_mgpu` on dy [M, K], w2 [G, N, K] in `dtype`, writing dh
  of out_itemsize bytes (default dtype's): the input-gradient
  gmm's (`gmm_config(transpose_rhs=True)`), with consumer tiles of at most
  MAX_DSRELU_BLOCK_N columns that still tile N (64 where N is not a multiple of 128
  times the consumers), the whole tile staged, and no chained items.

  Loading a 256-column h tile into the WGMMA layout sends Mosaic GPU's layout
  inference into a search that does not end in reasonable time. The h tile comes in
  through a whole-tile staging buffer, which leaves room for 3 pipeline stages: too
  few to chain items (K/block_k must split into them).
  """
  out_itemsize = out_itemsize or jnp.dtype(dtype).itemsize
  cfg = config_lib.gmm_config(m, k, n, g, out_itemsize, transpose_rhs=True, dtype=dtype)
  if not takes(cfg):
    cfg = config_lib.heuristic_gmm_config(m, k, n, g, out_itemsize)
  tiles_per_cluster = cfg.num_compute_wgs * cfg.cluster_n  # side by side along N
  # 64 always fits: cfg's block_n, a multiple of 64, tiles N.
  block_n = next(b for b in (MAX_DSRELU_BLOCK_N, 64)
                 if b <= cfg.block_n and n % (b * tiles_per_cluster) == 0)
  unchained = dict(chain_items=False, max_concurrent_steps=3) if cfg.chain_items else {}
  return dataclasses.replace(cfg, block_n=block_n, epilogue_rows=None, **unchained)


def _at_least_rows(x: jax.Array, rows: int) -> jax.Array:
  """x padded with zero rows to `rows` rows if it has fewer: an epilogue reads a
  whole block_m-row tile of p (and h), and with M < block_m the tile is rows
  [0, block_m). Only the first M rows of the outputs are written."""
  if x.shape[0] >= rows:
    return x
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def gmm_srelu_mgpu(x, w1, group_sizes, p, *, interpret: bool = False, config=None):
  """(h, a): h = x_g @ w1_g, a = relu(h)**2 * p, both [M, F] in x.dtype; padding rows 0.

  config: default `srelu_gmm_config`.
  """
  (m, k), (g, _, n) = x.shape, w1.shape
  common.check_kernel_sizes(m, k, n)  # before a config is picked for them
  if config is None:
    config = srelu_gmm_config(m, k, n, g, dtype=x.dtype)
  p = _at_least_rows(p.astype(jnp.float32), config.block_m)
  (h, a), _ = gmm_mgpu.gmm_mgpu_with_epilogue(
      x, w1, group_sizes, SReLUEpilogue(), (p,), interpret=interpret, config=config)
  return h, a


def gmm_dsrelu_mgpu(dy, w2, group_sizes, h, p, *, interpret: bool = False, config=None):
  """(dh [M, F] in h.dtype, dp [M] f32) from da = dy_g @ w2_g.T, never stored.

  dy: [M, H]; w2: [G, F, H]; h: [M, F] (activation_input); p: [M].
  config: default `dsrelu_gmm_config`.
  """
  (m, k), (g, n, _) = dy.shape, w2.shape
  common.check_kernel_sizes(m, k, n)
  if config is None:
    config = dsrelu_gmm_config(m, k, n, g, dtype=dy.dtype,
                               out_itemsize=h.dtype.itemsize)
  h_tiles = _at_least_rows(h, config.block_m)
  p = _at_least_rows(p.astype(jnp.float32), config.block_m)
  (dh, dp_partial), meta = gmm_mgpu.gmm_mgpu_with_epilogue(
      dy, w2, group_sizes, DSReLUEpilogue(), (h_tiles, p),
      transpose_rhs=True, out_dtype=h.dtype, interpret=interpret, config=config)
  return dh, _sum_dp_by_row(dp_partial, meta, m)


def gmm_fp8_dsrelu_mgpu(dy_values, dy_scales, w2_values, w2_scales, group_sizes, h, p, *,
                        interpret: bool = False, config=None):
  """`gmm_dsrelu_mgpu` on blockwise FP8 operands: (dh [M, F] in h.dtype, dp [M] f32)
  from da = dequant(dy)_g @ dequant(w2)_g.T (`gmm_fp8_mgpu`'s main loop), never stored.

  dy_values [M, H] e4m3, dy_scales [H // 128, M] f32 (`quantize_rows(dy)`); w2_values
  [G, F, H] e4m3 and w2_scales [G, H // 128, F // 128] f32 (`quantize_blocks(w2)`'s
  values and swapped scales); h [M, F] bf16 or f32; p [M].
  config: default `config.fp8_gmm_config` with the consumers side by side (this
    epilogue's per-row dp partials take no split_rows items).
  """
  (m, k), (g, n, _) = dy_values.shape, w2_values.shape
  if config is None:
    config = config_lib.fp8_gmm_config(m, k, n, g, h.dtype.itemsize, split_rows=False)
  h_tiles = _at_least_rows(h, config.block_m)
  p = _at_least_rows(p.astype(jnp.float32), config.block_m)
  (dh, dp_partial), meta = gmm_fp8_mgpu.gmm_fp8_mgpu_with_epilogue(
      dy_values, dy_scales, w2_values, w2_scales, group_sizes, DSReLUEpilogue(),
      (h_tiles, p), out_dtype=h.dtype, interpret=interpret, config=config)
  return dh, _sum_dp_by_row(dp_partial, meta, m)


def _sum_dp_by_row(dp_partial, meta, m: int) -> jax.Array:
  """dp[r] = sum over n-tiles of the slot of the item that owns row r."""
  block_m = dp_partial.shape[2]
  rows = meta.tile_row0[:, None] + jnp.arange(block_m, dtype=jnp.int32)[None, :]
  owned = (rows >= meta.row_start[:, None]) & (rows < meta.row_end[:, None])
  per_item = jnp.sum(dp_partial, axis=1)
  return jnp.zeros((m,), jnp.float32).at[jnp.where(owned, rows, m)].add(
      per_item, mode="drop")
