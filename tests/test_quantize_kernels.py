"""The one-pass FP8 quantisation kernels (`quantize_blocks_triton` for weights,
`quantize_rows_triton` for activations, with or without the SReLU) against float64
NumPy references and the XLA `quantize` functions: in the Pallas interpreter on CPU,
lowered for cuda, and at full size on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
import pallas_kernels
from cuda_lowering import lower_for_h100
from pallas_kernels import quantize
from pallas_kernels.quantize_blocks_triton import quantize_blocks_triton
from pallas_kernels.quantize_rows_triton import quantize_rows_triton

BLOCK = quantize.BLOCK


def _blocky_weight(rng, g, k, n):
  """Normal values times a power of ten per 128x128 block, one block all zeros."""
  mags = 10.0 ** rng.uniform(-3, 3, (g, k // BLOCK, 1, n // BLOCK, 1))
  w = (rng.standard_normal((g, k // BLOCK, BLOCK, n // BLOCK, BLOCK)) * mags).reshape(g, k, n)
  w[0, :BLOCK, :BLOCK] = 0.0
  return w


@pytest.mark.parametrize("g,k,n,dtype", [(3, 256, 384, jnp.float32), (1, 128, 128, jnp.float32),
                                         (2, 384, 256, jnp.bfloat16)])
def test_quantize_blocks_kernel_matches_numpy(g, k, n, dtype):
  w = jnp.asarray(_blocky_weight(np.random.default_rng(g * k + n), g, k, n), dtype)
  q = quantize_blocks_triton(w, interpret=True)
  deq, values, scales = ref.quantize_blocks(np.float32(np.asarray(w, np.float32)))
  assert q.values.dtype == q.values_t.dtype == quantize.FP8
  assert q.values.shape == (g, k, n) and q.values_t.shape == (g, n, k)
  assert q.scales.dtype == jnp.float32 and q.scales.shape == (g, k // BLOCK, n // BLOCK)
  np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=1e-6)
  assert np.asarray(q.scales)[0, 0, 0] == 1.0  # the all-zero block
  np.testing.assert_array_equal(np.float64(np.asarray(q.values)), values)
  np.testing.assert_array_equal(np.float64(np.asarray(q.values_t)), np.swapaxes(values, 1, 2))
  np.testing.assert_allclose(np.asarray(quantize.dequantize_blocks(q)), deq, rtol=1e-6)


def test_quantize_blocks_op_backends_agree():
  w = jnp.asarray(_blocky_weight(np.random.default_rng(7), 2, 256, 128), jnp.float32)
  kernel = pallas_kernels.quantize_blocks(w, backend="interpret")
  xla = pallas_kernels.quantize_blocks(w, backend="xla")
  for a, b in zip(kernel, xla):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("shape,match", [
    ((2, 200, 128), "multiple of 128"),
    ((2, 128, 192), "multiple of 128"),
    ((256, 128), "3-D"),
])
@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_quantize_blocks_op_rejects_bad_shapes(shape, match, backend):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.quantize_blocks(jnp.ones(shape, jnp.float32), backend=backend)


def test_quantize_blocks_op_rejects_integer_weights():
  with pytest.raises(ValueError, match="floating dtype"):
    pallas_kernels.quantize_blocks(jnp.ones((1, 128, 128), jnp.int32), backend="interpret")


def test_quantize_blocks_kernel_lowers_for_h100():
  w = jax.ShapeDtypeStruct((64, 4096, 1024), jnp.float32)
  text = lower_for_h100(lambda w: tuple(pallas_kernels.quantize_blocks(w, backend="mosaic_gpu")), w)
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert "tensor<64x1024x4096xf8E4M3FN>" in text and "tensor<64x32x8xf32>" in text


@pytest.mark.gpu
@pytest.mark.parametrize("g,k,n", [(8, 2048, 4096), (64, 1024, 4096)])
def test_quantize_blocks_kernel_full_size(g, k, n):
  w = jax.random.normal(jax.random.key(g), (g, k, n), jnp.float32)
  w = w * 10.0 ** jax.random.uniform(jax.random.key(1), (g, k // BLOCK, 1, n // BLOCK, 1),
                                     minval=-3, maxval=3).repeat(BLOCK, 2).repeat(
                                         BLOCK, 4).reshape(g, k, n)
  kernel = jax.jit(lambda w: pallas_kernels.quantize_blocks(w, backend="mosaic_gpu"))(w)
  xla = jax.jit(quantize.quantize_blocks)(w)
  np.testing.assert_allclose(np.asarray(kernel.scales), np.asarray(xla.scales), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(kernel.values_t),
                                np.swapaxes(np.asarray(kernel.values), 1, 2))
  # The GPU's float32 division may differ from XLA's by an ulp, which moves a value to
  # the neighbouring e4m3 number only at a rounding tie.
  diff = np.asarray(kernel.values, np.float32) != np.asarray(xla.values, np.float32)
  assert diff.mean() < 1e-5, diff.mean()


def _blocky_rows(rng, m, k):
  """Normal values times a power of ten per 1x128 tile, one tile all zeros."""
  x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 3, (m, k // BLOCK)).repeat(BLOCK, 1)
  x[1, :BLOCK] = 0.0
  return x


@pytest.mark.parametrize("m,k,dtype,srelu", [
    (136, 384, jnp.float32, False), (24, 128, jnp.bfloat16, False),
    (136, 256, jnp.bfloat16, True), (64, 128, jnp.float32, True)])
def test_quantize_rows_kernel_matches_numpy(m, k, dtype, srelu):
  rng = np.random.default_rng(m + k)
  x = jnp.asarray(_blocky_rows(rng, m, k), dtype)
  p = jnp.asarray(rng.uniform(0.1, 1.0, m), jnp.float32) if srelu else None
  q = quantize_rows_triton(x, p, interpret=True)
  a = np.float32(np.asarray(x, np.float32))
  if srelu:
    a = np.maximum(a, 0) ** 2 * np.asarray(p)[:, None]
  _, values, scales = ref.quantize_rows(a)
  assert q.values.dtype == quantize.FP8 and q.values.shape == (m, k)
  assert q.scales.dtype == jnp.float32 and q.scales.shape == (k // BLOCK, m)
  np.testing.assert_allclose(np.asarray(q.scales).T, scales, rtol=1e-6)
  assert np.asarray(q.scales)[0, 1] == 1.0  # the all-zero tile
  # The reference scales by amax * (1 / 448), the kernel by amax / 448: an ulp apart,
  # which moves a value to the neighbouring e4m3 number at a rounding tie only.
  assert (np.float64(np.asarray(q.values)) != values).mean() < 1e-4
  err = np.abs(np.asarray(quantize.dequantize_rows(q)) - a)
  assert (err <= (np.abs(a) / 16 + 2.0**-10 * np.repeat(scales, BLOCK, 1)) * (1 + 1e-6)).all()


@pytest.mark.parametrize("srelu", [False, True])
def test_quantize_rows_op_backends_agree(srelu):
  rng = np.random.default_rng(3)
  x = jnp.asarray(_blocky_rows(rng, 40, 256), jnp.bfloat16)
  p = jnp.asarray(rng.uniform(0.1, 1.0, 40), jnp.float32) if srelu else None
  kernel = pallas_kernels.quantize_rows(x, srelu_scales=p, backend="interpret")
  xla = pallas_kernels.quantize_rows(x, srelu_scales=p, backend="xla")
  for a, b in zip(kernel, xla):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("x_shape,p_shape,match", [
    ((40, 200), None, "multiple of 128"), ((3, 40, 128), None, "2-D"),
    ((40, 128), (39,), "srelu_scales")])
def test_quantize_rows_op_rejects_bad_shapes(x_shape, p_shape, match):
  p = None if p_shape is None else jnp.ones(p_shape, jnp.float32)
  for backend in ("interpret", "xla"):
    with pytest.raises(ValueError, match=match):
      pallas_kernels.quantize_rows(jnp.ones(x_shape, jnp.float32), srelu_scales=p,
                                   backend=backend)


def test_quantize_rows_kernel_takes_m_multiple_of_8_only():
  x = jnp.ones((36, 128), jnp.float32)
  with pytest.raises(ValueError, match="M=36 is not a positive multiple of 8"):
    pallas_kernels.quantize_rows(x, backend="interpret")
  q = pallas_kernels.quantize_rows(x, backend="auto")  # XLA takes it
  np.testing.assert_array_equal(np.asarray(quantize.dequantize_rows(q)), np.ones((36, 128)))


def test_quantize_rows_kernel_lowers_for_h100():
  x = jax.ShapeDtypeStruct((16384, 4096), jnp.bfloat16)
  p = jax.ShapeDtypeStruct((16384,), jnp.float32)
  text = lower_for_h100(lambda x, p: tuple(pallas_kernels.quantize_rows(
      x, srelu_scales=p, backend="mosaic_gpu")), x, p)
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert "tensor<16384x4096xf8E4M3FN>" in text and "tensor<32x16384xf32>" in text


@pytest.mark.gpu
@pytest.mark.parametrize("srelu", [False, True])
def test_quantize_rows_kernel_full_size(srelu):
  m, k = 16384, 4096
  x = jnp.asarray(_blocky_rows(np.random.default_rng(0), m, k), jnp.bfloat16)
  p = jax.random.uniform(jax.random.key(1), (m,), minval=0.1, maxval=1.0) if srelu else None
  kernel = jax.jit(lambda x, p: pallas_kernels.quantize_rows(
      x, srelu_scales=p, backend="mosaic_gpu"))(x, p)
  xla = jax.jit(quantize.quantize_rows)(x, p)
  np.testing.assert_allclose(np.asarray(kernel.scales), np.asarray(xla.scales), rtol=1e-6)
  diff = np.asarray(kernel.values, np.float32) != np.asarray(xla.values, np.float32)
  assert diff.mean() < 1e-5, diff.mean()  # an ulp of float32 division, at ties only
