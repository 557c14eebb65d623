"""Block configurations for the Mosaic GPU grouped GEMM kernels.

A config is a frozen dataclass that checks itself on construction; `validate_for`
checks it against a problem's sizes. `gmm_config` / `tgmm_config` pick one per
shape: the autotuned one from a tuning cache (`tuning_cache.py`, written by
`python -m pallas_kernels.autotune`) for this device, else a size heuristic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import tuning_cache

# Hopper: 228 KiB of shared memory per SM, of which a block may use 227 KiB.
SMEM_BYTES = 227 * 1024
DEFAULT_NUM_SMS = 132  # H100 SXM; used when lowering abstractly.
# Off a GPU (the Pallas interpreter on CPU) the persistent grid has this many SMs:
# the interpreter runs every SM's program in turn, and with 132 mostly idle ones the
# CPU tests ran 3x slower. Lower for a GPU from a CPU host under an abstract mesh
# (`jax.sharding.use_abstract_mesh`) to get that device's SM count.
INTERPRET_NUM_SMS = 8


def _check_multiple(name: str, value: int, of: int) -> None:
  if value <= 0 or value % of:
    raise ValueError(f"{name}={value} must be a positive multiple of {of}.")


def _check_cta_n(cfg, n: int) -> None:
  """N must split into the columns of a cluster's work items."""
  if n % cfg.cluster_block_n:
    raise NotImplementedError(
        f"N={n} is not a multiple of {cfg.cluster_n}*{cfg.num_compute_wgs}*block_n="
        f"{cfg.cluster_block_n}.")


def _check_smem(cfg, in_itemsize: int, out_itemsize: int) -> None:
  need = cfg.smem_bytes(in_itemsize, out_itemsize)
  if need > SMEM_BYTES:
    raise NotImplementedError(
        f"{cfg} needs {need} bytes of shared memory for {in_itemsize}-byte inputs "
        f"and {out_itemsize}-byte outputs (at most {SMEM_BYTES}).")


class _ConsumerTiles:
  """What GmmConfig and TgmmConfig share: num_compute_wgs consumer warpgroups, each
  on a block of getattr(self, _TILE_ROWS) x block_n outputs, side by side along N
  or (split_rows) one above the other; an epilogue that stages each consumer's
  tile epilogue_rows x epilogue_cols (or all of it) at a time; SMs in clusters of
  cluster_n side by side along N (1 unless a config has the field)."""
  _TILE_ROWS: str
  cluster_n = 1

  @property
  def cta_tile_rows(self) -> int:
    """Output rows of one work item (all consumer warpgroups together)."""
    return getattr(self, self._TILE_ROWS) * (self.num_compute_wgs if self.split_rows else 1)

  @property
  def cta_block_n(self) -> int:
    """Output columns of one work item (all consumer warpgroups together)."""
    return self.block_n * (1 if self.split_rows else self.num_compute_wgs)

  @property
  def cluster_block_n(self) -> int:
    """Output columns of the work items of one cluster of SMs."""
    return self.cta_block_n * self.cluster_n

  @property
  def staged_rows(self) -> int:
    """Rows of each consumer's epilogue staging buffer."""
    return self.epilogue_rows or getattr(self, self._TILE_ROWS)

  @property
  def staged_cols(self) -> int:
    """Columns of each consumer's epilogue staging buffer."""
    return self.epilogue_cols or self.block_n

  def _staging_bytes(self, out_itemsize: int) -> int:
    return self.num_compute_wgs * self.staged_rows * self.staged_cols * out_itemsize

  def _check_accumulator_depth_and_band(self, max_tile: int, budget: str) -> None:
    """A block_m x block_n tile of at most max_tile elements (else `budget` is
    exceeded), a pipeline of one or more stages, a planar-snake band of one or more."""
    if self.block_m * self.block_n > max_tile:
      raise ValueError(
          f"block_m*block_n={self.block_m * self.block_n} exceeds {budget}.")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1.")
    if self.grid_block_n < 1:
      raise ValueError(f"grid_block_n={self.grid_block_n} must be >= 1.")

  def _check_fits(self, in_itemsize: int) -> None:
    """ValueError unless the config fits in shared memory with 2-byte outputs."""
    if self.smem_bytes(in_itemsize, 2) > SMEM_BYTES:
      raise ValueError(
          f"{self} needs {self.smem_bytes(in_itemsize, 2)} bytes of shared memory "
          f"(at most {SMEM_BYTES}).")

  def _check_consumers_and_epilogue(self, rows_multiple: int) -> None:
    if self.num_compute_wgs not in (1, 2):
      raise ValueError(f"num_compute_wgs={self.num_compute_wgs} must be 1 or 2.")
    if self.split_rows and self.num_compute_wgs == 1:
      raise ValueError("split_rows=True needs two consumer warpgroups (num_compute_wgs=2).")
    if getattr(self, "chain_items", False) and self.num_compute_wgs == 1:
      raise ValueError("chain_items=True needs the warp-specialised kernel "
                       "(num_compute_wgs=2).")
    tile_rows = getattr(self, self._TILE_ROWS)
    if self.epilogue_rows is not None and (
        self.epilogue_rows % rows_multiple or tile_rows % self.epilogue_rows):
      raise ValueError(f"epilogue_rows={self.epilogue_rows} must be a multiple of "
                       f"{rows_multiple} that divides {self._TILE_ROWS}={tile_rows}.")
    if self.epilogue_cols is not None and (
        self.epilogue_cols % 64 or self.block_n % self.epilogue_cols):
      raise ValueError(f"epilogue_cols={self.epilogue_cols} must be a multiple of 64 that "
                       f"divides block_n={self.block_n}.")


@dataclasses.dataclass(frozen=True)
class GmmConfig(_ConsumerTiles):
  """Tiling of `gmm_mgpu`: out [M, N] in tiles of block_m x block_n, K in block_k steps.

  Attributes:
    block_m: rows of a work item (one wgmma accumulator has block_m rows).
    block_n: output columns of a work item.
    block_k: contracted columns per pipeline step (64 = one 128-byte swizzle of bf16).
    max_concurrent_steps: pipeline depth (shared-memory stages of lhs and rhs tiles).
    grid_block_n: width, in n-tiles, of the planar-snake band the persistent loop
      walks (consecutive work items share an lhs tile or an rhs tile in L2).
    num_compute_wgs: 1: one warpgroup issues the TMA loads and the wgmmas of a
      block_m x block_n tile. 2: warp-specialised, a producer warpgroup loads
      and two consumer warpgroups each compute a block_m x block_n half of a
      block_m x (2*block_n) tile (as in JAX's hopper_matmul_mgpu).
    chain_items: warp-specialised only. True: the producer warpgroup streams
      the K steps of all of an SM's work items as one pipeline, so it loads the
      next item's first tiles while the consumers run the current item's
      epilogue (Pallas' pipeline_state). Needs (K / block_k) to be a multiple
      of max_concurrent_steps. False: one pipeline per item.
    epilogue_rows: rows of the shared-memory staging buffer the epilogue
      stores through (a divisor of block_m; None = block_m). Half of block_m
      frees shared memory for a deeper pipeline; the tile then goes out in
      two passes.
    cluster_n: warp-specialised only. 2: the SMs run in clusters of two that
      compute adjacent cta_block_n-column tiles of one item and share its lhs
      tiles (each loads half and multicasts it to both), so each SM loads a
      sixth less per K step; grid_block_n then counts pairs of tiles.
      1: no clusters.
    split_rows: two consumers only. True: they take the top and bottom
      block_m rows of a (2*block_m) x block_n item tile, sharing its rhs tile
      (with block_m=64, block_n=256: 64x256 wgmmas, as in CUTLASS's
      cooperative kernels, which read each rhs tile once where a 128-row
      accumulator's two m64 wgmmas read it twice). False: the left and right
      halves of a block_m x (2*block_n) tile, sharing its lhs tile. (On the
      benchmark shapes 0.97-1.04x the default, within noise: H100, 2026-11-27.)
    epilogue_cols: columns of each consumer's staging buffer (a multiple of 64
      that divides block_n; None = block_n).
    persistent: True: one program (or cluster) per SM walks its share of the
      work items. False: one program per (item, n-tile), launched in the same
      order, so that the SMs sharing an rhs panel start it together instead of
      after however many items each has run (unchained kernels only).
  """
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 4
  num_compute_wgs: int = 1
  chain_items: bool = False
  epilogue_rows: int | None = None
  cluster_n: int = 1
  split_rows: bool = False
  epilogue_cols: int | None = None
  persistent: bool = True
  _TILE_ROWS = "block_m"

  def __post_init__(self):
    _check_multiple("block_m", self.block_m, 64)
    _check_multiple("block_n", self.block_n, 64)
    _check_multiple("block_k", self.block_k, 64)
    self._check_accumulator_depth_and_band(
        128 * 256, "one warpgroup's float32 accumulator budget (128*256 elements)")
    self._check_consumers_and_epilogue(rows_multiple=8)
    if self.cluster_n not in (1, 2):
      raise ValueError(f"cluster_n={self.cluster_n} must be 1 or 2.")
    if self.cluster_n == 2 and self.num_compute_wgs == 1:
      raise ValueError("cluster_n=2 needs the warp-specialised kernel (num_compute_wgs=2).")
    if self.chain_items and not self.persistent:
      raise ValueError("chain_items=True chains an SM's items: it needs persistent=True.")
    self._check_fits(in_itemsize=2)

  def smem_bytes(self, in_itemsize: int, out_itemsize: int) -> int:
    stage = (self.cta_tile_rows + self.cta_block_n) * self.block_k * in_itemsize
    return stage * self.max_concurrent_steps + self._staging_bytes(out_itemsize)

  def validate_for(self, k: int, n: int, in_itemsize: int = 2,
                   out_itemsize: int = 2) -> None:
    """Raises NotImplementedError unless K and N split into whole blocks and it fits."""
    _check_smem(self, in_itemsize, out_itemsize)
    if k % self.block_k:
      raise NotImplementedError(f"K={k} is not a multiple of block_k={self.block_k}.")
    if self.chain_items and (k // self.block_k) % self.max_concurrent_steps:
      raise NotImplementedError(
          f"chain_items=True needs K/block_k={k // self.block_k} to be a multiple of "
          f"max_concurrent_steps={self.max_concurrent_steps}.")
    _check_cta_n(self, n)


@dataclasses.dataclass(frozen=True)
class TgmmConfig(_ConsumerTiles):
  """Tiling of `tgmm_mgpu`: out [G, K, N] in block_k x block_n tiles, rows in block_m steps.

  Attributes:
    block_m: contracted rows per pipeline step (group boundaries are masked in it).
    block_k: output rows (the K of lhs [M, K]) of a work item.
    block_n: output columns of a work item.
    max_concurrent_steps: pipeline depth.
    grid_block_n: planar-snake band width over (k-tile, n-tile) within a group.
    warp_specialized: True: a producer warpgroup streams the row blocks of all
      of an SM's work items through one ring of max_concurrent_steps buffers,
      running ahead into the next item while the consumer warpgroups finish
      the current one (items are a few row blocks long when groups are small).
      False: one warpgroup, one pipeline per item.
    num_compute_wgs: warp-specialised only. 1: one consumer warpgroup computes
      a block_k x block_n tile. 2: two consumer warpgroups compute the left and
      right block_k x block_n halves of a block_k x (2*block_n) tile, sharing
      each lhs tile (the loads per FLOP of gmm's 128x256 tiles), or with
      split_rows the top and bottom halves of a (2*block_k) x block_n tile.
    epilogue_rows: rows of each consumer's shared-memory staging buffer for the
      output tile (a multiple of 64 that divides block_k; None = block_k). Half
      of block_k frees shared memory for a deeper ring; the tile then goes out
      in two passes.
    split_rows: two consumers only. True: they split the item's tile by rows (K),
      each sharing the rhs tile; with block_k=64 and block_n=256 each issues
      64x256 wgmmas, which read the rhs tile once where the two 128-row halves
      of a 128x128 accumulator read it twice (1/9 less shared-memory traffic
      per row block). False: they split it by columns (N).
    epilogue_cols: columns of each consumer's staging buffer (a multiple of 64
      that divides block_n; None = block_n): with split_rows' 64-row tiles, the
      way to stage a tile in parts.
  """
  block_m: int = 64
  block_k: int = 128
  block_n: int = 128
  max_concurrent_steps: int = 4
  grid_block_n: int = 4
  warp_specialized: bool = False
  num_compute_wgs: int = 1
  epilogue_rows: int | None = None
  split_rows: bool = False
  epilogue_cols: int | None = None
  _TILE_ROWS = "block_k"

  def __post_init__(self):
    _check_multiple("block_m", self.block_m, 64)
    _check_multiple("block_k", self.block_k, 64)
    _check_multiple("block_n", self.block_n, 64)
    if self.block_k * self.block_n > 128 * 256:
      raise ValueError(
          f"block_k*block_n={self.block_k * self.block_n} exceeds one warpgroup's "
          "float32 accumulator budget (128*256 elements).")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1.")
    if self.warp_specialized and self.max_concurrent_steps < 2:
      raise ValueError("warp_specialized=True keeps one wgmma in flight while it "
                       "waits for the next slot: max_concurrent_steps must be >= 2.")
    self._check_consumers_and_epilogue(rows_multiple=64)
    if self.num_compute_wgs == 2 and not self.warp_specialized:
      raise ValueError("num_compute_wgs=2 needs warp_specialized=True.")
    if self.grid_block_n < 1:
      raise ValueError(f"grid_block_n={self.grid_block_n} must be >= 1.")
    if self.smem_bytes(2, 2) > SMEM_BYTES:
      raise ValueError(
          f"{self} needs {self.smem_bytes(2, 2)} bytes of shared memory "
          f"(at most {SMEM_BYTES}).")

  def smem_bytes(self, in_itemsize: int, out_itemsize: int) -> int:
    stage = (self.cta_tile_rows + self.cta_block_n) * self.block_m * in_itemsize
    return stage * self.max_concurrent_steps + self._staging_bytes(out_itemsize)

  def validate_for(self, k: int, n: int, in_itemsize: int = 2,
                   out_itemsize: int = 2) -> None:
    """Raises NotImplementedError unless K and N split into whole blocks and it fits."""
    _check_smem(self, in_itemsize, out_itemsize)
    if k % self.cta_tile_rows:
      raise NotImplementedError(f"K={k} is not a multiple of {self.cta_tile_rows} (the "
                                "K rows of a work item).")
    _check_cta_n(self, n)


# Fp8GmmConfig.promotion: when a K block's FP8 partial sum is scaled into the sum.
PROMOTIONS = ("serial", "pairs")


@dataclasses.dataclass(frozen=True)
class Fp8GmmConfig(_ConsumerTiles):
  """Tiling of `gmm_fp8_mgpu`: out [M, N] in block_m x block_n tiles per consumer
  warpgroup, K in steps of one 128-wide scale block (a 128-byte swizzle row of e4m3).

  Attributes:
    block_m: rows of a work item.
    block_n: output columns of a consumer warpgroup's tile; divides 128, so that
      a tile reads one weight block scale per K step.
    max_concurrent_steps: pipeline depth (stages of lhs, rhs and row-scale tiles).
    grid_block_n: planar-snake band width, as GmmConfig's.
    num_compute_wgs: 1: one warpgroup loads and computes (`promotion` says when
      it promotes each K block's partial sum). 2: warp-specialised, a producer
      warpgroup loads and two consumer warpgroups compute the left and right
      block_m x block_n halves of a block_m x (2*block_n) item (sharing its lhs
      tile), so that one's promotion can run beside the other's wgmma.
    epilogue_rows: rows of each consumer's staging buffer (None = block_m).
    split_rows: two consumers only. True: they take the top and bottom block_m x
      block_n halves of a (2*block_m) x block_n item (sharing its rhs tile): a
      128 x 128 item reads 32 KiB a K step for 4.2 MFLOP where a 64 x 256 one reads
      40 KiB.
    chain_items: two consumers only. True: the producer streams the K steps of
      all of an SM's items as one pipeline, so the next item's first tiles load
      while the consumers store the current one (K/128 a multiple of
      max_concurrent_steps).
    promotion: when the one-warpgroup kernel promotes each K block's partial
      sum (ignored with two warpgroups). "serial": one K block a step, its wgmma
      awaited before the promotion, so the tensor core idles meanwhile.
      "pairs": two K blocks a step, the first one promoted under the second
      one's wgmma; two partial accumulators besides the sum (block_m*block_n
      <= 64*128), K a multiple of 256.
  """
  block_m: int = 128
  block_n: int = 128
  max_concurrent_steps: int = 4
  grid_block_n: int = 4
  num_compute_wgs: int = 1
  epilogue_rows: int | None = None
  promotion: str = "serial"
  split_rows: bool = False
  chain_items: bool = False
  # What the shared gmm helpers read, fixed for this kernel.
  block_k = 128
  epilogue_cols = None
  persistent = True
  _TILE_ROWS = "block_m"

  def __post_init__(self):
    _check_multiple("block_m", self.block_m, 64)
    if self.block_n not in (64, 128):
      raise ValueError(f"block_n={self.block_n} must be 64 or 128 (a divisor of the "
                       "128-column weight scale block).")
    if self.promotion not in PROMOTIONS:
      raise ValueError(f"promotion={self.promotion!r} must be one of {PROMOTIONS}.")
    if self.promotion != "serial":
      if self.num_compute_wgs != 1:
        raise ValueError(f"promotion={self.promotion!r} is a schedule of the "
                         "one-warpgroup kernel (num_compute_wgs=1).")
      self._check_accumulator_depth_and_band(
          64 * 128, f"64*128: with promotion={self.promotion!r} the warpgroup holds "
          "three float32 accumulators (the sum and two K blocks' partials)")
    self._check_accumulator_depth_and_band(
        128 * 128, "128*128: the warpgroup holds two float32 accumulators (the sum and "
        "a K block's partial)")
    self._check_consumers_and_epilogue(rows_multiple=8)
    self._check_fits(in_itemsize=1)

  @property
  def step_k(self) -> int:
    """K columns a pipeline step loads: one scale block, two with a two-block
    promotion schedule."""
    return self.block_k * (1 if self.promotion == "serial" else 2)

  def smem_bytes(self, in_itemsize: int = 1, out_itemsize: int = 2) -> int:
    """Pipeline stages (lhs and rhs tiles, float32 row scales) and the staging buffer."""
    blocks = self.step_k // self.block_k
    stage = blocks * ((self.cta_tile_rows + self.cta_block_n) * self.block_k * in_itemsize
                      + self.cta_tile_rows * 4)
    return stage * self.max_concurrent_steps + self._staging_bytes(out_itemsize)

  def validate_for(self, k: int, n: int, in_itemsize: int = 1,
                   out_itemsize: int = 2) -> None:
    """GmmConfig's check of a problem, K in steps of step_k."""
    GmmConfig.validate_for(self, k, n, in_itemsize, out_itemsize)
    if k % self.step_k:
      raise NotImplementedError(
          f"K={k} is not a multiple of {self.step_k} (two 128-wide K blocks a step "
          f"with promotion={self.promotion!r}).")


# split_rows by default where the mean expert has this many rows (M / G) or more: its
# 128-row items then pad an expert's last item by at most 1/8 of the expert's rows.
# On an H100 split_rows won at M/G = 2048 and lost at 256 (BENCHMARKS.md).
SPLIT_ROWS_MIN_MEAN_ROWS = 512


def fp8_gmm_config(m: int, k: int, n: int, g: int, out_itemsize: int = 2, *,
                   block_m: int = 64, split_rows: bool | None = None,
                   chain_items: bool = True, **fields) -> Fp8GmmConfig:
  """The config `gmm_fp8_mgpu` runs by default (not autotuned): 64-row tiles, a
  producer and two consumer warpgroups, each promoting while the other's wgmma runs,
  with an SM's items chained into one pipeline, at the deepest depth, up to 6
  stages, that divides K/128 and fits with 4 KiB to spare (barriers, and the 1 KiB
  alignment of the swizzled tiles next to the 512-byte row-scale buffers).

  The two consumers sit one above the other on 128 x 128 items (split_rows: 32 KiB
  read a K step where a 64 x 256 item reads 40 KiB for the same FLOPs) where the
  mean expert has `SPLIT_ROWS_MIN_MEAN_ROWS` rows or more, else side by side on
  64 x 256 items where N splits into them; with neither, one warpgroup with
  promotion="pairs" where K is a multiple of 256, else "serial". On an H100 this
  ran fastest of the measured variants at the benchmark shapes (BENCHMARKS.md);
  128-row consumer tiles hold 2 x 128 float32 accumulator registers a thread, the
  whole register file.

  split_rows=True / False forces the choice (True needs M >= 2 * block_m);
  chain_items=False gives each item a pipeline of its own (unchained also where no
  depth divides K/128). block_m alone keeps the default schedule; any other
  Fp8GmmConfig field (e.g. num_compute_wgs=1) picks a variant (Fp8GmmConfig's
  defaults for the rest, side by side unless split_rows=True), deepened the same way.
  """
  if split_rows is None:
    split_rows = not fields and m >= SPLIT_ROWS_MIN_MEAN_ROWS * g
  split_rows = split_rows and m >= 2 * block_m
  if split_rows:
    fields = dict(fields, num_compute_wgs=2, split_rows=True)
  elif not fields:
    fields = (dict(num_compute_wgs=2) if n % (2 * Fp8GmmConfig.block_n) == 0
              else dict(promotion="pairs") if k % (2 * Fp8GmmConfig.block_k) == 0 else {})
  def deepest(steps, **extra):
    make = lambda s: Fp8GmmConfig(block_m, 128, s, **fields, **extra)  # noqa: E731
    return _deepest(make, steps, out_itemsize, in_itemsize=1, spare_bytes=4096)

  chained = None
  if chain_items and fields.get("num_compute_wgs") == 2:
    chained = deepest([s for s in (6, 5, 4, 3, 2) if (k // Fp8GmmConfig.block_k) % s == 0],
                      chain_items=True)
  return chained or deepest((6, 5, 4, 3, 2)) or Fp8GmmConfig(block_m, 64, 2, **fields)


_WS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=3,
           num_compute_wgs=2)
_CHAINED = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                num_compute_wgs=2, chain_items=True, epilogue_rows=64)


# tgmm_fp8's default where it tiles K and N: a producer and two consumers one above
# the other on 128 x 128 items; on an H100 0.76x the one-warpgroup kernel's time
# (BENCHMARKS.md).
_FP8_TGMM_WS = dict(block_k=64, max_concurrent_steps=4, num_compute_wgs=2, split_rows=True)


def fp8_tgmm_config(k: int, n: int, out_itemsize: int = 4) -> Fp8TgmmConfig:
  """The config `tgmm_fp8_mgpu` runs by default for out [G, K, N]: warp-specialised
  (`_FP8_TGMM_WS`) where it tiles K and N and fits, else one warpgroup."""
  return (_fitting(Fp8TgmmConfig, _FP8_TGMM_WS, k, n, 1, out_itemsize)
          or Fp8TgmmConfig())


def _largest_dividing(n: int, candidates: tuple[int, ...]) -> int | None:
  return next((c for c in candidates if n % c == 0), None)


def _deepest(make, steps, out_itemsize: int, in_itemsize: int = 2, spare_bytes: int = 0):
  """The first config make(s) for s in steps that is valid and fits in shared memory
  with spare_bytes to spare."""
  for s in steps:
    try:
      cfg = make(s)
    except ValueError:
      continue
    if cfg.smem_bytes(in_itemsize, out_itemsize) <= SMEM_BYTES - spare_bytes:
      return cfg
  return None


def _fitting(config_cls, fields: dict | None, k: int, n: int, in_itemsize: int,
             out_itemsize: int):
  """config_cls(**fields) if it is a valid config that tiles K and N and fits in
  shared memory (`validate_for`), else None: a cache entry written by hand or by
  another version of this package must not make a supported shape fail."""
  if not fields:
    return None
  try:
    cfg = config_cls(**fields)
    cfg.validate_for(k, n, in_itemsize, out_itemsize)
  except (TypeError, ValueError, NotImplementedError):
    return None
  return cfg


def gmm_config(m: int, k: int, n: int, g: int, out_itemsize: int = 2,
               transpose_rhs: bool = False, *, dtype=jnp.bfloat16,
               device_kind: str | None = None) -> GmmConfig:
  """The config `gmm_mgpu` runs by default on lhs [M, K], rhs [G, K, N] (or [G, N, K]).

  The autotuned one for (M bucket, K, N, G, dtype, out bytes, device kind) when a
  tuning cache has it (`tuning_cache`, written by `python -m pallas_kernels.autotune`)
  and it tiles K and N and fits in shared memory, else `heuristic_gmm_config`.
  `transpose_rhs=True` (the input gradient, rhs stored [G, N, K]) has entries of
  its own. `device_kind` defaults to the device the kernel is lowered for
  (`current_device_kind`).
  """
  fields = tuning_cache.lookup("gmm_t" if transpose_rhs else "gmm", m, k, n, g,
                               dtype=dtype, out_itemsize=out_itemsize,
                               device_kind=device_kind or current_device_kind())
  tuned = _fitting(GmmConfig, fields, k, n, jnp.dtype(dtype).itemsize, out_itemsize)
  return tuned or heuristic_gmm_config(m, k, n, g, out_itemsize)


def heuristic_gmm_config(m: int, k: int, n: int, g: int,
                         out_itemsize: int = 2) -> GmmConfig:
  """A config for shapes no tuning cache holds, by a size rule.

  Rule (from the H100/H200 sweeps): when N splits into 256-column tiles,
  the warp-specialised kernel with two 128x128 consumer warpgroups; its items
  chained into one 4-deep pipeline per SM with the epilogue staged in 64-row
  halves when K/64 is a multiple of 4 and groups average 256 rows or more (at
  128 rows a group, G=256, chaining was 20% slower), else a 3-deep pipeline
  per item, in clusters of two SMs that share the lhs tiles when groups average
  under 256 rows and N splits into pairs of 256-column tiles (G=256 dgrad,
  M=32768, 2048 contracted, N=7168: 1.18x; 0.92-1.00x on the other shapes'
  forward and dgrad, which keep the chained kernel; H100, 2026-11-26).
  Otherwise one warpgroup with a 128x(192|128) tile (about the largest
  float32 accumulator a warpgroup holds in registers) and the deepest
  pipeline that fits. Small M gets 64-row tiles.
  """
  block_m = 128 if m >= 128 * 8 else 64
  if block_m == 128 and n % 256 == 0:
    small_groups = m < 256 * g
    clustered = GmmConfig(**_WS, grid_block_n=8, cluster_n=2)
    candidates = [clustered if small_groups and n % clustered.cluster_block_n == 0
                  else GmmConfig(**_WS, grid_block_n=8)]
    if (k // 64) % _CHAINED["max_concurrent_steps"] == 0 and not small_groups:
      candidates.insert(0, GmmConfig(**_CHAINED, grid_block_n=8))
    for cfg in candidates:
      if cfg.smem_bytes(2, out_itemsize) <= SMEM_BYTES:
        return cfg
  # A 128x256 float32 accumulator would take all 255 registers of a thread.
  block_n = _largest_dividing(n, (192, 128, 64) if block_m == 128 else (256, 128, 64))
  cfg = _deepest(lambda s: GmmConfig(block_m, block_n, 64, s), (5, 4, 3, 2), out_itemsize)
  return cfg or GmmConfig(block_m=block_m, block_n=64, block_k=64)


def tgmm_config(m: int, k: int, n: int, g: int, out_itemsize: int = 2, *,
                dtype=jnp.bfloat16, device_kind: str | None = None) -> TgmmConfig:
  """The config `tgmm_mgpu` runs by default on lhs [M, K], rhs [M, N] -> [G, K, N].

  The autotuned one when a tuning cache has it and it tiles K and N and fits (as
  `gmm_config`), else `heuristic_tgmm_config`.
  """
  fields = tuning_cache.lookup("tgmm", m, k, n, g, dtype=dtype, out_itemsize=out_itemsize,
                               device_kind=device_kind or current_device_kind())
  tuned = _fitting(TgmmConfig, fields, k, n, jnp.dtype(dtype).itemsize, out_itemsize)
  return tuned or heuristic_tgmm_config(m, k, n, g, out_itemsize)


def heuristic_tgmm_config(m: int, k: int, n: int, g: int,
                          out_itemsize: int = 2) -> TgmmConfig:
  """A config for shapes no tuning cache holds, by a size rule.

  Rule (from the H100 sweeps of 2026-11-26 and 2026-11-27): the
  warp-specialised kernel with 64-row steps. With 16-bit outputs, K a multiple
  of 128 and N of 256: two consumer warpgroups on a 128x256 tile, one on its
  top and one on its bottom 64 rows (split_rows), with a 4-slot ring and the
  output staged in 64x128 chunks. Against the consumers side by side (two
  128x128 halves, 4 slots, 64-row chunks; 3 slots and whole tiles at G=256):
  1.00-1.05x on the six benchmark shapes (1.04-1.09x at equal slots and
  staging), as a 64x256 wgmma reads its rhs tile once where a 128x128 one reads
  it twice, so each row block costs 1/9 less shared-memory traffic. Otherwise
  one consumer warpgroup on a 128x128 tile and the deepest ring that fits (5
  slots): 1.06-1.40x the one-warpgroup kernel on all six benchmark shapes;
  128-row steps (3 slots) were 0.7-1.0x.
  """
  if out_itemsize == 2 and k % 128 == 0 and n % 256 == 0:
    return TgmmConfig(64, 64, 256, max_concurrent_steps=4, grid_block_n=8,
                      warp_specialized=True, num_compute_wgs=2, split_rows=True,
                      epilogue_cols=128)
  block_k = _largest_dividing(k, (128, 64)) or 64
  # 128x128: a larger float32 accumulator crowds one warpgroup's registers.
  block_n = _largest_dividing(n, (128, 64)) or 64
  cfg = _deepest(lambda s: TgmmConfig(64, block_k, block_n, s, warp_specialized=True),
                 (5, 4, 3, 2), out_itemsize)
  return cfg or TgmmConfig(block_m=64, block_k=64, block_n=64, warp_specialized=True)


def num_sms() -> int:
  """SM count of the device the kernel is lowered for: the abstract mesh's device if
  there is one, else the first device (INTERPRET_NUM_SMS off a GPU)."""
  mesh = jax.sharding.get_abstract_mesh()
  abstract_device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  if abstract_device is not None and getattr(abstract_device, "num_cores", None):
    return abstract_device.num_cores
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return DEFAULT_NUM_SMS
  if device.platform == "gpu":
    return getattr(device, "core_count", None) or DEFAULT_NUM_SMS
  return INTERPRET_NUM_SMS


def current_device_kind() -> str | None:
  """`device_kind` of the device kernels are lowered for: the abstract mesh's device if
  there is one, else the first GPU; None off a GPU (the interpreter: no tuned configs)."""
  mesh = jax.sharding.get_abstract_mesh()
  abstract_device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  if abstract_device is not None and getattr(abstract_device, "device_kind", None):
    return abstract_device.device_kind
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return None
  return device.device_kind if device.platform == "gpu" else None


@dataclasses.dataclass(frozen=True)
class Fp8TgmmConfig(_ConsumerTiles):
  """Tiling of `tgmm_fp8_mgpu`: out [G, K, N] in block_k x block_n tiles per
  consumer warpgroup, the contracted (group-aligned) rows in steps of block_m = 128,
  one scale block.

  Attributes:
    block_k: output rows (the K of the weight gradient [G, K, N]) of a consumer's tile.
    block_n: output columns of a consumer's tile.
    max_concurrent_steps: pipeline depth (stages of both operand tiles and their
      scales).
    grid_block_n: planar-snake band width over (k-tile, n-tile) within a group.
    epilogue_rows: rows of each consumer's output staging buffer (a multiple of 64
      that divides block_k; None = block_k).
    num_compute_wgs: 1: one warpgroup loads and computes, each row block's wgmma
      awaited before its promotion. 2: warp-specialised, a producer warpgroup loads
      and two consumer warpgroups compute the left and right block_k x block_n
      halves of a block_k x (2*block_n) item, so that one's promotion runs beside
      the other's wgmma.
    split_rows: two consumers only. True: they take the top and bottom halves of a
      (2*block_k) x block_n item instead (sharing its rhs tile).
  """
  block_k: int = 128
  block_n: int = 128
  max_concurrent_steps: int = 4
  grid_block_n: int = 4
  epilogue_rows: int | None = 64
  num_compute_wgs: int = 1
  split_rows: bool = False
  # What the shared helpers read, fixed for this kernel.
  block_m = 128
  epilogue_cols = None
  _TILE_ROWS = "block_k"

  def __post_init__(self):
    _check_multiple("block_k", self.block_k, 64)
    _check_multiple("block_n", self.block_n, 64)
    budget = 128 * 128 if self.num_compute_wgs == 1 else 64 * 128
    if self.block_k * self.block_n > budget:
      raise ValueError(
          f"block_k*block_n={self.block_k * self.block_n} exceeds {budget}: each "
          "consumer holds two float32 accumulators (the sum and a row block's partial)"
          + (" beside the producer's registers" if self.num_compute_wgs > 1 else "") + ".")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1.")
    if self.grid_block_n < 1:
      raise ValueError(f"grid_block_n={self.grid_block_n} must be >= 1.")
    self._check_consumers_and_epilogue(rows_multiple=64)
    self._check_fits(in_itemsize=1)

  def smem_bytes(self, in_itemsize: int = 1, out_itemsize: int = 2) -> int:
    """Pipeline stages (both operand tiles and their float32 scales) and the staging
    buffers."""
    stage = (self.cta_tile_rows + self.cta_block_n) * (self.block_m * in_itemsize + 4)
    return stage * self.max_concurrent_steps + self._staging_bytes(out_itemsize)

  def validate_for(self, k: int, n: int, in_itemsize: int = 1,
                   out_itemsize: int = 2) -> None:
    """TgmmConfig's check of a problem."""
    TgmmConfig.validate_for(self, k, n, in_itemsize, out_itemsize)
