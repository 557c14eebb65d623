"""The README's input contract: with a kernel backend asked for explicitly, every kernel
path takes any K and N (the MLP's H and F) that are multiples of 64, and says which size
is wrong otherwise.

The sizes are multiples of 64 that are not multiples of 128 or 256 (64, 192, 320, 448),
on few rows, with empty groups and padding rows past sum(group_sizes): in the Pallas
GPU interpreter against the float64 NumPy reference, through the public ops and their
gradients, and lowered for an H100 (where the heuristics pick 128-row tiles). The
configs themselves are checked over a grid of sizes without running anything.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import numpy_reference as ref
import pallas_kernels
from cuda_lowering import lower_for_h100
from pallas_kernels import activation
from pallas_kernels import config as config_lib
from pallas_kernels import fused_srelu_mgpu
from pallas_kernels import gmm_mgpu
from pallas_kernels import srelu_mgpu
from pallas_kernels import tuning_cache
from test_grouped_mlp import check_against_reference, make_inputs

H100 = "NVIDIA H100 80GB HBM3"
TOL = 1e-2  # bf16 outputs

# (M, K, N, group sizes, transpose_rhs): G of 1..4, an empty group where G > 1,
# padding rows in each. A gradient runs all three kernels: gmm, gmm with
# transpose_rhs flipped (dlhs), tgmm (drhs).
GEMM_CASES = [
    (104, 448, 192, [30, 0, 40, 20], False),
    (136, 64, 320, [0, 101], True),
    (264, 192, 64, [250], True),
]
# (M, H, F, group sizes, fused) of the expert MLP; M < 64 is less than one row tile.
MLP_CASES = [
    (72, 192, 320, [0, 40, 25], True),
    (40, 64, 192, [0, 30], True),
    (56, 64, 192, [20, 0, 9, 20], False),
]
# Multiples of 64 not all of 128; `LARGE_M` gets 128-row tiles from the heuristics.
ODD_SIZES = (64, 192, 320, 448, 576, 704, 960)
LARGE_M = 2048


def _normal(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.bfloat16)


def _valid_rows(group_sizes) -> int:
  return int(np.sum(group_sizes))


def _check_gemm_and_its_gradient(m, k, n, group_sizes, transpose_rhs, backend):
  """gmm forward, and its VJP: gmm with transpose_rhs flipped (dlhs) and tgmm (drhs)."""
  rng = np.random.default_rng(m + k + n + transpose_rhs)
  gs = jnp.asarray(group_sizes, jnp.int32)
  lhs = _normal(rng, (m, k))
  rhs = _normal(rng, (len(group_sizes), n, k) if transpose_rhs else
                (len(group_sizes), k, n), k**-0.5)
  out, vjp = jax.vjp(lambda a, b: pallas_kernels.gmm(
      a, b, gs, transpose_rhs=transpose_rhs, backend=backend), lhs, rhs)
  dout = _normal(rng, out.shape)
  dlhs, drhs = vjp(dout)
  ref.assert_close(out, ref.gmm(lhs, rhs, group_sizes, transpose_rhs), TOL, "out")
  rhs_kn = np.float64(rhs).transpose(0, 2, 1) if transpose_rhs else np.float64(rhs)
  ref.assert_close(dlhs, ref.gmm(dout, rhs_kn, group_sizes, transpose_rhs=True), TOL,
                   "dlhs")
  drhs_kn = ref.tgmm(lhs, dout, group_sizes)
  ref.assert_close(drhs, drhs_kn.transpose(0, 2, 1) if transpose_rhs else drhs_kn, TOL,
                   "drhs")
  valid = _valid_rows(group_sizes)
  assert not np.any(np.float32(out[valid:])) and not np.any(np.float32(dlhs[valid:]))


@pytest.mark.parametrize("m, k, n, group_sizes, transpose_rhs", GEMM_CASES)
def test_gmm_and_its_gradient(m, k, n, group_sizes, transpose_rhs):
  _check_gemm_and_its_gradient(m, k, n, group_sizes, transpose_rhs, "interpret")


def test_tgmm_and_its_gradient():
  m, k, n, group_sizes = 48, 192, 64, [20, 0, 21]
  rng = np.random.default_rng(5)
  gs = jnp.asarray(group_sizes, jnp.int32)
  lhs, rhs = _normal(rng, (m, k)), _normal(rng, (m, n))
  out, vjp = jax.vjp(lambda a, b: pallas_kernels.tgmm(a, b, gs, backend="interpret"),
                     lhs, rhs)
  dout = _normal(rng, out.shape)
  dlhs, drhs = vjp(dout)
  ref.assert_close(out, ref.tgmm(lhs, rhs, group_sizes), TOL, "out")
  ref.assert_close(dlhs, ref.gmm(rhs, dout, group_sizes, transpose_rhs=True), TOL, "dlhs")
  ref.assert_close(drhs, ref.gmm(lhs, dout, group_sizes), TOL, "drhs")
  assert not np.any(np.float32(out[1]))


@pytest.mark.parametrize("m, hidden, ffn, group_sizes, fused", MLP_CASES)
def test_grouped_mlp_and_its_gradients(m, hidden, ffn, group_sizes, fused):
  """Fused: FC1+SReLU and FC2-dgrad+dSReLU epilogues; unfused: the SReLU kernels."""
  _check_grouped_mlp(m, hidden, ffn, group_sizes, fused, "interpret")


def _check_grouped_mlp(m, hidden, ffn, group_sizes, fused, backend):
  rng = np.random.default_rng(m + hidden + ffn + fused)
  inputs = make_inputs(rng, np.array(group_sizes, np.int32), m, hidden, ffn,
                       jnp.bfloat16, use_bias=False)
  check_against_reference(inputs, jnp.bfloat16, backend, rng, fused=fused)


@pytest.mark.parametrize("f", [64, 192, 320])
def test_srelu_kernels(f):
  rng = np.random.default_rng(f)
  m = 72
  h, da = _normal(rng, (m, f)), _normal(rng, (m, f))
  p = jnp.asarray(rng.uniform(0.0, 1.0, m), jnp.float32)
  a, vjp = jax.vjp(lambda h, p: activation.scaled_srelu(h, p, backend="interpret"), h, p)
  dh, dp = vjp(da)
  h64, p64, da64 = np.float64(h), np.float64(p), np.float64(da)
  relu = np.maximum(h64, 0)
  ref.assert_close(a, relu**2 * p64[:, None], TOL, "a")
  ref.assert_close(dh, da64 * p64[:, None] * 2 * relu, TOL, "dh")
  ref.assert_close(dp, np.sum(da64 * relu**2, axis=1), TOL, "dp")


def test_128_row_tiles_in_the_interpreter():
  """The heuristic's pick for many rows (128 x 192 tiles, 5 stages) on few rows."""
  m, k, n, group_sizes = 200, 448, 576, [50, 0, 90, 30]
  cfg = config_lib.heuristic_gmm_config(LARGE_M, k, n, len(group_sizes))
  assert (cfg.block_m, cfg.block_n) == (128, 192)
  rng = np.random.default_rng(2)
  lhs, rhs = _normal(rng, (m, k)), _normal(rng, (len(group_sizes), k, n), k**-0.5)
  out = gmm_mgpu.gmm_mgpu(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), interpret=True,
                          config=cfg)
  ref.assert_close(out, ref.gmm(lhs, rhs, group_sizes), TOL, "out")


@pytest.mark.parametrize("m, k, n", [(200, 448, 192), (LARGE_M, 64, 320),
                                     (LARGE_M, 192, 576)])
def test_gemm_gradient_lowers_for_h100(m, k, n):
  """gmm [K, N], its dlhs (gmm transpose_rhs, [N, K]) and drhs (tgmm [K, N])."""
  gs = jnp.asarray([m // 4, 0, m // 2, m // 8], jnp.int32)

  def loss(lhs, rhs):
    out = pallas_kernels.gmm(lhs, rhs, gs, backend="mosaic_gpu")
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  text = lower_for_h100(jax.grad(loss, argnums=(0, 1)), jnp.zeros((m, k), jnp.bfloat16),
                        jnp.zeros((4, k, n), jnp.bfloat16))
  assert text.count("mosaic_gpu") >= 3


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("m, hidden, ffn", [(200, 64, 192), (LARGE_M, 448, 576)])
def test_mlp_gradient_lowers_for_h100(m, hidden, ffn, fused):
  gs = jnp.asarray([m // 4, 0, m // 2, m // 8], jnp.int32)

  def loss(x, w1, w2, p):
    y = jaxmoe.grouped_mlp(x, w1, w2, gs, p, backend="mosaic_gpu", fused=fused)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  args = (jnp.zeros((m, hidden), jnp.bfloat16), jnp.zeros((4, hidden, ffn), jnp.bfloat16),
          jnp.zeros((4, ffn, hidden), jnp.bfloat16), jnp.zeros((m,), jnp.float32))
  text = lower_for_h100(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
  assert text.count("mosaic_gpu") >= 6


def _sizes_grid():
  return itertools.product((64, 200, 1024, LARGE_M, 65536), ODD_SIZES + (1024, 2048),
                           ODD_SIZES + (1024, 2048), (1, 8, 256), (2, 4))


def test_heuristic_configs_fit_every_multiple_of_64():
  for m, k, n, g, out_itemsize in _sizes_grid():
    config_lib.heuristic_gmm_config(m, k, n, g, out_itemsize).validate_for(
        k, n, 2, out_itemsize)
    config_lib.heuristic_tgmm_config(m, k, n, g, out_itemsize).validate_for(
        k, n, 2, out_itemsize)
    if out_itemsize == 2:  # The fused epilogues write h's dtype.
      for epilogue, make in ((fused_srelu_mgpu.SReLUEpilogue(),
                              fused_srelu_mgpu.srelu_gmm_config),
                             (fused_srelu_mgpu.DSReLUEpilogue(),
                              fused_srelu_mgpu.dsrelu_gmm_config)):
        cfg = make(m, k, n, g, dtype=jnp.bfloat16)
        cfg.validate_for(k, n)
        epilogue.check_supported(m, cfg)
        epilogue.check_smem(cfg, 2, 2)
  for f in ODD_SIZES:
    assert f % srelu_mgpu.srelu_config(f).block_f == 0


def test_a_cached_config_that_does_not_fit_falls_back_to_the_heuristic(
    tmp_path, monkeypatch):
  monkeypatch.setenv("JAXMOE_TUNING_DIR", str(tmp_path))
  tuning_cache.clear()
  m, k, n, g = 4096, 448, 192, 8
  bad = {  # Each tiles K or N in blocks that do not divide it.
      "gmm": config_lib.GmmConfig(128, 128, 64, 3),
      "gmm_t": config_lib.GmmConfig(128, 64, 128, 3),
      "tgmm": config_lib.TgmmConfig(64, 128, 128, 3, warp_specialized=True),
  }
  entries = {tuning_cache.key(op, m, k, n, g, dtype=jnp.bfloat16, out_itemsize=2):
             {"config": dataclasses.asdict(cfg)} for op, cfg in bad.items()}
  tuning_cache.write(tmp_path / tuning_cache.file_name(H100), {"entries": entries})
  try:
    assert config_lib.gmm_config(m, k, n, g, device_kind=H100) == (
        config_lib.heuristic_gmm_config(m, k, n, g))
    assert config_lib.gmm_config(m, k, n, g, transpose_rhs=True, device_kind=H100) == (
        config_lib.heuristic_gmm_config(m, k, n, g))
    assert config_lib.tgmm_config(m, k, n, g, device_kind=H100) == (
        config_lib.heuristic_tgmm_config(m, k, n, g))
  finally:
    tuning_cache.clear()


@pytest.mark.parametrize("k, n, bad", [(96, 128, "K=96"), (128, 96, "N=96"),
                                       (64, 200, "N=200")])
def test_sizes_not_multiples_of_64_are_value_errors(k, n, bad):
  gs = jnp.asarray([40, 0, 24], jnp.int32)
  lhs, rhs = jnp.zeros((64, k), jnp.bfloat16), jnp.zeros((3, k, n), jnp.bfloat16)
  with pytest.raises(ValueError, match=f"{bad} is not a multiple of 64"):
    pallas_kernels.gmm(lhs, rhs, gs, backend="interpret")
  with pytest.raises(ValueError, match=f"{bad} is not a multiple of 64"):
    pallas_kernels.gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True,
                       backend="interpret")
  with pytest.raises(ValueError, match=f"{bad} is not a multiple of 64"):
    pallas_kernels.tgmm(lhs, jnp.zeros((64, n), jnp.bfloat16), gs, backend="interpret")


@pytest.mark.parametrize("fused", [True, False])
def test_mlp_sizes_not_multiples_of_64_are_value_errors(fused):
  gs = jnp.asarray([40, 0, 24], jnp.int32)
  x, p = jnp.zeros((64, 128), jnp.bfloat16), jnp.zeros((64,), jnp.float32)
  w1, w2 = jnp.zeros((3, 128, 96), jnp.bfloat16), jnp.zeros((3, 96, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="=96 is not a multiple of 64"):
    jaxmoe.grouped_mlp(x, w1, w2, gs, p, backend="interpret", fused=fused)
  with pytest.raises(ValueError, match="F=96 is not a multiple of 64"):
    activation.scaled_srelu(jnp.zeros((64, 96), jnp.bfloat16), p, backend="interpret")


# On an H100, at enough rows for the heuristics' 128-row tiles: (M, K, N, group sizes).
GPU_GEMM_CASES = [
    (LARGE_M, 448, 192, [600, 0, 900, 300], False),
    (LARGE_M, 64, 320, [0, 1900], True),
    (LARGE_M + 64, 192, 576, [LARGE_M + 64], False),
    (LARGE_M, 960, 704, [500, 13, 0, 1400], True),
]
GPU_MLP_CASES = [
    (LARGE_M, 448, 576, [600, 0, 900, 300], True),
    (LARGE_M, 448, 576, [600, 0, 900, 300], False),
    (LARGE_M, 192, 320, [0, 1999], True),
    (LARGE_M, 704, 192, [1000, 0, 1, 1000], False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n, group_sizes, transpose_rhs", GPU_GEMM_CASES)
def test_gmm_and_its_gradient_on_gpu(m, k, n, group_sizes, transpose_rhs):
  """The compiled kernels, where shared memory and TMA limits are checked."""
  _check_gemm_and_its_gradient(m, k, n, group_sizes, transpose_rhs, "mosaic_gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("m, hidden, ffn, group_sizes, fused", GPU_MLP_CASES)
def test_grouped_mlp_and_its_gradients_on_gpu(m, hidden, ffn, group_sizes, fused):
  _check_grouped_mlp(m, hidden, ffn, group_sizes, fused, "mosaic_gpu")
