"""Scaled SReLU kernels: the Mosaic GPU kernels in the interpreter vs float64 NumPy,
their cuda lowering, and the differentiable op on every backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuda_lowering import lower_for_h100
from pallas_kernels import activation
from pallas_kernels import srelu_mgpu


def _inputs(m, f, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((m, f)), dtype),
          jnp.asarray(rng.uniform(0.0, 1.0, m), jnp.float32),
          jnp.asarray(rng.standard_normal((m, f)), dtype))


def _reference(h, p, da):
  h, p, da = np.float64(h), np.float64(p), np.float64(da)
  relu = np.maximum(h, 0)
  return relu**2 * p[:, None], da * p[:, None] * 2 * relu, np.sum(da * relu**2, axis=1)


def _close(actual, expected, rtol):
  actual, expected = np.float64(actual), np.float64(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m", [128, 200, 37])  # 200 and 37: a partial last row tile
def test_kernels_in_interpreter_match_reference(m, dtype):
  h, p, da = _inputs(m, 256, dtype, seed=m)
  a_ref, dh_ref, dp_ref = _reference(h, p, da)
  tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
  a = srelu_mgpu.scaled_srelu_fwd_mgpu(h, p, interpret=True)
  assert a.dtype == dtype and a.shape == h.shape
  _close(a, a_ref, tol)
  dh, dp = srelu_mgpu.scaled_srelu_bwd_mgpu(da, h, p, interpret=True)
  assert dh.dtype == dtype and dp.dtype == jnp.float32
  _close(dh, dh_ref, tol)
  _close(dp, dp_ref, 1e-5)  # da, h exact in f32 registers; only the f32 sum rounds


def test_op_vjp_on_interpret_matches_xla():
  h, p, da = _inputs(64, 128, jnp.bfloat16, seed=1)
  outs = {}
  for backend in ("interpret", "xla"):
    a, vjp = jax.vjp(lambda h, p: activation.scaled_srelu(h, p, backend=backend), h, p)
    outs[backend] = (a, *vjp(da))
  for got, want in zip(outs["interpret"], outs["xla"]):
    _close(got, want, 1e-2)


def test_kernels_lower_for_h100():
  h, p, da = _inputs(4096, 2048, jnp.bfloat16)
  assert "mosaic_gpu" in lower_for_h100(srelu_mgpu.scaled_srelu_fwd_mgpu, h, p)
  assert "mosaic_gpu" in lower_for_h100(srelu_mgpu.scaled_srelu_bwd_mgpu, da, h, p)


def test_unsupported_input_raises():
  h, p, _ = _inputs(64, 100, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="multiple of 64"):
    srelu_mgpu.scaled_srelu_fwd_mgpu(h, p, interpret=True)
  with pytest.raises(ValueError, match="cannot run this input"):
    activation.scaled_srelu(h, p, backend="interpret")
  with pytest.raises(NotImplementedError, match="bf16 or fp16"):
    srelu_mgpu.scaled_srelu_fwd_mgpu(h.astype(jnp.float32), p, interpret=True)
  np.testing.assert_array_equal(  # "auto" on CPU: XLA
      activation.scaled_srelu(h, p), activation.scaled_srelu(h, p, backend="xla"))
