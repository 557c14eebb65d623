"""Blockwise-scaled FP8 grouped GEMM, `gmm_fp8_mgpu`: a persistent Mosaic GPU kernel.

out[rows of g] = dequant(lhs)[rows of g] @ dequant(rhs[g]).T, zeros past
sum(group_sizes), on the layouts of `quantize.py`:

  lhs  values [M, K] e4m3, scales [K // 128, M] f32   (1x128 row tiles)
  rhs  values [G, N, K] e4m3, scales [G, K // 128, N // 128] f32   (128x128 blocks)

Hopper's FP8 wgmma reads both operands K-major, so rhs is stored [G, N, K] and
contracted on its last axis (gmm_mgpu's transpose_rhs=True layout). One kernel
serves the forward, y = x @ w (rhs = `quantize_blocks(w).values_t`), and the
input gradient, dx = dy @ w.T (rhs = `quantize_blocks(w).values`, w's [G, K, N]
read as [G, N', K'] with N' = K, K' = N, and the block scales swapped to match).

Design:
  * Work items, the persistent item loop and the epilogue are gmm_mgpu's
    (`metadata_kernel.gmm_metadata`, `one_warpgroup_items`, `Epilogue`).
  * The main loop is a pipeline over K in 128-wide steps: a 128-byte swizzle
    row of e4m3 is 128 elements, exactly one scale block. Each step loads the
    lhs tile [block_m, 128], the rhs tile [block_n, 128] and that K block's row
    scales of lhs [1, block_m] by TMA, reads the rhs block scale (one scalar:
    block_n divides 128) from global memory, and (`_promote`)
      partial = lhs_tile @ rhs_tile.T            (wgmma into a fresh accumulator)
      acc    += partial * row_scale[:, None] * block_scale
    in float32 registers (the pipeline's carry). Promoting each K block's
    partial sum outside the tensor core keeps its limited-precision FP8
    accumulation to 128 products, as DeepGEMM does. The wgmma is awaited every
    step, before its partial sum is read.
  * config.num_compute_wgs=2 (the default, `_gmm_fp8_kernel_ws`, gmm_mgpu's
    `ws_pipeline`): a producer warpgroup loads, two consumer warpgroups take
    the left and right halves of a block_m x (2*block_n) item (sharing its lhs
    tile), so one's promotion runs while the other's wgmma does; or with
    config.split_rows the top and bottom halves of a (2*block_m) x block_n item
    (sharing its rhs tile: 128 x 128 items read less per FLOP than 64 x 256 ones).
    With 64-row tiles each consumer holds 2 x 64 float32 accumulator registers a
    thread.
  * config.num_compute_wgs=1 (`_gmm_fp8_kernel`, `emit_pipeline`), with
    config.promotion "serial" (`_mainloop`: each K block's wgmma awaited before
    its promotion, the tensor core idle meanwhile) or "pairs"
    (`_paired_mainloop`: two K blocks a step, the first promoted under the
    second one's wgmma). For N that does not split into 2*block_n items.
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
from pallas_kernels import metadata_kernel
from pallas_kernels import quantize
from pallas_kernels import srelu_mgpu

BLOCK_K = quantize.BLOCK  # one scale block per pipeline step
assert config_lib.Fp8GmmConfig.block_k == BLOCK_K
SUPPORTED_OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _check_shapes(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes) -> None:
  """ValueError unless the operands have the shapes of `quantize.py`'s layouts."""
  m, k = lhs_values.shape
  g, n, rhs_k = rhs_values.shape
  expected = {"lhs_scales": (k // BLOCK_K, m), "rhs_values": (g, n, k),
              "rhs_scales": (g, k // BLOCK_K, n // BLOCK_K), "group_sizes": (g,)}
  got = {"lhs_scales": lhs_scales.shape, "rhs_values": (g, n, rhs_k),
         "rhs_scales": rhs_scales.shape, "group_sizes": group_sizes.shape}
  for name, shape in expected.items():
    if tuple(got[name]) != shape:
      raise ValueError(
          f"Expected '{name}' of shape {shape} for lhs_values [M, K] = {(m, k)} and "
          f"rhs_values [G, N, K] = {tuple(rhs_values.shape)}, got {tuple(got[name])}.")
  if group_sizes.dtype != jnp.int32:
    raise ValueError(f"Expected int32 'group_sizes', got {group_sizes.dtype}.")


def check_supported(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes, *,
                    out_dtype, interpret: bool,
                    config: config_lib.Fp8GmmConfig | None) -> config_lib.Fp8GmmConfig:
  """Raises ValueError for inconsistent shapes, NotImplementedError for inputs the
  kernel does not take; returns the config."""
  _check_shapes(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes)
  check_dtypes("FP8 gmm", lhs_values, lhs_scales, rhs_values, rhs_scales, out_dtype)
  m, k = lhs_values.shape
  n = rhs_values.shape[1]
  for name, size in (("K", k), ("N", n)):
    if size % BLOCK_K:
      raise NotImplementedError(f"{name}={size} is not a multiple of {BLOCK_K}.")
  if m == 0 or m % 8:
    raise NotImplementedError(f"M={m} is not a positive multiple of 8.")
  out_itemsize = jnp.dtype(out_dtype).itemsize
  cfg = config or config_lib.fp8_gmm_config(m, k, n, rhs_values.shape[0], out_itemsize)
  cfg.validate_for(k, n, 1, out_itemsize)
  if cfg.split_rows and m < cfg.cta_tile_rows:
    raise NotImplementedError(f"M={m} is fewer than the {cfg.cta_tile_rows} rows of a "
                              "split_rows item.")
  gmm_mgpu.check_hopper(interpret)
  return cfg


def check_dtypes(op: str, lhs_values, lhs_scales, rhs_values, rhs_scales, out_dtype) -> None:
  """NotImplementedError unless the values are e4m3, the scales float32 and the
  output bf16 or f32."""
  for name, x, dtype in (("lhs_values", lhs_values, quantize.FP8),
                         ("rhs_values", rhs_values, quantize.FP8),
                         ("lhs_scales", lhs_scales, jnp.float32),
                         ("rhs_scales", rhs_scales, jnp.float32)):
    if x.dtype != jnp.dtype(dtype):
      raise NotImplementedError(f"{op} takes '{name}' in {jnp.dtype(dtype)}, not {x.dtype}.")
  if jnp.dtype(out_dtype) not in SUPPORTED_OUT_DTYPES:
    raise NotImplementedError(f"{op} writes bf16 or f32, not {jnp.dtype(out_dtype)}.")


def _scale_rows(lhs_scales_gmem, tile_row0, block_m: int):
  """The tile's block_m columns of the [K // 128, M] row scales (all when M < block_m)."""
  if lhs_scales_gmem.shape[1] < block_m:
    return lhs_scales_gmem
  return lhs_scales_gmem.at[:, pl.ds(pl.multiple_of(tile_row0, 8), block_m)]


def partial_sum(lhs_smem, rhs_smem):
  """lhs_smem @ rhs_smem.T, float32 [rows, cols] (WGMMA layout): one K block's wgmma
  into a fresh accumulator, awaited."""
  def partial_scope(partial_ref):
    plgpu.wgmma(partial_ref, lhs_smem, rhs_smem.T)
    return partial_ref[...]  # awaits the wgmma

  return pl.run_scoped(partial_scope, plgpu.ACC((lhs_smem.shape[0], rhs_smem.shape[0])))


def _promote(acc, lhs_smem, rhs_smem, row_scales_smem, block_scale):
  """acc + (lhs_smem @ rhs_smem.T) * row_scales[:, None] * block_scale: one K block,
  promoted in float32 registers (row_scales_smem: [block_m] float32)."""
  return acc + _scaled(partial_sum(lhs_smem, rhs_smem), row_scales_smem, block_scale)


def _scaled(partial, row_scales_smem, block_scale):
  """partial [block_m, block_n] * row scales [block_m] (smem) * the block's scale."""
  row_scales = plgpu.load(row_scales_smem, layout=srelu_mgpu.ROW_LAYOUT)
  return partial * lax.broadcast_in_dim(row_scales * block_scale, partial.shape, [0])


def _zeros(cfg):
  return plgpu.layout_cast(jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32),
                           plgpu.Layout.WGMMA)


def _row_scales_spec(cfg, **kwargs):
  """The [1, cta_tile_rows] row scales of K block kb, from `_scale_rows`."""
  return plgpu.BlockSpec((1, cfg.cta_tile_rows), lambda kb: (kb, 0), **kwargs)


def _mainloop(lhs_gmem, rhs_gmem, lhs_scales_gmem, rhs_scales_gmem, where, *, cfg):
  """sum over K blocks kb of (lhs[rows, kb] @ rhs[n-tile, kb].T) * row scales * block
  scale, float32 [block_m, block_n] in the WGMMA layout (rhs: one group's [N, K])."""
  if cfg.promotion == "pairs":
    return _paired_mainloop(lhs_gmem, rhs_gmem, lhs_scales_gmem, rhs_scales_gmem,
                                where, cfg=cfg)
  bm, bn = cfg.block_m, cfg.block_n
  n_tile, tile_row0 = where["n_tile"], where["tile_row0"]
  scale_col = n_tile * bn // BLOCK_K

  def step(indices, lhs_smem, rhs_smem, row_scales_smem, acc):
    (kb,) = indices
    return _promote(acc, lhs_smem, rhs_smem, row_scales_smem.at[0],
                    rhs_scales_gmem[kb, scale_col])

  return plgpu.emit_pipeline(
      step,
      grid=(lhs_gmem.shape[1] // BLOCK_K,),
      in_specs=[
          plgpu.BlockSpec((bm, BLOCK_K), lambda kb: (0, kb)),
          plgpu.BlockSpec((bn, BLOCK_K), lambda kb: (n_tile, kb)),
          _row_scales_spec(cfg),
      ],
      max_concurrent_steps=cfg.max_concurrent_steps,
      init_carry=_zeros(cfg),
  )(gmm_mgpu._tile_rows(lhs_gmem, tile_row0, bm), rhs_gmem,
    _scale_rows(lhs_scales_gmem, tile_row0, bm))


def _paired_mainloop(lhs_gmem, rhs_gmem, lhs_scales_gmem, rhs_scales_gmem, where, *,
                         cfg):
  """`_mainloop` with half of the promotions under a wgmma: a pipeline step takes
  K blocks 2j and 2j+1 into fresh partial accumulators p0 and p1, issues both
  wgmmas, promotes p0 while p1's runs (awaiting all but the newest), then p1.
  The tensor core idles only during p1's promotion."""
  bm, bn = cfg.block_m, cfg.block_n
  n_tile, tile_row0 = where["n_tile"], where["tile_row0"]
  scale_col = n_tile * bn // BLOCK_K
  shape = (bm, bn)

  def step(indices, lhs0, lhs1, rhs0, rhs1, row_scales_smem, acc):
    (j,) = indices

    def scaled(partial, half):
      return _scaled(partial, row_scales_smem.at[half],
                     rhs_scales_gmem[2 * j + half, scale_col])

    def partials(p0, p1):
      plgpu.wgmma(p0, lhs0, rhs0.T)
      plgpu.wgmma(p1, lhs1, rhs1.T)
      first = acc + scaled(plgpu.wgmma_accumulator_load(p0, wait_n=1), 0)
      return first + scaled(plgpu.wgmma_accumulator_load(p1, wait_n=0), 1)

    return pl.run_scoped(partials, plgpu.ACC(shape), plgpu.ACC(shape))

  def tile_spec(rows, row_block, half):
    return plgpu.BlockSpec((rows, BLOCK_K), lambda j: (row_block, 2 * j + half))

  return plgpu.emit_pipeline(
      step,
      grid=(lhs_gmem.shape[1] // cfg.step_k,),
      in_specs=[tile_spec(bm, 0, 0), tile_spec(bm, 0, 1), tile_spec(bn, n_tile, 0),
                tile_spec(bn, n_tile, 1), plgpu.BlockSpec((2, bm), lambda j: (j, 0))],
      max_concurrent_steps=cfg.max_concurrent_steps,
      init_carry=_zeros(cfg),
  )(*[gmm_mgpu._tile_rows(lhs_gmem, tile_row0, bm)] * 2, rhs_gmem, rhs_gmem,
    _scale_rows(lhs_scales_gmem, tile_row0, bm))


def _split_refs(refs, num_extra_inputs: int):
  """(metadata refs, lhs, rhs, lhs scales, rhs scales, the epilogue's inputs...,
  outputs...) -> (meta, lhs, rhs, (lhs scales, rhs scales), epilogue inputs, outputs)."""
  meta, lhs_gmem, rhs_gmem, ins, outs = gmm_mgpu._split_refs(refs, 2 + num_extra_inputs)
  return meta, lhs_gmem, rhs_gmem, ins[:2], ins[2:], outs


def _gmm_fp8_kernel(*refs, cfg, num_items, n, out_dtype, epilogue, num_extra_inputs):
  meta, lhs_gmem, rhs_gmem, (lhs_scales_gmem, rhs_scales_gmem), ins, outs = (
      _split_refs(refs, num_extra_inputs))

  def accumulate(item, where):
    group = meta.group_id[item]

    def compute():
      return _mainloop(lhs_gmem, rhs_gmem.at[group], lhs_scales_gmem,
                       rhs_scales_gmem.at[group], where, cfg=cfg)

    # Padding items store zeros.
    return lax.cond(meta.compute[item] != 0, compute, lambda: _zeros(cfg))

  gmm_mgpu.one_warpgroup_items(meta, accumulate, ins, outs, cfg=cfg, num_items=num_items,
                               epilogue=epilogue, n=n, out_dtype=out_dtype)


def _gmm_fp8_kernel_ws(*refs, cfg, num_items, n, out_dtype, epilogue, num_extra_inputs):
  """Warp-specialised (cfg.num_compute_wgs == 2): warpgroup 2 issues the TMA loads
  of lhs, rhs and row-scale tiles; consumer warpgroups 0 and 1 each promote the
  K blocks of the left or right (cfg.split_rows: top or bottom) block_m x block_n
  half of the item's tile (as DeepGEMM, one consumer's promotion runs beside the
  other's wgmma) and store it. With cfg.chain_items the producer streams all of
  an SM's items as one pipeline (`gmm_mgpu.ws_item_loops`)."""
  meta, lhs_gmem, rhs_gmem, (lhs_scales_gmem, rhs_scales_gmem), ins, outs = (
      _split_refs(refs, num_extra_inputs))
  bm, bn, cta_n = cfg.block_m, cfg.block_n, cfg.cta_block_n
  get_pipeline = functools.partial(
      gmm_mgpu.ws_pipeline, k=lhs_gmem.shape[1], dtype=lhs_gmem.dtype, cfg=cfg,
      transpose_rhs=True, extra_in_specs=(_row_scales_spec(cfg, memory_space=plgpu.SMEM),))
  ignore = lambda *_, **__: None  # noqa: E731 -- allocations ignore the bodies

  @functools.partial(
      pl.run_scoped,
      pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(
          lhs_gmem, rhs_gmem.at[0], lhs_scales_gmem),
      o_smem=gmm_mgpu.staging_smem((2, cfg.staged_rows, cfg.staged_cols), out_dtype),
      **gmm_mgpu._epilogue_scratch(epilogue, cfg, 2),
      collective_axes="wg",
  )
  def _(pipeline_allocs, o_smem, epi_smem, epi_barriers):
    o_smem = gmm_mgpu.Staging(*o_smem)
    wg = lax.axis_index("wg")
    scratch, barriers = gmm_mgpu._scratch_for_wg(epi_smem, epi_barriers, epilogue, wg)

    def store(acc, item, n_cta):
      epilogue(acc, o_smem.of_consumer(wg), ins, outs, scratch, barriers, item=item,
               where=gmm_mgpu.consumer_where(meta, item, n_cta, wg, cfg))

    def compute_item(item, n_cta, pipeline_state=None):
      group, tile_row0 = meta.group_id[item], meta.tile_row0[item]
      rhs_scales_g = rhs_scales_gmem.at[group]
      n_tile = n_cta if cfg.split_rows else n_cta * 2 + wg
      scale_col = n_tile * bn // BLOCK_K

      def mma(indices, lhs_smem, rhs_smem, row_scales_smem, acc):
        (kb,) = indices
        if cfg.split_rows:
          rows = pl.ds(wg * bm, bm)
          lhs_wg, rhs_wg, scales_wg = lhs_smem.at[rows], rhs_smem, row_scales_smem.at[0, rows]
        else:
          lhs_wg, rhs_wg = lhs_smem, rhs_smem.at[pl.ds(wg * bn, bn)]
          scales_wg = row_scales_smem.at[0]
        return _promote(acc, lhs_wg, rhs_wg, scales_wg, rhs_scales_g[kb, scale_col])

      rows = cfg.cta_tile_rows
      get_pipeline(mma, lambda pipeline: store(pipeline(_zeros(cfg)), item, n_cta),
                   pipeline_state=pipeline_state)(
          gmm_mgpu._tile_rows(lhs_gmem, tile_row0, rows),
          rhs_gmem.at[group].at[pl.ds(n_cta * cta_n, cta_n)],
          _scale_rows(lhs_scales_gmem, tile_row0, rows), allocations=pipeline_allocs)

    gmm_mgpu.ws_item_loops(
        meta, num_items=num_items, grid_n=n // cta_n, cfg=cfg, compute_item=compute_item,
        zero_item=lambda item, n_cta: store(_zeros(cfg), item, n_cta), is_consumer=wg < 2)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm_fp8_mgpu(lhs_values: jax.Array, lhs_scales: jax.Array, rhs_values: jax.Array,
                 rhs_scales: jax.Array, group_sizes: jax.Array, *,
                 out_dtype=jnp.bfloat16, interpret: bool = False,
                 config: config_lib.Fp8GmmConfig | None = None) -> jax.Array:
  """Blockwise-scaled FP8 grouped matmul with rhs contracted on its last axis.

  out[rows of g] = (lhs_values * lhs_scales)[rows of g] @ (rhs_values[g] * rhs_scales[g]).T
  with each scale broadcast over its tile; rows past sum(group_sizes) are 0.

  Args:
    lhs_values: [M, K] float8_e4m3fn, rows sorted by group (`quantize_rows(x).values`).
    lhs_scales: [K // 128, M] float32, one per row per 128 columns
      (`quantize_rows(x).scales`).
    rhs_values: [G, N, K] float8_e4m3fn, K-major (`quantize_blocks(w).values_t` for
      x @ w; `quantize_blocks(w).values` for dy @ w.T).
    rhs_scales: [G, K // 128, N // 128] float32, one per 128x128 block of rhs_values[g].T
      (`quantize_blocks(w).scales` for x @ w; its swapaxes(1, 2) for dy @ w.T).
    group_sizes: int32 [G], rows per group, sum(group_sizes) <= M. Zeros allowed.
    out_dtype: bf16 or f32; accumulation is float32.
    interpret: run the same kernel in the Pallas Mosaic GPU interpreter (CPU).
    config: block sizes; default `config.fp8_gmm_config(M, K, N, G)`.

  Returns:
    [M, N] in out_dtype.

  Raises:
    ValueError: for shapes that do not fit together.
    NotImplementedError: for inputs the kernel does not support (dtypes, K or N not
      a multiple of 128, M not a positive multiple of 8, no Hopper GPU).
  """
  (out,), _ = gmm_fp8_mgpu_with_epilogue(
      lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes, gmm_mgpu.Epilogue(), (),
      out_dtype=out_dtype, interpret=interpret, config=config)
  return out


def gmm_fp8_mgpu_with_epilogue(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes,
                               epilogue: gmm_mgpu.Epilogue, extra_inputs: tuple, *,
                               out_dtype=jnp.bfloat16, interpret: bool = False,
                               config: config_lib.Fp8GmmConfig | None = None):
  """`gmm_fp8_mgpu` with a custom epilogue (`gmm_mgpu.Epilogue`, on each consumer's
  float32 block_m x block_n tile); returns (the epilogue's outputs, metadata)."""
  out_dtype = jnp.dtype(out_dtype)
  cfg = check_supported(lhs_values, lhs_scales, rhs_values, rhs_scales, group_sizes,
                        out_dtype=out_dtype, interpret=interpret, config=config)
  m, n = lhs_values.shape[0], rhs_values.shape[1]
  epilogue.check_supported(m, cfg)
  epilogue.check_smem(cfg, 1, out_dtype.itemsize)
  meta = metadata_kernel.gmm_metadata(group_sizes, m, cfg.cta_tile_rows, interpret=interpret)
  kernel = gmm_mgpu.launch(
      functools.partial(_gmm_fp8_kernel_ws if cfg.num_compute_wgs > 1 else _gmm_fp8_kernel,
                        cfg=cfg, num_items=meta.num_items, n=n, out_dtype=out_dtype,
                        epilogue=epilogue, num_extra_inputs=len(extra_inputs)),
      epilogue.out_types(m, n, out_dtype, meta.num_items, cfg), meta, n=n, cfg=cfg,
      interpret=interpret)
  outs = kernel(*meta.arrays(), lhs_values, rhs_values, lhs_scales, rhs_scales, *extra_inputs)
  return outs, meta
