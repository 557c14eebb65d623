"""The scaled squared ReLU as a differentiable op with a kernel and an XLA backend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import ops
from pallas_kernels import quantize
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


def _fused_fwd_kernel():
  from pallas_kernels import fused_srelu_mgpu
  return fused_srelu_mgpu.gmm_srelu_mgpu


def _fused_bwd_kernel():
  from pallas_kernels import fused_srelu_mgpu
  return fused_srelu_mgpu.gmm_dsrelu_mgpu


def _fused_fp8_bwd_kernel():
  from pallas_kernels import fused_srelu_mgpu
  return fused_srelu_mgpu.gmm_fp8_dsrelu_mgpu


def gmm_srelu(x: jax.Array, w1: jax.Array, group_sizes: jax.Array, p: jax.Array, *,
              backend: common.Backend = "auto") -> tuple[jax.Array, jax.Array]:
  """FC1 with the activation in its epilogue (not differentiable on its own).

  Args:
    x: [M, H]; w1: [G, H, F] (same dtype); group_sizes: [G] int32; p: [M] float.

  Returns:
    (h, a), both [M, F] in x.dtype: h = x_g @ w1_g, a = relu(h)**2 * p[:, None].
  """
  common.check_backend(backend)
  common.validate_gmm(x, w1, group_sizes, transpose_rhs=False)
  return ops.dispatch(backend, _fused_fwd_kernel, reference.gmm_srelu_xla,
                      x, w1, group_sizes, p)


def gmm_dsrelu(dy: jax.Array, w2: jax.Array, group_sizes: jax.Array, h: jax.Array,
               p: jax.Array, *, backend: common.Backend = "auto"
               ) -> tuple[jax.Array, jax.Array]:
  """FC2's input gradient with the SReLU derivative in its epilogue.

  Args:
    dy: [M, H]; w2: [G, F, H]; group_sizes: [G] int32; h: [M, F]; p: [M].

  Returns:
    (dh [M, F] in h.dtype, dp [M] float32), from da = dy_g @ w2_g.T (never stored).
  """
  common.check_backend(backend)
  common.validate_gmm(dy, w2, group_sizes, transpose_rhs=True)
  return ops.dispatch(backend, _fused_bwd_kernel, reference.gmm_dsrelu_xla,
                      dy, w2, group_sizes, h, p)


def gmm_fp8_dsrelu(dy: quantize.RowQuantized, w2: quantize.BlockQuantized,
                   group_sizes: jax.Array, h: jax.Array, p: jax.Array, *,
                   backend: common.Backend = "auto") -> tuple[jax.Array, jax.Array]:
  """`gmm_dsrelu` on blockwise FP8 operands: da = dequant(dy)_g @ dequant(w2)_g.T in
  float32 (as `ops.gmm_fp8(dy, w2, transpose_rhs=True)`), never stored.

  Args:
    dy: `quantize.quantize_rows` of [M, H]; w2: `quantize.quantize_blocks` of
      [G, F, H] (`values_t` unused); group_sizes: [G] int32; h: [M, F] bf16 or f32;
      p: [M].

  Returns:
    (dh [M, F] in h.dtype, dp [M] float32).
  """
  common.check_backend(backend)
  common.check_group_sizes(group_sizes, w2.values.shape[0])
  (m, k), (_, f, w2_k) = dy.values.shape, w2.values.shape
  if w2_k != k:
    raise ValueError(f"Contracting sizes differ: dy is [M, H] = {(m, k)} but w2 is "
                     f"[G, F, H] = {tuple(w2.values.shape)}.")
  if h.shape != (m, f) or p.shape != (m,):
    raise ValueError(f"Expected h of shape {(m, f)} and p of shape {(m,)}, got "
                     f"{tuple(h.shape)} and {tuple(p.shape)}.")
  return ops.dispatch(backend, _fused_fp8_bwd_kernel, reference.gmm_fp8_dsrelu_xla,
                      dy.values, dy.scales, w2.values, jnp.swapaxes(w2.scales, 1, 2),
                      group_sizes, h, p)
