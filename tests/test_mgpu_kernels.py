"""Mosaic GPU grouped GEMM kernels on CPU: the Pallas GPU interpreter against a
float64 NumPy reference at small sizes, and the real kernels lowered for `cuda`
(under an abstract H100 mesh) at realistic block sizes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_reference import assert_same_metadata
from cuda_lowering import H100, lower_for_h100
from pallas_kernels import config as config_lib
from pallas_kernels import metadata as metadata_lib
from pallas_kernels import metadata_kernel
from pallas_kernels.gmm_mgpu import gmm_mgpu
from pallas_kernels.tgmm_mgpu import tgmm_mgpu

# The defaults a kernel lowered for an H100 gets: the shipped H100 tuning cache, else
# the heuristic (plain `config_lib.gmm_config` off a GPU is the heuristic alone).
h100_gmm_config = functools.partial(config_lib.gmm_config, device_kind=H100.device_kind)

# Relative Frobenius error allowed for each output dtype (products of bf16/fp16
# inputs are exact in float32; the output rounding dominates).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _gmm_ref(lhs, rhs, sizes, transpose_rhs):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  if transpose_rhs:
    rhs = rhs.transpose(0, 2, 1)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _tgmm_ref(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((len(sizes), lhs.shape[1], rhs.shape[1]))
  start = 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start:start + size].T @ rhs[start:start + size]
    start += size
  return out


def _rel_err(out, ref):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _random(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


GMM_CASES = [
    # (M, K, N, group_sizes, transpose_rhs, in dtype, out dtype, config)
    (200, 128, 128, [50, 0, 90, 30], False, jnp.bfloat16, jnp.float32, None),
    (200, 128, 128, [50, 0, 90, 30], True, jnp.bfloat16, jnp.float32, None),
    (256, 128, 128, [0, 256, 0], False, jnp.bfloat16, jnp.bfloat16, None),
    (296, 128, 128, [17, 0, 0, 201], False, jnp.float16, jnp.float16,
     config_lib.GmmConfig(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2)),
    (232, 128, 64, [0, 0, 0], True, jnp.bfloat16, jnp.bfloat16, None),
    (40, 128, 128, [3, 30], False, jnp.bfloat16, jnp.float32, None),
    (136, 64, 128, [101], False, jnp.bfloat16, jnp.float32, None),
    (392, 64, 128, [17, 0, 70, 305], False, jnp.bfloat16, jnp.float32,
     config_lib.GmmConfig(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2)),
    # Warp-specialised: a producer and two consumer warpgroups.
    (200, 128, 256, [50, 0, 90, 30], True, jnp.bfloat16, jnp.float32,
     config_lib.GmmConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
                          num_compute_wgs=2)),
    # ... on the top and bottom 64 rows of 128-row tiles, staged in 64-column chunks.
    (232, 128, 128, [50, 0, 90, 30, 5], True, jnp.bfloat16, jnp.float32,
     config_lib.GmmConfig(block_m=64, block_n=128, block_k=64, max_concurrent_steps=2,
                          num_compute_wgs=2, split_rows=True, epilogue_cols=64)),
    (72, 64, 128, [3, 60], False, jnp.bfloat16, jnp.bfloat16,
     config_lib.GmmConfig(block_m=64, block_n=128, block_k=64, max_concurrent_steps=2,
                          num_compute_wgs=2, split_rows=True)),
    # ... in clusters of two SMs that share (multicast) the lhs tiles.
    (200, 128, 512, [50, 0, 90, 30], False, jnp.bfloat16, jnp.bfloat16,
     config_lib.GmmConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
                          num_compute_wgs=2, cluster_n=2)),
    # One program (or cluster) per (item, n-tile) instead of one per SM.
    (296, 128, 128, [17, 0, 0, 201], True, jnp.bfloat16, jnp.float32,
     config_lib.GmmConfig(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                          persistent=False)),
    (200, 128, 256, [50, 0, 90, 30], False, jnp.bfloat16, jnp.bfloat16,
     config_lib.GmmConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
                          num_compute_wgs=2, persistent=False)),
    (200, 128, 512, [50, 0, 90, 30], True, jnp.bfloat16, jnp.float32,
     config_lib.GmmConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
                          num_compute_wgs=2, cluster_n=2, persistent=False)),
]
CHAINED = dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
               num_compute_wgs=2, chain_items=True)
CHAINED_CASES = [
    # (M, K, N, group_sizes, transpose_rhs, out dtype, config, SMs)
    (344, 256, 256, [50, 0, 90, 30, 0, 101], False, jnp.bfloat16,
     config_lib.GmmConfig(**CHAINED, epilogue_rows=32), 3),
    (200, 128, 128, [0, 0, 131], True, jnp.float32, config_lib.GmmConfig(**CHAINED), 2),
    (200, 128, 128, [7, 0, 1], False, jnp.float32, config_lib.GmmConfig(**CHAINED), 4),
    # 128-row tiles whose rows are only at the top (rows 0-16, 208-236) or only at
    # the bottom (the tile moved up to end at M: rows 336-391).
    (392, 128, 128, [17, 0, 70, 150], False, jnp.bfloat16,
     config_lib.GmmConfig(**{**CHAINED, "block_m": 128}), 3),
    (392, 128, 128, [17, 0, 70, 305], True, jnp.float32,
     config_lib.GmmConfig(**{**CHAINED, "block_m": 128}), 2),
    # Consumers on the top and bottom rows of each tile (rows 0-16 only in the top
    # half of the first tile; a tile moved up to end at M).
    (392, 128, 256, [17, 0, 70, 305], False, jnp.bfloat16,
     config_lib.GmmConfig(**{**CHAINED, "block_n": 128}, split_rows=True, epilogue_rows=32,
                          epilogue_cols=64), 3),
    (344, 256, 256, [50, 0, 90, 30, 0, 101], True, jnp.float32,
     config_lib.GmmConfig(**{**CHAINED, "block_n": 128}, split_rows=True, cluster_n=2), 4),
    # Two clusters of two SMs, each SM a chain of items.
    (344, 256, 512, [50, 0, 90, 30, 0, 101], True, jnp.bfloat16,
     config_lib.GmmConfig(**CHAINED, cluster_n=2), 4),
]


@pytest.mark.parametrize("m,k,n,sizes,transpose_rhs,dtype,out_dtype,cfg", GMM_CASES)
def test_gmm_interpret(m, k, n, sizes, transpose_rhs, dtype, out_dtype, cfg):
  rng = np.random.default_rng(m + len(sizes))
  lhs = _random(rng, (m, k), dtype)
  rhs = _random(rng, (len(sizes), n, k) if transpose_rhs else (len(sizes), k, n), dtype)
  out = gmm_mgpu(lhs, rhs, jnp.asarray(sizes, jnp.int32), transpose_rhs=transpose_rhs,
                 out_dtype=out_dtype, interpret=True, config=cfg)
  assert out.shape == (m, n) and out.dtype == out_dtype
  ref = _gmm_ref(lhs, rhs, sizes, transpose_rhs)
  used = sum(sizes)
  assert (np.asarray(out[used:]) == 0).all(), "padding rows must be zeros"
  if used:
    assert _rel_err(out[:used], ref[:used]) < TOL[out_dtype]


@pytest.mark.parametrize("m,k,n,sizes,transpose_rhs,out_dtype,cfg,sms", CHAINED_CASES)
def test_gmm_interpret_chained(m, k, n, sizes, transpose_rhs, out_dtype, cfg, sms,
                               monkeypatch):
  """Few SMs, so that each runs a chain of several items (and one runs a lone item)."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: sms)
  test_gmm_interpret(m, k, n, sizes, transpose_rhs, jnp.bfloat16, out_dtype, cfg)


TGMM_CASES = [
    (200, 128, 128, [50, 0, 90, 30], jnp.bfloat16, jnp.float32),
    (192, 128, 64, [192, 0, 0], jnp.float16, jnp.float16),
    (136, 64, 128, [3, 100, 0, 20], jnp.bfloat16, jnp.bfloat16),
    (64, 64, 64, [0, 0], jnp.bfloat16, jnp.float32),
    (128, 64, 64, [77], jnp.bfloat16, jnp.float32),
]


@pytest.mark.parametrize("m,k,n,sizes,dtype,out_dtype", TGMM_CASES)
def test_tgmm_interpret(m, k, n, sizes, dtype, out_dtype, cfg=None):
  rng = np.random.default_rng(m + 7 * len(sizes))
  lhs = np.asarray(rng.standard_normal((m, k)), np.float32)
  lhs[sum(sizes):] = np.nan  # rows past the sum are ignored, NaN or not
  lhs = jnp.asarray(lhs, dtype)
  rhs = np.asarray(rng.standard_normal((m, n)), np.float32)
  rhs[sum(sizes):] = np.nan
  rhs = jnp.asarray(rhs, dtype)
  out = tgmm_mgpu(lhs, rhs, jnp.asarray(sizes, jnp.int32), out_dtype=out_dtype,
                  interpret=True, config=cfg)
  assert out.shape == (len(sizes), k, n) and out.dtype == out_dtype
  out_np = np.asarray(out.astype(jnp.float32))
  assert not np.isnan(out_np).any()
  assert (out_np[np.asarray(sizes) == 0] == 0).all(), "empty groups must be zeros"
  if sum(sizes):
    assert _rel_err(out, _tgmm_ref(lhs, rhs, sizes)) < TOL[out_dtype]


TGMM_WS = config_lib.TgmmConfig(block_m=64, block_k=64, block_n=64, max_concurrent_steps=2,
                                warp_specialized=True)


@pytest.mark.parametrize("m,k,n,sizes,dtype,out_dtype", TGMM_CASES[:3])
def test_tgmm_interpret_one_warpgroup(m, k, n, sizes, dtype, out_dtype):
  cfg = config_lib.TgmmConfig(block_m=64, block_k=64, block_n=64, max_concurrent_steps=2)
  test_tgmm_interpret(m, k, n, sizes, dtype, out_dtype, cfg=cfg)


@pytest.mark.parametrize("m,k,n,sizes,out_dtype,sms", [
    (200, 128, 128, [50, 0, 90, 30], jnp.float32, 3),
    (136, 64, 128, [3, 100, 0, 20], jnp.bfloat16, 2),
    (392, 64, 64, [0, 130, 7, 0, 1, 200], jnp.float32, 4),
])
def test_tgmm_interpret_warp_specialized(m, k, n, sizes, out_dtype, sms, monkeypatch):
  """Few SMs, so that each producer runs ahead across several items of its SM."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: sms)
  test_tgmm_interpret(m, k, n, sizes, jnp.bfloat16, out_dtype, cfg=TGMM_WS)


TGMM_TWO_CONSUMERS = config_lib.TgmmConfig(block_m=64, block_k=128, block_n=64,
                                           max_concurrent_steps=2, warp_specialized=True,
                                           num_compute_wgs=2)


@pytest.mark.parametrize("m,k,n,sizes,out_dtype,sms,block_k", [
    (200, 128, 128, [50, 0, 90, 30], jnp.float32, 3, 128),
    (392, 256, 128, [0, 130, 7, 0, 1, 200], jnp.bfloat16, 2, 128),
    (136, 128, 256, [3, 100, 0, 20], jnp.float32, 132, 128),
    (200, 64, 128, [9, 0, 150, 1], jnp.float32, 2, 64),
])
def test_tgmm_interpret_two_consumers(m, k, n, sizes, out_dtype, sms, block_k, monkeypatch):
  """Two consumer warpgroups share each lhs tile, which the producer masks."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: sms)
  cfg = dataclasses.replace(TGMM_TWO_CONSUMERS, block_k=block_k)
  test_tgmm_interpret(m, k, n, sizes, jnp.bfloat16, out_dtype, cfg=cfg)


@pytest.mark.parametrize("m,k,n,sizes,out_dtype,sms", [
    (200, 128, 128, [50, 0, 90, 30], jnp.float32, 3),
    (392, 256, 128, [0, 130, 7, 0, 1, 200], jnp.bfloat16, 2),
])
def test_tgmm_interpret_epilogue_in_halves(m, k, n, sizes, out_dtype, sms, monkeypatch):
  """Each output tile goes out in two 64-row passes through one staging buffer."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: sms)
  cfg = dataclasses.replace(TGMM_TWO_CONSUMERS, epilogue_rows=64)
  test_tgmm_interpret(m, k, n, sizes, jnp.bfloat16, out_dtype, cfg=cfg)


@pytest.mark.parametrize("m,k,n,sizes,out_dtype,sms", [
    (200, 128, 128, [50, 0, 90, 30], jnp.float32, 3),
    (392, 256, 64, [0, 130, 7, 0, 1, 200], jnp.bfloat16, 2),
    (136, 256, 128, [3, 100, 0, 20], jnp.float32, 132),
])
def test_tgmm_interpret_split_rows(m, k, n, sizes, out_dtype, sms, monkeypatch):
  """The two consumer warpgroups take the top and bottom block_k rows of an item,
  and store them in 64-column chunks."""
  monkeypatch.setattr(config_lib, "num_sms", lambda: sms)
  cfg = dataclasses.replace(TGMM_TWO_CONSUMERS, block_k=64, block_n=n, split_rows=True,
                            epilogue_cols=64)
  test_tgmm_interpret(m, k, n, sizes, jnp.bfloat16, out_dtype, cfg=cfg)


SPLIT_ROWS = dict(block_m=64, block_n=256, split_rows=True, epilogue_cols=128)


def _assert_gmm_lowers(cfg, transpose_rhs, out_dtype=None):
  """gmm_mgpu with cfg lowers for an H100 at M=4096, K=N=1024, G=64."""
  m, k, n, g = 4096, 1024, 1024, 64
  rhs_shape = (g, n, k) if transpose_rhs else (g, k, n)
  text = lower_for_h100(
      lambda a, b, c: gmm_mgpu(a, b, c, transpose_rhs=transpose_rhs,
                               out_dtype=out_dtype, config=cfg),
      jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
      jax.ShapeDtypeStruct(rhs_shape, jnp.bfloat16),
      jax.ShapeDtypeStruct((g,), jnp.int32))
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("out_dtype,num_compute_wgs,steps,chain,split_rows", [
    (jnp.bfloat16, 1, 4, False, False), (jnp.float32, 1, 4, False, False),
    (jnp.bfloat16, 2, 3, False, False), (jnp.float32, 2, 2, False, False),
    (jnp.bfloat16, 2, 4, True, False), (jnp.bfloat16, 2, 4, True, True),
    (jnp.bfloat16, 2, 3, False, True)])
def test_gmm_lowers_for_h100(transpose_rhs, out_dtype, num_compute_wgs, steps, chain,
                             split_rows):
  tile = SPLIT_ROWS if split_rows else dict(block_m=128, block_n=128,
                                            epilogue_rows=64 if chain else None)
  cfg = config_lib.GmmConfig(block_k=64, max_concurrent_steps=steps,
                             num_compute_wgs=num_compute_wgs, chain_items=chain, **tile)
  _assert_gmm_lowers(cfg, transpose_rhs, out_dtype)


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("chain", [False, True])
def test_gmm_lowers_for_h100_in_clusters(transpose_rhs, chain):
  cfg = dataclasses.replace(config_lib.gmm_config(32768, 2048, 7168, 256), chain_items=chain,
                            max_concurrent_steps=4 if chain else 3,
                            epilogue_rows=64 if chain else None)
  assert cfg.cluster_n == 2  # what the heuristic picks for small groups
  _assert_gmm_lowers(cfg, transpose_rhs)


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_lowers_for_h100_one_program_per_item(transpose_rhs):
  """The G=256 forward and dgrad defaults (one program per item), and the clustered
  kernel that way, on x [M, K] @ w [G, K, N] or dy [M, N] @ w.T."""
  m, k, n, g = 32768, 7168, 2048, 256
  contracted, out = (n, k) if transpose_rhs else (k, n)
  default = h100_gmm_config(m, contracted, out, g, transpose_rhs=transpose_rhs)
  clustered = dataclasses.replace(config_lib.gmm_config(m, 2048, 7168, g), persistent=False)
  assert not default.persistent and clustered.cluster_n == 2
  for cfg in (default, clustered):
    text = lower_for_h100(
        lambda a, b, c, cfg=cfg: gmm_mgpu(a, b, c, transpose_rhs=transpose_rhs, config=cfg),
        jax.ShapeDtypeStruct((m, contracted), jnp.bfloat16),
        jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16), jax.ShapeDtypeStruct((g,), jnp.int32))
    assert "mosaic_gpu" in text


def test_gmm_lowers_for_h100_many_groups():
  text = lower_for_h100(
      gmm_mgpu, jax.ShapeDtypeStruct((32768, 7168), jnp.bfloat16),
      jax.ShapeDtypeStruct((256, 7168, 2048), jnp.bfloat16),
      jax.ShapeDtypeStruct((256,), jnp.int32))
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("dtype,out_dtype,ws,consumers,epilogue_rows", [
    (jnp.bfloat16, jnp.float32, False, 1, None), (jnp.float16, jnp.float32, False, 1, None),
    (jnp.bfloat16, jnp.float32, True, 1, None), (jnp.bfloat16, jnp.float32, True, 2, None),
    (jnp.bfloat16, jnp.bfloat16, True, 2, 64), (jnp.bfloat16, jnp.bfloat16, True, "k", None),
    (jnp.bfloat16, jnp.bfloat16, True, "k", "cols")])
def test_tgmm_lowers_for_h100(dtype, out_dtype, ws, consumers, epilogue_rows):
  m, k, n, g = 4096, 1024, 1024, 64
  tile = dict(block_k=64, block_n=256, split_rows=True) if consumers == "k" else dict(
      block_k=128, block_n=128)
  if epilogue_rows == "cols":  # 4 slots, the epilogue staged in 64x128 halves
    tile, epilogue_rows = dict(tile, epilogue_cols=128), None
  cfg = config_lib.TgmmConfig(block_m=64, warp_specialized=ws, **tile,
                              max_concurrent_steps=(4 if consumers == 1 or epilogue_rows
                                                    or "epilogue_cols" in tile else 2),
                              num_compute_wgs=2 if consumers == "k" else consumers,
                              epilogue_rows=epilogue_rows)
  text = lower_for_h100(
      lambda a, b, c: tgmm_mgpu(a, b, c, out_dtype=out_dtype, config=cfg),
      jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m, n), dtype),
      jax.ShapeDtypeStruct((g,), jnp.int32))
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("lhs_shape,rhs_shape,dtype,interpret,match", [
    ((256, 128), (2, 128, 128), jnp.float32, True, "bf16 or fp16"),
    ((256, 100), (2, 100, 128), jnp.bfloat16, True, "K=100"),
    ((256, 128), (2, 128, 96), jnp.bfloat16, True, "N=96"),
    ((250, 128), (2, 128, 128), jnp.bfloat16, True, "M=250"),
    ((256, 128), (2, 128, 128), jnp.bfloat16, False, "Hopper"),
])
def test_unsupported_raises_not_implemented(lhs_shape, rhs_shape, dtype, interpret, match):
  if not interpret and jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  lhs = jnp.zeros(lhs_shape, dtype)
  sizes = jnp.zeros((rhs_shape[0],), jnp.int32)
  with pytest.raises(NotImplementedError, match=match):
    gmm_mgpu(lhs, jnp.zeros(rhs_shape, dtype), sizes, interpret=interpret)
  with pytest.raises(NotImplementedError, match=match):
    tgmm_mgpu(lhs, jnp.zeros((lhs_shape[0], rhs_shape[2]), dtype), sizes,
              interpret=interpret)


def test_config_validates_itself():
  with pytest.raises(ValueError, match="block_m"):
    config_lib.GmmConfig(block_m=100)
  with pytest.raises(ValueError, match="shared memory"):
    config_lib.GmmConfig(block_m=256, block_n=128, max_concurrent_steps=8)
  with pytest.raises(NotImplementedError, match="block_n"):
    config_lib.GmmConfig(block_n=128).validate_for(1024, 192)
  assert config_lib.gmm_config(16384, 4096, 1536, 128).block_n in (128, 192)
  with pytest.raises(ValueError, match="cluster_n=3"):
    config_lib.GmmConfig(cluster_n=3)
  with pytest.raises(ValueError, match="cluster_n=2 needs"):
    config_lib.GmmConfig(cluster_n=2)
  # The G=256 forward and dgrad run one program per item, the dgrad without clusters;
  # the forward of the dgrad's sizes (the MLP's FC2) is persistent, in clusters.
  assert not h100_gmm_config(32768, 7168, 2048, 256).persistent
  dgrad = h100_gmm_config(32768, 2048, 7168, 256, transpose_rhs=True)
  assert not dgrad.persistent and dgrad.cluster_n == 1
  assert config_lib.gmm_config(32768, 2048, 7168, 256).persistent
  assert config_lib.gmm_config(16384, 1024, 4096, 64, transpose_rhs=True) == (
      config_lib.gmm_config(16384, 1024, 4096, 64))
  with pytest.raises(ValueError, match="needs persistent=True"):
    config_lib.GmmConfig(num_compute_wgs=2, chain_items=True, persistent=False)
  with pytest.raises(NotImplementedError, match="2\\*2\\*block_n=512"):
    config_lib.GmmConfig(**config_lib._WS, cluster_n=2).validate_for(1024, 768)
  # Clusters only for small groups (and N in pairs of 256-column tiles).
  assert config_lib.gmm_config(32768, 2048, 7168, 256).cluster_n == 2
  assert config_lib.gmm_config(32768, 2048, 7424, 256).cluster_n == 1
  assert config_lib.gmm_config(16384, 1024, 4096, 8).cluster_n == 1
  with pytest.raises(ValueError, match="warp_specialized"):
    config_lib.TgmmConfig(num_compute_wgs=2)
  with pytest.raises(NotImplementedError, match="2\\*block_n=256"):
    config_lib.TgmmConfig(64, 128, 128, 3, warp_specialized=True,
                          num_compute_wgs=2).validate_for(1024, 384)
  with pytest.raises(ValueError, match="epilogue_rows"):
    config_lib.TgmmConfig(block_k=128, epilogue_rows=96)
  # Two consumers need 16-bit outputs (a float32 staging tile leaves 2 slots).
  assert config_lib.tgmm_config(16384, 4096, 2048, 8).num_compute_wgs == 2
  assert config_lib.tgmm_config(16384, 4096, 2048, 8, out_itemsize=4).num_compute_wgs == 1
  # Two consumers on the top and bottom rows of 128x256 tiles, staged in 64x128 chunks.
  split = config_lib.tgmm_config(32768, 7168, 2048, 256)
  assert (split.split_rows, split.cta_tile_rows, split.cta_block_n) == (True, 128, 256)
  assert split.smem_bytes(2, 2) <= config_lib.SMEM_BYTES
  with pytest.raises(NotImplementedError, match="multiple of 128"):
    split.validate_for(64 * 3, 256)
  with pytest.raises(ValueError, match="epilogue_cols"):
    config_lib.TgmmConfig(block_n=256, epilogue_cols=96)
  with pytest.raises(ValueError, match="split_rows=True needs"):
    config_lib.TgmmConfig(warp_specialized=True, split_rows=True)
  # gmm: consumers on the top and bottom 64 rows of 128x256 tiles, 4 stages.
  split_gmm = config_lib.GmmConfig(num_compute_wgs=2, chain_items=True, **SPLIT_ROWS)
  assert (split_gmm.cta_tile_rows, split_gmm.cta_block_n) == (128, 256)
  assert split_gmm.smem_bytes(2, 2) == 4 * (128 + 256) * 64 * 2 + 2 * 64 * 128 * 2
  with pytest.raises(ValueError, match="split_rows=True needs"):
    config_lib.GmmConfig(split_rows=True)


def test_tgmm_metadata_covers_each_group_from_an_8_aligned_row():
  rng = np.random.default_rng(3)
  metadata = jax.jit(metadata_lib.tgmm_metadata, static_argnums=(1, 2))
  for trial in range(40):
    m, g = ((40, 3), (200, 9), (520, 37), (1024, 256))[trial % 4]
    used = int(rng.integers(0, m + 1))
    sizes = np.diff(np.r_[0, np.sort(rng.integers(0, used + 1, g - 1)), used])
    start, end, first_row, num_blocks = map(
        np.asarray, metadata(jnp.asarray(sizes, jnp.int32), m, 64).arrays())
    ends = np.cumsum(sizes)
    np.testing.assert_array_equal(end, ends)
    np.testing.assert_array_equal(start, ends - sizes)
    assert (first_row % 8 == 0).all() and (start - 7 <= first_row).all()
    assert (first_row <= start).all()
    # Just enough blocks to reach the group's end; none for an empty group.
    covered = first_row + 64 * num_blocks
    nonempty = sizes > 0
    assert (covered[nonempty] >= end[nonempty]).all()
    assert (covered[nonempty] - 64 < end[nonempty]).all()
    assert (num_blocks[~nonempty] == 0).all()


GMM_METADATA = {"xla": metadata_lib.gmm_metadata,
                "kernel": functools.partial(metadata_kernel.gmm_metadata, interpret=True)}


@pytest.mark.parametrize("impl", list(GMM_METADATA))
@pytest.mark.parametrize("block_m", [64, 128])
def test_gmm_metadata_covers_every_row_once(block_m, impl):
  rng = np.random.default_rng(block_m)
  metadata = jax.jit(GMM_METADATA[impl], static_argnums=(1, 2))
  for trial in range(60):
    m, g = ((40, 3), (200, 9), (520, 37), (1024, 256))[trial % 4]
    used = int(rng.integers(0, m + 1))
    sizes = np.diff(np.r_[0, np.sort(rng.integers(0, used + 1, g - 1)), used])
    meta = metadata(jnp.asarray(sizes, jnp.int32), m, block_m)
    group, row0, start, end, compute, counts = map(np.asarray, meta.arrays())
    num_compute, num_used = counts
    # Compute items first, then the padding items, then the unused ones.
    assert (compute[:num_compute] == 1).all() and (compute[num_compute:] == 0).all()
    assert (end[:num_used] > start[:num_used]).all()
    assert (end[num_used:] == start[num_used:]).all()
    ends = np.cumsum(sizes)
    cover = np.zeros(m, int)
    for i in np.flatnonzero(end > start):
      cover[start[i]:end[i]] += 1
      assert row0[i] % 8 == 0 and row0[i] <= start[i] and end[i] <= row0[i] + block_m
      if compute[i]:
        assert ends[group[i]] - sizes[group[i]] <= start[i] and end[i] <= ends[group[i]]
      else:
        assert start[i] >= used
    assert (cover == 1).all()


def _metadata_group_sizes(rng, m, g, case):
  """Random sizes summing to at most m (padding rows after), or an edge case."""
  if case == "one_group":
    sizes = np.zeros(g, int)
    sizes[rng.integers(g)] = m
    return sizes
  if case == "over_m":  # sums past m are clipped to m
    return rng.multinomial(m + int(rng.integers(1, m + 1)), rng.dirichlet(np.full(g, 0.3)))
  used = int(rng.integers(0, m + 1))
  sizes = rng.multinomial(used, rng.dirichlet(np.full(g, 0.3)))
  if case == "half_empty":
    sizes[rng.permutation(g)[: g // 2]] = 0
  return sizes


@pytest.mark.parametrize("m,g,block_m", [(8, 1, 64), (296, 5, 64), (1000, 8, 128),
                                         (4096, 300, 256), (8192, 1023, 64)])
@pytest.mark.parametrize("case", ["random", "half_empty", "one_group", "over_m"])
def test_gmm_metadata_kernel_matches_xla_ops(m, g, block_m, case):
  """The Triton kernel's work items are bitwise those of the XLA ops (which the test
  above checks against the row coverage gmm needs)."""
  rng = np.random.default_rng(m + g)
  xla_ops = jax.jit(metadata_lib.gmm_metadata, static_argnums=(1, 2))
  kernel = jax.jit(GMM_METADATA["kernel"], static_argnums=(1, 2))
  for _ in range(3):
    sizes = jnp.asarray(_metadata_group_sizes(rng, m, g, case), jnp.int32)
    assert_same_metadata(kernel(sizes, m, block_m), xla_ops(sizes, m, block_m))


def test_gmm_metadata_kernel_lowers_for_h100():
  text = lower_for_h100(lambda s: metadata_kernel.gmm_metadata(s, 16384, 128).arrays(),
                         jax.ShapeDtypeStruct((64,), jnp.int32))
  assert text.count("custom_call") == 1, "expected the metadata as one kernel"


def test_gmm_metadata_kernel_past_max_groups_uses_xla_ops():
  g = metadata_kernel.MAX_GROUPS + 1
  sizes = jnp.asarray(np.random.default_rng(0).integers(0, 3, g), jnp.int32)
  text = jax.jit(lambda s: metadata_kernel.gmm_metadata(s, 4096, 64).arrays()).trace(
      sizes).lower().as_text()
  assert "custom_call" not in text
  assert_same_metadata(metadata_kernel.gmm_metadata(sizes, 4096, 64, interpret=True),
                        metadata_lib.gmm_metadata(sizes, 4096, 64))


def test_fused_srelu_epilogues_reject_split_rows():
  from pallas_kernels.fused_srelu_mgpu import gmm_dsrelu_mgpu, gmm_srelu_mgpu
  m, h, f = 256, 128, 256
  sizes, p = jnp.asarray([100, 156], jnp.int32), jnp.ones((m,))
  cfg = config_lib.GmmConfig(num_compute_wgs=2, **SPLIT_ROWS)
  with pytest.raises(NotImplementedError, match="split_rows=False"):
    gmm_srelu_mgpu(jnp.ones((m, h), jnp.bfloat16), jnp.ones((2, h, f), jnp.bfloat16), sizes,
                   p, interpret=True, config=cfg)
  with pytest.raises(NotImplementedError, match="split_rows=False"):
    gmm_dsrelu_mgpu(jnp.ones((m, h), jnp.bfloat16), jnp.ones((2, f, h), jnp.bfloat16), sizes,
                    jnp.ones((m, f), jnp.bfloat16), p, interpret=True, config=cfg)
