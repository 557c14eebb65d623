"""The scaled squared ReLU as a differentiable op with a kernel and an XLA backend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import ops
from pallas_kernels import reference


def scaled_srelu(h: jax.Array, p: jax.Array, *,
                 backend: common.Backend = "auto") -> jax.Array:
  """a = relu(h)**2 * p[:, None], computed in float32.

  Args:
    h: [M, F] float.
    p: [M] float, one scale per row (applied after squaring).
    backend: "mosaic_gpu" / "interpret" run `srelu_mgpu`'s kernels, "xla" plain
      XLA, "auto" the kernels on Hopper when they take the input.

  Returns:
    [M, F] in h.dtype; differentiable in h and p (dp in p.dtype).
  """
  common.check_backend(backend)
  common.check_rank("h", h, 2, "[M, F]")
  common.check_rank("p", p, 1, f"[{h.shape[0]}]")
  if p.shape[0] != h.shape[0]:
    raise ValueError(f"Expected 'p' of shape [{h.shape[0]}], got {tuple(p.shape)}.")
  return _srelu_vjp(backend)(h, p)


def _fwd_kernel():
  from pallas_kernels import srelu_mgpu
  return srelu_mgpu.scaled_srelu_fwd_mgpu


def _bwd_kernel():
  from pallas_kernels import srelu_mgpu
  return srelu_mgpu.scaled_srelu_bwd_mgpu


@functools.cache
def _srelu_vjp(backend: str):
  @jax.custom_vjp
  def f(h, p):
    return ops.dispatch(backend, _fwd_kernel, reference.scaled_srelu_xla, h, p)

  def fwd(h, p):
    return f(h, p), (h, p)

  def bwd(residuals, da):
    h, p = residuals
    dh, dp = ops.dispatch(backend, _bwd_kernel, reference.scaled_srelu_bwd_xla, da, h, p)
    return dh.astype(h.dtype), dp.astype(p.dtype)

  f.defvjp(fwd, bwd)
  return f
