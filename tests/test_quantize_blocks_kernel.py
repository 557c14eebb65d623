"""The weights' one-pass FP8 quantisation kernel (`quantize_blocks_triton`) against a
float64 NumPy reference and the XLA `quantize.quantize_blocks`: in the Pallas
interpreter on CPU, lowered for cuda, and at full size on a GPU."""

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
