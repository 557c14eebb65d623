"""Blockwise-scaled FP8 grouped GEMM (`gmm_fp8_mgpu`) on CPU: the Pallas GPU
interpreter against a float64 NumPy reference on the dequantised operands, and the
real kernel lowered for `cuda` (abstract H100) at benchmark sizes, with its wgmma
checked to be e4m3 x e4m3."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuda_lowering import lower_for_h100
from numpy_reference import assert_close, gmm as gmm_reference
from pallas_kernels import config as config_lib
from pallas_kernels import quantize
from pallas_kernels.gmm_fp8_mgpu import gmm_fp8_mgpu
from test_mgpu_kernels_gpu import _group_sizes as gpu_group_sizes

BLOCK = quantize.BLOCK
# Products of e4m3 values are exact in float32 and the interpreter sums them in
# float32; the output rounding dominates.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def dequantize_rows_np(values, scales):
  """[M, K] e4m3 values, [K // 128, M] scales -> float64 [M, K]."""
  return np.float64(values) * np.repeat(np.float64(scales).T, BLOCK, axis=1)


def dequantize_blocks_np(values, scales):
  """[G, A, B] e4m3 values, [G, A // 128, B // 128] scales -> float64 [G, A, B]."""
  expanded = np.repeat(np.repeat(np.float64(scales), BLOCK, axis=1), BLOCK, axis=2)
  return np.float64(values) * expanded


def _blocky(rng, shape, axes_blocks):
  """Normal values times a random power of ten per 128-block along `axes_blocks`
  (so that a scale read for the wrong block shows)."""
  x = rng.standard_normal(shape)
  mag_shape = [s // BLOCK if a in axes_blocks else s for a, s in enumerate(shape)]
  mags = 10.0 ** rng.uniform(-2, 2, mag_shape)
  for a in axes_blocks:
    mags = np.repeat(mags, BLOCK, axis=a)
  return jnp.asarray(x * mags, jnp.float32)


def _operands(rng, m, k, n, g, *, dgrad=False):
  """(lhs values, lhs scales, rhs values [G, N, K], rhs scales [G, K//128, N//128]).

  Forward: rhs = w [G, K, N] as `values_t`. dgrad: w is [G, N, K] (the output
  width N of dy @ w.T is w's input width) and rhs is its `values` as stored, with
  the block scales swapped into rhs's [G, K // 128, N // 128] order.
  """
  xq = quantize.quantize_rows(_blocky(rng, (m, k), (1,)))
  if dgrad:
    wq = quantize.quantize_blocks(_blocky(rng, (g, n, k), (1, 2)))
    return xq.values, xq.scales, wq.values, jnp.swapaxes(wq.scales, 1, 2)
  wq = quantize.quantize_blocks(_blocky(rng, (g, k, n), (1, 2)))
  return xq.values, xq.scales, wq.values_t, wq.scales


def _reference(lhs_values, lhs_scales, rhs_values, rhs_scales, sizes):
  lhs = dequantize_rows_np(lhs_values, lhs_scales)
  rhs = dequantize_blocks_np(jnp.swapaxes(rhs_values, 1, 2), rhs_scales)  # [G, K, N]
  return gmm_reference(lhs, rhs, sizes)


SMALL = config_lib.Fp8GmmConfig(block_m=64, block_n=128, max_concurrent_steps=2)
WS = config_lib.Fp8GmmConfig(block_m=64, block_n=64, max_concurrent_steps=2,
                             num_compute_wgs=2)
PAIRS = config_lib.Fp8GmmConfig(block_m=64, block_n=128, max_concurrent_steps=2,
                                  promotion="pairs")
SPLIT = config_lib.Fp8GmmConfig(block_m=64, block_n=128, max_concurrent_steps=3,
                                num_compute_wgs=2, split_rows=True)
CASES = [
    # (M, K, N, group_sizes, out dtype, config, dgrad)
    (256, 256, 256, [50, 0, 131, 75], jnp.float32, None, False),  # an empty group
    (256, 256, 256, [50, 0, 131, 75], jnp.bfloat16, None, True),
    (256, 256, 256, [0, 256, 0], jnp.bfloat16, None, False),  # all rows in one group
    (200, 256, 128, [17, 0, 0, 150], jnp.float32, None, True),  # 33 padding rows
    (256, 128, 256, [0, 0, 0], jnp.bfloat16, None, False),  # all padding
    (40, 128, 128, [3, 30], jnp.float32, None, False),  # M < block_m
    # 128-row tiles of 64 columns (two tiles per weight block), 8-aligned rows,
    # a 3-deep pipeline over 3 K blocks, the epilogue in 32-row passes.
    (392, 384, 256, [17, 0, 70, 305], jnp.float32,
     config_lib.Fp8GmmConfig(block_m=128, block_n=64, max_concurrent_steps=3,
                             epilogue_rows=32), False),
    # Warp-specialised: a producer and two consumer warpgroups side by side.
    (256, 256, 256, [50, 0, 131, 75], jnp.float32, WS, False),
    (200, 384, 256, [17, 0, 0, 150], jnp.bfloat16, WS, True),
    (392, 256, 512, [17, 0, 70, 305], jnp.float32,
     config_lib.Fp8GmmConfig(block_m=128, block_n=128, max_concurrent_steps=2,
                             num_compute_wgs=2, epilogue_rows=64), False),
    (256, 128, 128, [0, 0, 0], jnp.bfloat16, WS, False),
    # Warp-specialised, the two consumers one above the other on 128 x 128 items.
    (392, 384, 256, [17, 0, 70, 305], jnp.float32, SPLIT, False),
    (200, 256, 256, [0, 137, 0, 30], jnp.bfloat16, SPLIT, True),
    (256, 128, 128, [0, 0, 0], jnp.bfloat16, SPLIT, False),
    # One warpgroup, each K block promoted under the next block's wgmma.
    (256, 512, 256, [50, 0, 131, 75], jnp.float32, PAIRS, False),
    (200, 256, 128, [17, 0, 0, 150], jnp.bfloat16, PAIRS, True),
    (40, 256, 128, [3, 30], jnp.float32, PAIRS, False),
]


@pytest.mark.parametrize("m,k,n,sizes,out_dtype,cfg,dgrad", CASES)
def test_gmm_fp8_interpret(m, k, n, sizes, out_dtype, cfg, dgrad):
  rng = np.random.default_rng(m + k + len(sizes))
  operands = _operands(rng, m, k, n, len(sizes), dgrad=dgrad)
  out = gmm_fp8_mgpu(*operands, jnp.asarray(sizes, jnp.int32), out_dtype=out_dtype,
                     interpret=True, config=cfg or SMALL)
  assert out.shape == (m, n) and out.dtype == out_dtype
  out = np.asarray(out.astype(jnp.float32))
  used = sum(sizes)
  assert (out[used:] == 0).all(), "padding rows must be zeros"
  if used:
    assert_close(out[:used], _reference(*operands, sizes)[:used], TOL[out_dtype])


WS_CHAINED = config_lib.Fp8GmmConfig(block_m=64, block_n=64, max_concurrent_steps=2,
                                     num_compute_wgs=2, chain_items=True)
SPLIT_CHAINED = dataclasses.replace(SPLIT, max_concurrent_steps=2, chain_items=True)
CHAINED_CASES = [
    # (M, K, N, group_sizes, out dtype, config, dgrad, SMs)
    (344, 256, 256, [50, 0, 90, 30, 0, 101], jnp.bfloat16, WS_CHAINED, False, 3),
    (200, 512, 128, [17, 0, 0, 150], jnp.float32, WS_CHAINED, True, 2),  # padding rows
    (200, 256, 128, [7, 0, 1], jnp.float32, WS_CHAINED, False, 4),  # lone items
    (392, 256, 256, [17, 0, 70, 305], jnp.float32, SPLIT_CHAINED, False, 3),
    (344, 512, 256, [0, 137, 0, 30, 0, 101], jnp.bfloat16, SPLIT_CHAINED, True, 2),
    (256, 256, 128, [0, 0, 0], jnp.bfloat16, SPLIT_CHAINED, False, 2),  # all padding
]


@pytest.mark.parametrize("m,k,n,sizes,out_dtype,cfg,dgrad,sms", CHAINED_CASES)
def test_gmm_fp8_interpret_chained(m, k, n, sizes, out_dtype, cfg, dgrad, sms, monkeypatch):
  """Few SMs, so that each runs a chain of several items (and some a lone item)."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: sms)
  test_gmm_fp8_interpret(m, k, n, sizes, out_dtype, cfg, dgrad)


def test_gmm_fp8_interpret_default_config_few_sms(monkeypatch):
  """The default config (warp-specialised 64x256 items, a deep pipeline), two SMs
  that each walk several (item, n-tile) pairs."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: 2)
  m, k, n, sizes = 264, 512, 256, [100, 0, 64, 92]
  assert config_lib.fp8_gmm_config(m, k, n, 4).max_concurrent_steps >= 4
  rng = np.random.default_rng(1)
  operands = _operands(rng, m, k, n, len(sizes))
  out = gmm_fp8_mgpu(*operands, jnp.asarray(sizes, jnp.int32), out_dtype=jnp.float32,
                     interpret=True)
  out = np.asarray(out)
  assert (out[sum(sizes):] == 0).all()
  assert_close(out, _reference(*operands, sizes), TOL[jnp.float32])


def _lower(m, k, n, g, out_dtype=jnp.bfloat16, config=None) -> str:
  f8 = quantize.FP8
  return lower_for_h100(
      lambda a, s, b, t, c: gmm_fp8_mgpu(a, s, b, t, c, out_dtype=out_dtype, config=config),
      jax.ShapeDtypeStruct((m, k), f8), jax.ShapeDtypeStruct((k // BLOCK, m), jnp.float32),
      jax.ShapeDtypeStruct((g, n, k), f8),
      jax.ShapeDtypeStruct((g, k // BLOCK, n // BLOCK), jnp.float32),
      jax.ShapeDtypeStruct((g,), jnp.int32))


@pytest.mark.parametrize("m,k,n,g,out_dtype,cfg", [
    (16384, 4096, 2048, 8, jnp.bfloat16, None),   # forward, 8 experts
    (16384, 2048, 4096, 8, jnp.bfloat16, None),   # its dgrad
    (16384, 4096, 1024, 64, jnp.float32, None),
    (16384, 1024, 4096, 64, jnp.bfloat16, None),
    (32768, 7168, 2048, 256, jnp.bfloat16, None),
    (40, 256, 256, 2, jnp.bfloat16, None),  # M < block_m: TMA boxes past M
    (4096, 1024, 1024, 64, jnp.float32,
     config_lib.Fp8GmmConfig(block_m=128, block_n=64, max_concurrent_steps=3,
                             epilogue_rows=64)),
    # Warp-specialised, 128x256 items.
    (16384, 4096, 2048, 8, jnp.bfloat16,
     config_lib.Fp8GmmConfig(max_concurrent_steps=3, num_compute_wgs=2)),
    (16384, 1024, 4096, 64, jnp.float32,
     config_lib.Fp8GmmConfig(max_concurrent_steps=3, num_compute_wgs=2, epilogue_rows=64)),
    (16384, 4096, 2048, 8, jnp.bfloat16,  # 64x256 items
     config_lib.Fp8GmmConfig(block_m=64, max_concurrent_steps=4, num_compute_wgs=2)),
    (16384, 4096, 2048, 8, jnp.bfloat16,  # 128x128 items, consumers one above the other
     config_lib.Fp8GmmConfig(block_m=64, max_concurrent_steps=5, num_compute_wgs=2,
                             split_rows=True)),
    (16384, 1024, 4096, 64, jnp.float32,
     config_lib.Fp8GmmConfig(block_m=64, max_concurrent_steps=4, num_compute_wgs=2,
                             split_rows=True)),
    # Chained items: the producer streams all of an SM's items as one pipeline.
    (16384, 4096, 2048, 8, jnp.bfloat16,
     config_lib.fp8_gmm_config(16384, 4096, 2048, 8, chain_items=True)),
    (16384, 1024, 4096, 64, jnp.float32,
     config_lib.fp8_gmm_config(16384, 1024, 4096, 64, 4, split_rows=True, chain_items=True)),
    # Overlapped promotion: two K blocks a step.
    (16384, 4096, 2048, 8, jnp.bfloat16,
     config_lib.Fp8GmmConfig(block_m=64, max_concurrent_steps=4, promotion="pairs")),
    (16384, 1024, 4096, 64, jnp.float32,
     config_lib.Fp8GmmConfig(block_m=64, max_concurrent_steps=3, promotion="pairs")),
])
def test_gmm_fp8_lowers_for_h100_with_e4m3_wgmma(m, k, n, g, out_dtype, cfg):
  text = _lower(m, k, n, g, out_dtype, cfg)
  assert "mosaic_gpu" in text
  # The kernel's PTX: every wgmma reads e4m3 x e4m3 (both operands K-major:
  # FP8 wgmma has no transpose bits) into float32.
  wgmmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", text)
  assert wgmmas and all(w.endswith(".f32.e4m3.e4m3") for w in wgmmas), wgmmas
  # The operands go in as the quantisers laid them out: no XLA transpose.
  assert "stablehlo.transpose" not in text
  # Overlapped promotion reads the first partial with the second wgmma in flight.
  waits = set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d)", text))
  assert waits == ({"0", "1"} if cfg is not None and cfg.promotion != "serial" else {"0"}), waits


@pytest.mark.parametrize("change,error,match", [
    (dict(lhs_dtype=jnp.bfloat16), NotImplementedError, "lhs_values"),
    (dict(out_dtype=jnp.float16), NotImplementedError, "bf16 or f32"),
    (dict(k=192), NotImplementedError, "K=192"),
    (dict(n=192), NotImplementedError, "N=192"),
    (dict(m=252), NotImplementedError, "M=252"),
    (dict(lhs_scales_shape=(2, 128)), ValueError, "lhs_scales"),
    (dict(interpret=False), NotImplementedError, "Hopper"),
    (dict(config=config_lib.Fp8GmmConfig(max_concurrent_steps=6), out_dtype=jnp.float32),
     NotImplementedError, "shared memory"),
    (dict(m=64, config=SPLIT), NotImplementedError, "M=64 is fewer than the 128 rows"),
])
def test_gmm_fp8_unsupported(change, error, match):
  if not change.get("interpret", True) and jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  m, k, n, g = change.get("m", 256), change.get("k", 256), change.get("n", 256), 2
  lhs = jnp.zeros((m, k), change.get("lhs_dtype", quantize.FP8))
  lhs_scales = jnp.ones(change.get("lhs_scales_shape", (k // BLOCK, m)), jnp.float32)
  rhs = jnp.zeros((g, n, k), quantize.FP8)
  rhs_scales = jnp.ones((g, k // BLOCK, n // BLOCK), jnp.float32)
  with pytest.raises(error, match=match):
    gmm_fp8_mgpu(lhs, lhs_scales, rhs, rhs_scales, jnp.zeros((g,), jnp.int32),
                 out_dtype=change.get("out_dtype", jnp.bfloat16),
                 interpret=change.get("interpret", True), config=change.get("config"))


def test_fp8_config_validates_itself():
  with pytest.raises(ValueError, match="block_n=256"):
    config_lib.Fp8GmmConfig(block_n=256)
  with pytest.raises(ValueError, match="block_m"):
    config_lib.Fp8GmmConfig(block_m=96)
  with pytest.raises(ValueError, match="two float32 accumulators"):
    config_lib.Fp8GmmConfig(block_m=256)
  with pytest.raises(ValueError, match="num_compute_wgs=3"):
    config_lib.Fp8GmmConfig(num_compute_wgs=3)
  with pytest.raises(NotImplementedError, match="2\\*block_n=256"):
    config_lib.Fp8GmmConfig(max_concurrent_steps=2, num_compute_wgs=2).validate_for(
        1024, 384, 1, 2)
  with pytest.raises(ValueError, match="shared memory"):
    config_lib.Fp8GmmConfig(max_concurrent_steps=8)
  with pytest.raises(ValueError, match="three float32 accumulators"):
    config_lib.Fp8GmmConfig(promotion="pairs")  # 128x128 tiles
  with pytest.raises(ValueError, match="must be one of"):
    config_lib.Fp8GmmConfig(block_m=64, promotion="overlap")
  with pytest.raises(ValueError, match="one-warpgroup"):
    config_lib.Fp8GmmConfig(block_m=64, block_n=64, num_compute_wgs=2,
                            promotion="pairs")
  overlap = config_lib.Fp8GmmConfig(block_m=64, max_concurrent_steps=3,
                                    promotion="pairs")
  assert overlap.step_k == 256
  assert overlap.smem_bytes(1, 2) == 3 * 2 * (192 * 128 + 256) + 64 * 128 * 2
  with pytest.raises(NotImplementedError, match="K=384 is not a multiple of 256"):
    overlap.validate_for(384, 256, 1, 2)
  # The default: chained, split_rows where the mean expert has 512 rows or more.
  for g, split in ((8, True), (32, True), (33, False), (64, False)):
    cfg = config_lib.fp8_gmm_config(16384, 4096, 2048, g)
    assert (cfg.block_m, cfg.num_compute_wgs, cfg.split_rows, cfg.chain_items) == (
        64, 2, split, True), g
    assert (4096 // 128) % cfg.max_concurrent_steps == 0
  assert not config_lib.fp8_gmm_config(16384, 4096, 2048, 8, promotion="pairs").split_rows
  cfg = config_lib.fp8_gmm_config(16384, 4096, 2048, 8, split_rows=False, chain_items=False)
  assert (cfg.block_m, cfg.block_n, cfg.num_compute_wgs, cfg.promotion, cfg.split_rows,
          cfg.chain_items) == (64, 128, 2, "serial", False, False)
  # Per stage: the lhs tile, both consumers' rhs tiles, the row scales; one staging
  # buffer per consumer.
  assert cfg.smem_bytes(1, 2) == (cfg.max_concurrent_steps * (64 * 128 + 256 * 128 + 256)
                                  + 2 * 64 * 128 * 2)
  split = config_lib.fp8_gmm_config(16384, 4096, 384, 8, split_rows=True,  # any N of 128s
                                    chain_items=False)
  assert (split.split_rows, split.cta_tile_rows, split.cta_block_n) == (True, 128, 128)
  # Per stage: both consumers' lhs tiles, the shared rhs tile, the row scales.
  assert split.smem_bytes(1, 2) == 5 * (128 * 128 + 128 * 128 + 512) + 2 * 64 * 128 * 2
  assert not config_lib.fp8_gmm_config(120, 4096, 2048, 8, split_rows=True).split_rows
  with pytest.raises(ValueError, match="split_rows=True needs two consumer"):
    config_lib.Fp8GmmConfig(split_rows=True)
  with pytest.raises(ValueError, match="chain_items=True needs the warp-specialised"):
    config_lib.Fp8GmmConfig(chain_items=True)
  # Chained: the deepest pipeline that divides K/128 (5 of 1024/128 = 8 do not).
  chained = config_lib.fp8_gmm_config(16384, 1024, 4096, 64, split_rows=True,
                                      chain_items=True)
  assert (chained.chain_items, chained.max_concurrent_steps) == (True, 4)
  with pytest.raises(NotImplementedError, match="multiple of max_concurrent_steps=4"):
    chained.validate_for(1152, 4096, 1, 2)
  assert not config_lib.fp8_gmm_config(16384, 128, 4096, 8, chain_items=True).chain_items
  f32 = config_lib.fp8_gmm_config(16384, 4096, 2048, 8, out_itemsize=4)
  assert f32.smem_bytes(1, 4) <= config_lib.SMEM_BYTES - 4096
  # N not in 256-wide items and no split_rows: one warpgroup, two K blocks a step where
  # K allows; split_rows items take any N of 128s.
  assert config_lib.fp8_gmm_config(16384, 4096, 384, 64).promotion == "pairs"
  one = config_lib.fp8_gmm_config(16384, 384, 384, 64)
  assert (one.num_compute_wgs, one.promotion) == (1, "serial")
  assert config_lib.fp8_gmm_config(16384, 384, 384, 8).split_rows
  assert config_lib.fp8_gmm_config(16384, 4096, 2048, 8, block_m=128,
                                   num_compute_wgs=1).block_m == 128


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,g,pad", [
    (16384, 4096, 2048, 8, 0), (16384, 2048, 4096, 8, 1000), (16384, 4096, 1024, 64, 301),
    (16384, 1024, 4096, 64, 0)])
@pytest.mark.parametrize("dgrad", [False, True], ids=["fwd", "dgrad"])
@pytest.mark.parametrize("out_dtype,tol", [(jnp.float32, 1e-3), (jnp.bfloat16, 1e-2)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("cfg", [None, "ws_m128", "pairs", "serial", "split", "chain",
                                 "split_chain"])
def test_gmm_fp8_full_size(m, k, n, g, pad, dgrad, out_dtype, tol, cfg):
  """On the GPU against ragged_dot of the dequantised operands in float32 (HIGHEST).
  The tolerance of the float32 output allows for the FP8 tensor core's
  limited-precision accumulation within each 128-wide K block."""
  keys = jax.random.split(jax.random.key(m + k + n + g), 2)
  x = jax.random.normal(keys[0], (m, k), jnp.float32)
  xq = jax.jit(quantize.quantize_rows)(x)
  w_shape = (g, n, k) if dgrad else (g, k, n)
  wq = jax.jit(quantize.quantize_blocks)(jax.random.normal(keys[1], w_shape, jnp.float32))
  rhs, rhs_scales = ((wq.values, jnp.swapaxes(wq.scales, 1, 2)) if dgrad
                     else (wq.values_t, wq.scales))
  gs = gpu_group_sizes(np.random.default_rng(g), m - pad, g, empty_every=5)
  if cfg == "ws_m128":
    cfg = config_lib.Fp8GmmConfig(max_concurrent_steps=3, num_compute_wgs=2,
                                  epilogue_rows=64 if out_dtype == jnp.float32 else None)
  elif cfg == "pairs":
    cfg = config_lib.Fp8GmmConfig(block_m=64, max_concurrent_steps=4, promotion="pairs")
  elif cfg == "serial":  # one warpgroup on 128x128 tiles
    cfg = config_lib.Fp8GmmConfig(max_concurrent_steps=4)
  elif cfg in ("split", "chain", "split_chain"):
    # consumers one above the other on 128x128 items; an SM's items as one pipeline
    cfg = config_lib.fp8_gmm_config(m, k, n, g, 4 if out_dtype == jnp.float32 else 2,
                                    split_rows="split" in cfg, chain_items="chain" in cfg)
  out = jax.jit(lambda *a: gmm_fp8_mgpu(*a, out_dtype=out_dtype, config=cfg))(
      xq.values, xq.scales, rhs, rhs_scales, gs)
  out = np.asarray(out.astype(jnp.float32))
  used = int(gs.sum())
  assert not np.isnan(out).any()
  assert (out[used:] == 0).all(), "padding rows must be exactly zero"
  w = quantize.dequantize_blocks(wq)  # [G, N, K] (dgrad) or [G, K, N]
  ref = jax.lax.ragged_dot(quantize.dequantize_rows(xq), jnp.swapaxes(w, 1, 2) if dgrad
                           else w, gs, precision=jax.lax.Precision.HIGHEST)
  ref = np.asarray(ref, np.float64)[:used]
  err = np.linalg.norm(out[:used] - ref) / np.linalg.norm(ref)
  assert err < tol, err


def _dsrelu_reference(dy_values, dy_scales, w2_values, w2_scales, sizes, h, p):
  """(dh, dp) in float64 from da = dequant(dy) @ dequant(w2).T per group."""
  da = _reference(dy_values, dy_scales, w2_values, w2_scales, sizes)
  relu = np.maximum(np.float64(h), 0.0)
  p = np.float64(p)[:, None]
  return da * p * 2 * relu, np.sum(da * relu**2, axis=1)


@pytest.mark.parametrize("m,k,n,sizes,h_dtype,cfg", [
    (256, 256, 256, [50, 0, 131, 75], jnp.float32, None),  # an empty group
    (200, 256, 512, [17, 0, 0, 150], jnp.bfloat16, None),  # 33 padding rows
    (256, 384, 256, [0, 256, 0], jnp.float32, WS),  # all rows in one group
    (40, 128, 256, [3, 30], jnp.float32, SMALL),  # M < block_m, one warpgroup
])
def test_gmm_fp8_dsrelu_interpret(m, k, n, sizes, h_dtype, cfg):
  """The dSReLU epilogue after the FP8 main loop (`gmm_fp8_dsrelu_mgpu`): dh in
  h's dtype and dp against float64; padding rows zero."""
  from pallas_kernels.fused_srelu_mgpu import gmm_fp8_dsrelu_mgpu
  rng = np.random.default_rng(m + n)
  operands = _operands(rng, m, k, n, len(sizes), dgrad=True)
  h = jnp.asarray(rng.standard_normal((m, n)), h_dtype)
  p = jnp.asarray(rng.uniform(0.1, 1.0, m), jnp.float32)
  dh, dp = gmm_fp8_dsrelu_mgpu(*operands, jnp.asarray(sizes, jnp.int32), h, p,
                               interpret=True, config=cfg)
  assert dh.shape == (m, n) and dh.dtype == h_dtype and dp.shape == (m,)
  dh, dp = np.asarray(dh.astype(jnp.float32)), np.asarray(dp)
  used = sum(sizes)
  assert (dh[used:] == 0).all() and (dp[used:] == 0).all(), "padding rows must be zeros"
  dh_ref, dp_ref = _dsrelu_reference(*operands, sizes, h, p)
  assert_close(dh[:used], dh_ref[:used], TOL[h_dtype], "dh")
  assert_close(dp[:used], dp_ref[:used], 1e-5, "dp")


def test_gmm_fp8_dsrelu_interpret_chained(monkeypatch):
  """The dSReLU epilogue on chained items: two SMs, each a chain of several."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: 2)
  test_gmm_fp8_dsrelu_interpret(344, 256, 256, [50, 0, 90, 30, 0, 101], jnp.bfloat16,
                                WS_CHAINED)


@pytest.mark.parametrize("m,h,f,g", [(16384, 2048, 4096, 8), (16384, 4096, 1024, 64)])
def test_gmm_fp8_dsrelu_lowers_for_h100(m, h, f, g):
  from pallas_kernels.fused_srelu_mgpu import gmm_fp8_dsrelu_mgpu
  f8 = quantize.FP8
  text = lower_for_h100(
      lambda *a: gmm_fp8_dsrelu_mgpu(*a),
      jax.ShapeDtypeStruct((m, h), f8), jax.ShapeDtypeStruct((h // BLOCK, m), jnp.float32),
      jax.ShapeDtypeStruct((g, f, h), f8),
      jax.ShapeDtypeStruct((g, h // BLOCK, f // BLOCK), jnp.float32),
      jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((m, f), jnp.bfloat16),
      jax.ShapeDtypeStruct((m,), jnp.float32))
  wgmmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", text)
  assert wgmmas and all(w.endswith(".f32.e4m3.e4m3") for w in wgmmas), wgmmas


@pytest.mark.gpu
@pytest.mark.parametrize("m,h,f,g,pad", [(16384, 2048, 4096, 8, 1000),
                                         (16384, 4096, 1024, 64, 301)])
def test_gmm_fp8_dsrelu_full_size(m, h, f, g, pad):
  """On the GPU against the XLA reference (`reference.gmm_fp8_dsrelu_xla`)."""
  from pallas_kernels import reference
  from pallas_kernels.fused_srelu_mgpu import gmm_fp8_dsrelu_mgpu
  keys = jax.random.split(jax.random.key(m + f), 4)
  dyq = jax.jit(quantize.quantize_rows)(jax.random.normal(keys[0], (m, h), jnp.float32))
  w2q = jax.jit(quantize.quantize_blocks)(jax.random.normal(keys[1], (g, f, h), jnp.float32))
  hh = jax.random.normal(keys[2], (m, f), jnp.bfloat16)
  p = jax.random.uniform(keys[3], (m,), jnp.float32, 0.1, 1.0)
  gs = gpu_group_sizes(np.random.default_rng(g), m - pad, g, empty_every=5)
  args = (dyq.values, dyq.scales, w2q.values, jnp.swapaxes(w2q.scales, 1, 2), gs, hh, p)
  dh, dp = jax.jit(gmm_fp8_dsrelu_mgpu)(*args)
  dh_ref, dp_ref = jax.jit(reference.gmm_fp8_dsrelu_xla)(*args)
  used = int(gs.sum())
  dh = np.asarray(dh.astype(jnp.float32))
  assert (dh[used:] == 0).all()
  assert_close(dh[:used], np.asarray(dh_ref.astype(jnp.float32))[:used], 1e-2, "dh")
  assert_close(np.asarray(dp)[:used], np.asarray(dp_ref)[:used], 1e-3, "dp")
