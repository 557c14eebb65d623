"""Grouped GEMM forward, `gmm_mgpu`: a persistent Pallas Mosaic GPU kernel for Hopper.

out[rows of group g] = lhs[rows of g] @ rhs[g], with zeros past sum(group_sizes).

The file reads top to bottom: support checks, the kernel (work-item loop →
main loop → store epilogue), the public wrapper.

Design:
  * Work items come from `metadata_kernel.gmm_metadata` (outside the kernel):
    one per (group or padding segment, m-tile) pair, so the kernel never loops
    over the groups. The item loop is `plgpu.nd_loop` over (item, n-tile),
    spread over all SMs (persistent grid) in planar-snake order for L2 reuse;
    with config.persistent=False there is one program per (item, n-tile).
  * The main loop is a TMA + wgmma pipeline over K: `plgpu.emit_pipeline` in
    one warpgroup (`_gmm_kernel`), or warp-specialised with a TMA producer
    warpgroup and two consumer warpgroups (`_gmm_kernel_ws`,
    config.num_compute_wgs=2, the default for large shapes). With
    config.chain_items the warp-specialised kernel runs all of an SM's compute
    items as one chain of pipelines (`pipeline_state`), so the producer loads
    the next item's first tiles while the consumers store the current one.
    With config.cluster_n=2 (the heuristic's pick for small groups) the SMs run
    in clusters of two that take adjacent n-tiles of one item and multicast its
    lhs tiles to each other.
  * `store_rows` writes only the item's rows of the tile, staged through
    shared memory in passes of config.epilogue_rows rows: one TMA store from a
    swizzled buffer where the pass's rows are all the item's, else a ladder of
    TMA stores (see there); it leaves them in flight over the next item's main
    loop. Padding items skip the main loop and store the zero accumulator, so
    every output row is written by the kernel and no wrapper pass over the
    output is needed.
  * The epilogue is an `Epilogue` object, so that a fused epilogue (a scale
    read per row, several outputs; `fused_srelu_mgpu.py`) replaces it without
    touching the main loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels import config as config_lib
from pallas_kernels import metadata as metadata_lib
from pallas_kernels import metadata_kernel

SUPPORTED_IN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_OUT_DTYPES = SUPPORTED_IN_DTYPES + (jnp.dtype(jnp.float32),)
HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def check_hopper(interpret: bool) -> None:
  """Raises NotImplementedError unless the kernel can run (or lower) for Hopper.

  Interpreting needs no GPU. Otherwise the target is the abstract device of the
  current abstract mesh if there is one (lowering on a CPU host), else the
  default device, which must be an NVIDIA GPU of compute capability 9.x.
  """
  if interpret:
    return
  mesh = jax.sharding.get_abstract_mesh()
  abstract_device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  if abstract_device is not None:
    kind = str(getattr(abstract_device, "device_kind", ""))
    if any(h in kind for h in HOPPER_KINDS):
      return
    raise NotImplementedError(f"Mosaic GPU kernels need a Hopper GPU, not {kind!r}.")
  device = jax.devices()[0]
  capability = str(getattr(device, "compute_capability", ""))
  if device.platform != "gpu" or not capability.startswith("9"):
    raise NotImplementedError(
        "Mosaic GPU kernels need a Hopper GPU (sm_90); the default device is "
        f"{device.device_kind!r} on {device.platform!r}. Use interpret=True on CPU.")


def check_dtypes(lhs_dtype, rhs_dtype, out_dtype) -> None:
  if jnp.dtype(lhs_dtype) not in SUPPORTED_IN_DTYPES or lhs_dtype != rhs_dtype:
    raise NotImplementedError(
        f"Mosaic GPU grouped GEMM takes bf16 or fp16 operands of one dtype, got "
        f"lhs {jnp.dtype(lhs_dtype)} and rhs {jnp.dtype(rhs_dtype)}.")
  if jnp.dtype(out_dtype) not in SUPPORTED_OUT_DTYPES:
    raise NotImplementedError(
        f"Mosaic GPU grouped GEMM writes bf16, fp16 or f32, not {jnp.dtype(out_dtype)}.")


def check_supported(lhs, rhs, group_sizes, *, transpose_rhs: bool = False,
                    out_dtype=None, interpret: bool = False,
                    config: config_lib.GmmConfig | None = None) -> config_lib.GmmConfig:
  """Raises NotImplementedError for inputs `gmm_mgpu` does not handle; returns the config.

  Shapes are assumed valid (`common.validate_gmm`); this checks what the kernel
  supports: bf16/fp16 operands, M a positive multiple of 8, K and N multiples of
  64 (and of the block sizes), a Hopper GPU unless interpreting.
  """
  out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
  check_dtypes(lhs.dtype, rhs.dtype, out_dtype)
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  common.check_kernel_sizes(m, k, n)
  if config is None:
    config = config_lib.gmm_config(m, k, n, group_sizes.shape[0], out_dtype.itemsize,
                                   transpose_rhs, dtype=lhs.dtype)
  config.validate_for(k, n, jnp.dtype(lhs.dtype).itemsize, out_dtype.itemsize)
  check_hopper(interpret)
  return config


def _smem_transforms(minor: int, dtype) -> tuple:
  """128-byte (or smaller) swizzle for tiles whose minor dimension has `minor` elements."""
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def _tile_rows(lhs_gmem, tile_row0, block_m: int):
  """The item's block_m rows of lhs (all of lhs when it has fewer rows)."""
  if lhs_gmem.shape[0] < block_m:
    return lhs_gmem
  # The tile may start at any multiple of 8 (see metadata.py).
  return lhs_gmem.at[pl.ds(pl.multiple_of(tile_row0, 8), block_m)]


def _mainloop(acc_ref, lhs_gmem, rhs_gmem, where, *, cfg, transpose_rhs):
  """acc_ref += lhs[tile rows, :] @ rhs[:, n-tile] (rhs: one group's [K, N] or [N, K])."""
  k = lhs_gmem.shape[1]
  n_tile = where["n_tile"]
  lhs_gmem = _tile_rows(lhs_gmem, where["tile_row0"], cfg.block_m)

  def step(_, lhs_smem, rhs_smem):
    plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.T if transpose_rhs else rhs_smem)

  if transpose_rhs:
    rhs_spec = plgpu.BlockSpec((cfg.block_n, cfg.block_k), lambda ki: (n_tile, ki),
                               delay_release=1)
  else:
    rhs_spec = plgpu.BlockSpec((cfg.block_k, cfg.block_n), lambda ki: (ki, n_tile),
                               delay_release=1)
  plgpu.emit_pipeline(
      step,
      grid=(k // cfg.block_k,),
      in_specs=[
          plgpu.BlockSpec((cfg.block_m, cfg.block_k), lambda ki: (0, ki),
                          delay_release=1),
          rhs_spec,
      ],
      max_concurrent_steps=cfg.max_concurrent_steps,
  )(lhs_gmem, rhs_gmem)


class Staging(NamedTuple):
  """One consumer's epilogue staging buffer [staged_rows, block_n], seen two ways
  over the same shared memory (each pass writes it through one of them):

  swizzled: registers fill it without shared-memory bank conflicts, and a chunk
    whose rows all belong to the item leaves by one TMA store;
  plain: row-major, so that TMA can store row slices of it that start at any
    row, for chunks at a group's bounds. (The accumulator's layout writes it
    with 8-way bank conflicts.)
  """
  plain: Any
  swizzled: Any

  def of_consumer(self, wg) -> Staging:
    """Consumer wg's buffer, of a Staging with a leading warpgroup axis."""
    return Staging(self.plain.at[wg], self.swizzled.at[wg])


def staging_smem(shape: tuple[int, ...], dtype) -> plgpu.RefUnion:
  """The shared memory of a Staging of `shape`: both views of one buffer."""
  swizzled = plgpu.SMEM(shape, dtype, transforms=_smem_transforms(shape[-1], dtype))
  return plgpu.RefUnion(plgpu.SMEM(shape, dtype), swizzled)


def stage(value, smem_ref) -> None:
  """smem_ref[...] = value once the previous TMA stores have read shared memory,
  fenced for the TMA store that follows."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  smem_ref[...] = value
  plgpu.commit_smem()


def tile_chunk(tile, row0: int, col0: int, rows: int, cols: int):
  """tile[row0:row0+rows, col0:col0+cols], the tile itself when that is all of it."""
  if (rows, cols) == tile.shape:
    return tile
  return tile[row0:row0 + rows, col0:col0 + cols]


def store_rows(tile, staging, out_gmem, *, tile_row0, row_start, row_end, n_tile, cfg):
  """Writes rows [row_start, row_end) of a block_m x block_n tile to out_gmem.

  The tile goes out through `staging` (a Staging of staged_rows rows), in
  block_m / staged_rows passes that skip row chunks with nothing to store. The
  stores of a pass are not awaited here: the next item's main loop runs while
  the last ones drain, and each pass waits for the previous stores before it
  overwrites the buffer.

  A chunk whose rows all belong to the item goes out through the swizzled view
  in one TMA store. Otherwise, since TMA stores have static shapes but the row
  count is only known at run time, the rows go out of the plain view as a ladder
  of power-of-two TMA stores, one per set bit of the count (as in JAX's
  ragged_dot_mgpu). E.g. 5 rows from smem row 3:

      smem rows  3..6   one store of 4 rows   (bit 2 of 5)
      smem row   7      one store of 1 row    (bit 0 of 5)

  Other items write the tile's other rows (other groups or the padding).
  """
  o_smem = staging.plain
  chunk, chunk_cols = o_smem.shape
  whole_chunks = chunk <= out_gmem.shape[0]
  for c in range(cfg.block_m // chunk):
    chunk_row0 = tile_row0 + c * chunk
    start = jnp.maximum(row_start, chunk_row0)
    count = jnp.minimum(row_end, chunk_row0 + chunk) - start
    for col0 in range(0, cfg.block_n, chunk_cols):
      part = tile_chunk(tile, c * chunk, col0, chunk, chunk_cols)
      n_slice = pl.ds(n_tile * cfg.block_n + col0, chunk_cols)
      _store_chunk(part, staging, out_gmem, chunk_row0, start, count, n_slice, whole_chunks)


def _store_chunk(part, staging, out_gmem, chunk_row0, start, count, n_slice,
                 whole_chunks: bool) -> None:
  """Writes `count` rows from `start` of a staged_rows-row chunk (first row
  chunk_row0) to out_gmem[:, n_slice] (store_rows)."""
  o_smem = staging.plain
  chunk = o_smem.shape[0]
  if whole_chunks:
    @pl.when(count == chunk)
    def _():
      stage(part, staging.swizzled)
      # tile_row0 is a multiple of 8 (metadata.py), as the swizzled copy needs.
      rows = pl.ds(pl.multiple_of(chunk_row0, 8), chunk)
      plgpu.copy_smem_to_gmem(staging.swizzled, out_gmem.at[rows, n_slice])

  @pl.when(((count > 0) & (count < chunk)) if whole_chunks else (count > 0))
  def _():
    stage(part, o_smem)
    smem_row = start - chunk_row0
    for bit in reversed(range(int(math.log2(chunk)) + 1)):
      rows = 1 << bit
      if rows > out_gmem.shape[0]:
        continue

      @pl.when((count & rows) != 0)
      def _():
        plgpu.copy_smem_to_gmem(
            o_smem.at[pl.ds(smem_row, rows)],
            out_gmem.at[pl.ds(chunk_row0 + smem_row, rows), n_slice])

      smem_row = smem_row + (count & rows)


class Epilogue:
  """What a gmm kernel does with each finished float32 accumulator tile.

  The default casts the tile and stores the item's rows to the one output. A fused
  epilogue (`fused_srelu_mgpu.py`) overrides the four hooks: it may read more
  operands (`extra_inputs`, passed after lhs and rhs), write several outputs, and
  use per-warpgroup scratch (`scratch`: shared-memory shapes and a barrier count).

  `__call__` gets, for one compute warpgroup: the accumulator [block_m, block_n],
  o_smem (a `Staging` buffer of the output dtype), the extra
  input refs, the output refs, this warpgroup's scratch refs and barriers, the
  item index and `where` (tile_row0, row_start, row_end, n_tile, cfg).
  """

  num_barriers = 0

  def out_types(self, m: int, n: int, out_dtype, num_items: int, cfg) -> tuple:
    return (jax.ShapeDtypeStruct((m, n), out_dtype),)

  def scratch(self, cfg) -> tuple[tuple[tuple[int, ...], jnp.dtype], ...]:
    return ()

  def check_supported(self, m: int, cfg) -> None:
    """Raises NotImplementedError for a problem this epilogue cannot handle."""

  def check_smem(self, cfg, in_itemsize: int, out_itemsize: int) -> None:
    """Raises NotImplementedError if the kernel and this epilogue's scratch overflow smem."""
    scratch = sum(math.prod(shape) * jnp.dtype(dtype).itemsize
                  for shape, dtype in self.scratch(cfg))
    need = cfg.smem_bytes(in_itemsize, out_itemsize) + cfg.num_compute_wgs * scratch
    if need > config_lib.SMEM_BYTES:
      raise NotImplementedError(
          f"{cfg} with the {type(self).__name__} scratch needs {need} bytes of shared "
          f"memory (at most {config_lib.SMEM_BYTES}).")

  def __call__(self, acc, o_smem, ins, outs, scratch, barriers, *, item, where):
    del ins, scratch, barriers, item
    store_rows(acc.astype(outs[0].dtype), o_smem, outs[0], **where)


_NUM_META = len(dataclasses.fields(metadata_lib.GmmMetadata))


def _split_refs(refs, num_extra_inputs: int):
  """(metadata refs, lhs, rhs, extra inputs..., outputs...) -> named groups."""
  meta = metadata_lib.GmmMetadata(*refs[:_NUM_META])
  lhs_gmem, rhs_gmem = refs[_NUM_META:_NUM_META + 2]
  rest = refs[_NUM_META + 2:]
  return meta, lhs_gmem, rhs_gmem, rest[:num_extra_inputs], rest[num_extra_inputs:]


def _epilogue_scratch(epilogue: Epilogue, cfg, num_wgs: int) -> dict:
  """Per-warpgroup scratch of the epilogue, with a leading warpgroup axis."""
  smem = [plgpu.SMEM((num_wgs, *shape), dtype) for shape, dtype in epilogue.scratch(cfg)]
  barriers = (plgpu.Barrier(num_barriers=num_wgs * epilogue.num_barriers)
              if epilogue.num_barriers else None)
  return dict(epi_smem=smem, epi_barriers=barriers)


def _scratch_for_wg(epi_smem, epi_barriers, epilogue: Epilogue, wg):
  smem = [ref.at[wg] for ref in epi_smem]
  n = epilogue.num_barriers
  barriers = [epi_barriers.at[wg * n + i] for i in range(n)] if n else []
  return smem, barriers


def _item_where(meta, item, n_tile, cfg) -> dict:
  """The `where` of an item's epilogue: its tile, its rows and its n-tile."""
  return dict(tile_row0=meta.tile_row0[item], row_start=meta.row_start[item],
              row_end=meta.row_end[item], n_tile=n_tile, cfg=cfg)


def consumer_where(meta, item, n_cta, wg, cfg) -> dict:
  """The `where` of consumer warpgroup wg's block_m x block_n tile of the item's
  n_cta-th tile of cta_block_n columns: the top or bottom half (cfg.split_rows) or
  one of the tiles side by side."""
  if cfg.split_rows:
    where = _item_where(meta, item, n_cta, cfg)
    return dict(where, tile_row0=where["tile_row0"] + wg * cfg.block_m)
  return _item_where(meta, item, n_cta * cfg.num_compute_wgs + wg, cfg)


def _for_each_item(meta, *, num_items: int, grid_n: int, cfg, body) -> None:
  """Runs body(item, n_tile) for this SM's share of the used (item, n-tile)
  pairs, in planar-snake order (persistent grid; one pair per program when the
  grid has a program per pair)."""

  @plgpu.nd_loop((num_items * grid_n,), collective_axes="sm")
  def _item_loop(loop_info: plgpu.NDLoopInfo):
    item, n_tile = plgpu.planar_snake(
        loop_info.index[0], (num_items, grid_n), 1, cfg.grid_block_n)

    @pl.when(meta.row_end[item] > meta.row_start[item])  # Unused items do nothing.
    def _():
      body(item, n_tile)


def _gmm_kernel(*refs, cfg, transpose_rhs, num_items, epilogue, num_extra_inputs, n,
                out_dtype):
  meta, lhs_gmem, rhs_gmem, ins, outs = _split_refs(refs, num_extra_inputs)

  def accumulate(item, where):
    def acc_scope(acc_ref):
      # Padding items keep the zero accumulator.
      @pl.when(meta.compute[item] != 0)
      def _():
        _mainloop(acc_ref, lhs_gmem, rhs_gmem.at[meta.group_id[item]], where,
                  cfg=cfg, transpose_rhs=transpose_rhs)
      return acc_ref[...]

    return pl.run_scoped(acc_scope, plgpu.ACC((cfg.block_m, cfg.block_n)))

  one_warpgroup_items(meta, accumulate, ins, outs, cfg=cfg, num_items=num_items,
                      epilogue=epilogue, n=n, out_dtype=out_dtype)


def one_warpgroup_items(meta, accumulate, ins, outs, *, cfg, num_items, epilogue, n,
                        out_dtype) -> None:
  """The one-warpgroup kernels' item loop: for each of this SM's (item, n-tile)
  pairs, acc = accumulate(item, where) (a float32 [block_m, block_n] tile, zeros
  for a padding item), then the epilogue on it."""
  grid_n = n // cfg.block_n

  @functools.partial(
      pl.run_scoped,
      o_smem=staging_smem((cfg.staged_rows, cfg.staged_cols), out_dtype),
      **_epilogue_scratch(epilogue, cfg, 1))
  def _(o_smem, epi_smem, epi_barriers):
    o_smem = Staging(*o_smem)
    scratch, barriers = _scratch_for_wg(epi_smem, epi_barriers, epilogue, 0)

    def item_body(item, n_tile):
      where = _item_where(meta, item, n_tile, cfg)
      acc = accumulate(item, where)
      epilogue(acc, o_smem, ins, outs, scratch, barriers, item=item, where=where)

    _for_each_item(meta, num_items=num_items, grid_n=grid_n, cfg=cfg, body=item_body)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def ws_pipeline(body, compute_context, *, k, dtype, cfg, transpose_rhs,
                pipeline_state=None, extra_in_specs=()):
  """The warp-specialised K pipeline: lhs [cta_tile_rows, block_k] and rhs tiles
  of [block_k, cta_block_n] (or [cta_block_n, block_k]) per step, in swizzled smem,
  then the blocks of extra_in_specs."""
  transforms = _smem_transforms(cfg.block_k, dtype)
  # In a cluster of two (adjacent n-tiles of one item) the lhs tile is shared:
  # each SM loads half of it and multicasts it to both.
  lhs_collective = ("cluster",) if cfg.cluster_n == 2 else ()
  if transpose_rhs:
    rhs_spec = plgpu.BlockSpec((cfg.cta_block_n, cfg.block_k), lambda ki: (0, ki),
                               transforms=transforms, memory_space=plgpu.SMEM)
  else:
    rhs_spec = plgpu.BlockSpec((cfg.block_k, cfg.cta_block_n), lambda ki: (ki, 0),
                               transforms=transforms, memory_space=plgpu.SMEM)
  return plgpu.emit_pipeline_warp_specialized(
      body,
      grid=(k // cfg.block_k,),
      memory_registers=40,
      in_specs=[
          plgpu.BlockSpec((cfg.cta_tile_rows, cfg.block_k), lambda ki: (0, ki),
                          transforms=transforms, memory_space=plgpu.SMEM,
                          collective_axes=lhs_collective),
          rhs_spec,
          *extra_in_specs,
      ],
      wg_axis="wg",
      num_compute_wgs=cfg.num_compute_wgs,
      max_concurrent_steps=cfg.max_concurrent_steps,
      compute_context=compute_context,
      pipeline_state=pipeline_state,
  )


def ws_item_loops(meta, *, num_items: int, grid_n: int, cfg, compute_item, zero_item,
                  is_consumer) -> None:
  """The item loops of a warp-specialised kernel: compute_item(item, n_tile,
  pipeline_state=None) for items with rows to compute, zero_item(item, n_tile) (by
  the consumers only) for padding items.

  With cfg.chain_items the compute items (metadata items [0, C)) come first, as
  one chain of pipelines per SM (the producer runs ahead into the next item),
  then the consumers write the padding items [C, U) without the producer.
  Otherwise each item runs its own pipeline.
  """
  if not cfg.chain_items:
    def item_body(item, n_tile):
      compute = meta.compute[item]
      pl.when(compute != 0)(lambda: compute_item(item, n_tile))
      pl.when((compute == 0) & is_consumer)(lambda: zero_item(item, n_tile))

    _for_each_item(meta, num_items=num_items, grid_n=grid_n, cfg=cfg, body=item_body)
    return
  num_compute, num_used = meta.counts[0], meta.counts[1]

  @plgpu.nd_loop((num_compute * grid_n,), collective_axes="sm")
  def _compute_loop(loop_info: plgpu.NDLoopInfo):
    item, n_tile = plgpu.planar_snake(
        loop_info.index[0], (num_compute, grid_n), 1, cfg.grid_block_n)
    # A chain needs a START and a STOP item; a lone item is a plain pipeline.
    alone = loop_info.num_local_steps == 1
    pl.when(alone)(lambda: compute_item(item, n_tile))
    pl.when(~alone)(lambda: compute_item(
        item, n_tile, pipeline_state=_chain_state(loop_info)))

  @pl.when(is_consumer)
  def _():
    @plgpu.nd_loop(((num_used - num_compute) * grid_n,), collective_axes="sm")
    def _padding_loop(loop_info: plgpu.NDLoopInfo):
      pair = loop_info.index[0]
      zero_item(num_compute + pair // grid_n, pair % grid_n)


def _chain_state(loop_info: plgpu.NDLoopInfo) -> jax.Array:
  """START for an SM's first item, STOP for its last, STEADY in between."""
  state = plgpu.PipelinePipeline
  last = loop_info.local_index == loop_info.num_local_steps - 1
  return jnp.where(loop_info.local_index == 0, jnp.int32(state.START),
                   jnp.where(last, jnp.int32(state.STOP), jnp.int32(state.STEADY)))


def _gmm_kernel_ws(*refs, cfg, transpose_rhs, num_items, epilogue, num_extra_inputs, n,
                   out_dtype):
  """Warp-specialised variant (cfg.num_compute_wgs == 2), after hopper_matmul_mgpu.

  Warpgroup 2 only issues TMA loads; warpgroups 0 and 1 each own a
  block_m x block_n accumulator, the left and right halves of the item's
  block_m x (2*block_n) tile (or with cfg.split_rows the top and bottom halves
  of a (2*block_m) x block_n tile), and run the epilogue on it. Items are
  walked by `ws_item_loops` (chained with cfg.chain_items).
  """
  meta, lhs_gmem, rhs_gmem, ins, outs = _split_refs(refs, num_extra_inputs)
  k = lhs_gmem.shape[1]
  bm, bn, cta_n = cfg.block_m, cfg.block_n, cfg.cta_block_n
  # The item loops walk (item, n-tile of a cluster); with cluster_n=2 both SMs of
  # a cluster get the same indices and take one cta_n-column tile each.
  grid_n = n // cfg.cluster_block_n
  get_pipeline = functools.partial(ws_pipeline, k=k, dtype=lhs_gmem.dtype, cfg=cfg,
                                   transpose_rhs=transpose_rhs)
  ignore = lambda *_, **__: None  # noqa: E731 -- allocations ignore the bodies

  @functools.partial(
      pl.run_scoped,
      pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(
          lhs_gmem, rhs_gmem.at[0]),
      o_smem=staging_smem((cfg.num_compute_wgs, cfg.staged_rows, cfg.staged_cols),
                          out_dtype),
      **_epilogue_scratch(epilogue, cfg, cfg.num_compute_wgs),
      collective_axes="wg",
  )
  def _(pipeline_allocs, o_smem, epi_smem, epi_barriers):
    o_smem = Staging(*o_smem)
    wg = lax.axis_index("wg")
    is_consumer = wg < cfg.num_compute_wgs
    scratch, barriers = _scratch_for_wg(epi_smem, epi_barriers, epilogue, wg)

    def cta_tile(n_cluster):
      """This SM's tile of cta_n columns."""
      if cfg.cluster_n == 1:
        return n_cluster
      return n_cluster * cfg.cluster_n + lax.axis_index("cluster")

    def compute_item(item, n_cluster, pipeline_state=None):
      n_cta = cta_tile(n_cluster)
      where = consumer_where(meta, item, n_cta, wg, cfg)

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn)))
        def _(acc_ref):
          # Named scopes are regions of the Mosaic GPU profiler's timeline
          # (benchmarks/profile_kernels.py); without the profiler they cost nothing.
          with jax.named_scope("mainloop"):
            eval_pipeline(acc_ref)
          with jax.named_scope("epilogue"):
            epilogue(acc_ref[...], o_smem.of_consumer(wg), ins, outs, scratch, barriers,
                     item=item, where=where)

      def mma(_, lhs_smem, rhs_smem, acc_ref):
        if cfg.split_rows:
          lhs_wg, rhs_wg = lhs_smem.at[pl.ds(wg * bm, bm)], rhs_smem
        elif transpose_rhs:
          lhs_wg, rhs_wg = lhs_smem, rhs_smem.at[pl.ds(wg * bn, bn)]
        else:
          lhs_wg, rhs_wg = lhs_smem, rhs_smem.at[:, pl.ds(wg * bn, bn)]
        plgpu.wgmma(acc_ref, lhs_wg, rhs_wg.T if transpose_rhs else rhs_wg)
        plgpu.wgmma_wait(0)
        return acc_ref

      lhs_rows = _tile_rows(lhs_gmem, meta.tile_row0[item], cfg.cta_tile_rows)
      cols = pl.ds(n_cta * cta_n, cta_n)
      rhs_g = rhs_gmem.at[meta.group_id[item]]
      rhs_cols = rhs_g.at[cols] if transpose_rhs else rhs_g.at[:, cols]
      get_pipeline(mma, compute_context, pipeline_state=pipeline_state)(
          lhs_rows, rhs_cols, allocations=pipeline_allocs)

    def zero_item(item, n_cluster):  # Padding rows: zeros, written by the consumers.
      zeros = plgpu.layout_cast(jnp.zeros((bm, bn), jnp.float32), plgpu.Layout.WGMMA)
      epilogue(zeros, o_smem.of_consumer(wg), ins, outs, scratch, barriers, item=item,
               where=consumer_where(meta, item, cta_tile(n_cluster), wg, cfg))

    ws_item_loops(meta, num_items=num_items, grid_n=grid_n, cfg=cfg,
                  compute_item=compute_item, zero_item=zero_item, is_consumer=is_consumer)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm_mgpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
             transpose_rhs: bool = False, out_dtype=None, interpret: bool = False,
             config: config_lib.GmmConfig | None = None) -> jax.Array:
  """Grouped matmul: out[rows of g] = lhs[rows of g] @ rhs[g]; rows past the sum are 0.

  Args:
    lhs: [M, K] bf16 or fp16, rows sorted by group.
    rhs: [G, K, N] (or [G, N, K] with transpose_rhs=True, used transposed in the
      kernel; no transposed copy is made), same dtype as lhs.
    group_sizes: int32 [G], rows per group, sum(group_sizes) <= M. Zeros allowed.
    transpose_rhs: whether rhs is [G, N, K].
    out_dtype: bf16, fp16 or f32 (default lhs.dtype); accumulation is float32.
    interpret: run the same kernel in the Pallas Mosaic GPU interpreter (CPU).
    config: block sizes; default `config.gmm_config(M, K, N, G)`.

  Returns:
    [M, N] in out_dtype.

  Raises:
    NotImplementedError: for inputs the kernel does not support (see
      `check_supported`).
  """
  (out,), _ = gmm_mgpu_with_epilogue(
      lhs, rhs, group_sizes, Epilogue(), (), transpose_rhs=transpose_rhs,
      out_dtype=out_dtype, interpret=interpret, config=config)
  return out


def gmm_mgpu_with_epilogue(lhs, rhs, group_sizes, epilogue: Epilogue,
                           extra_inputs: tuple, *, transpose_rhs: bool = False,
                           out_dtype=None, interpret: bool = False,
                           config: config_lib.GmmConfig | None = None):
  """`gmm_mgpu` with a custom epilogue; returns (the epilogue's outputs, metadata)."""
  out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
  cfg = check_supported(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                        out_dtype=out_dtype, interpret=interpret, config=config)
  m = lhs.shape[0]
  epilogue.check_supported(m, cfg)
  epilogue.check_smem(cfg, jnp.dtype(lhs.dtype).itemsize, out_dtype.itemsize)
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  meta = metadata_kernel.gmm_metadata(group_sizes, m, cfg.cta_tile_rows, interpret=interpret)
  warp_specialized = cfg.num_compute_wgs > 1
  kernel = launch(
      functools.partial(_gmm_kernel_ws if warp_specialized else _gmm_kernel, cfg=cfg,
                        transpose_rhs=transpose_rhs, num_items=meta.num_items,
                        epilogue=epilogue, num_extra_inputs=len(extra_inputs), n=n,
                        out_dtype=out_dtype),
      epilogue.out_types(m, n, out_dtype, meta.num_items, cfg), meta, n=n, cfg=cfg,
      interpret=interpret)
  return kernel(*meta.arrays(), lhs, rhs, *extra_inputs), meta


def launch(body, out_type, meta, *, n: int, cfg, interpret: bool):
  """plgpu.kernel of a gmm kernel body over meta's work items: one program per SM
  (or cluster) when cfg.persistent, else one per (item, n-tile of a cluster); a
  producer and cfg.num_compute_wgs consumer warpgroups when warp-specialised."""
  warp_specialized = cfg.num_compute_wgs > 1
  clusters = (dict(cluster=(cfg.cluster_n,), cluster_names=("cluster",))
              if cfg.cluster_n > 1 else {})
  return warpgroup_kernel(
      body, out_type=out_type,
      grid=((config_lib.num_sms() // cfg.cluster_n) if cfg.persistent
            else meta.num_items * (n // cfg.cluster_block_n),),
      grid_names=("sm",),
      num_threads=cfg.num_compute_wgs + 1 if warp_specialized else None,
      interpret=interpret, **clusters)


def warpgroup_kernel(body, *, out_type, grid: tuple[int, ...], grid_names: tuple[str, ...],
                     interpret: bool, num_threads: int | None = None, **kwargs):
  """plgpu.kernel in warpgroup lowering semantics (run by the Pallas GPU interpreter
  when `interpret`); `num_threads` warpgroups named "wg" for a warp-specialised
  body, one otherwise. kwargs (clusters) go to plgpu.kernel."""
  return plgpu.kernel(
      body, out_type=out_type, grid=grid, grid_names=grid_names,
      num_threads=num_threads, thread_name="wg" if num_threads else None,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None, **kwargs)
