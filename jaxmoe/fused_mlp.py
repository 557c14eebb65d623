"""The expert MLP on fused kernels: SReLU in the FC1 epilogue, dSReLU in FC2's dgrad.

One `custom_vjp` over the whole MLP; the residuals are tagged inside its forward
rule, so `offload_policy` places them exactly as on the unfused path.
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from pallas_kernels import activation
from jaxmoe import offload


def fused_grouped_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array,
                      group_sizes: jax.Array, scales: jax.Array, *,
                      backend: str) -> jax.Array:
  """y = (relu(x_g @ w1_g)**2 * p) @ w2_g, [M, H] in x.dtype (no biases)."""
  return _fused_mlp(backend)(x, w1, w2, group_sizes, scales)


@functools.cache
def _fused_mlp(backend: str):

  def forward(x, w1, w2, group_sizes, p):
    x = checkpoint_name(x, offload.FC1_INPUT)
    h, a = activation.gmm_srelu(x, w1, group_sizes, p, backend=backend)
    h = checkpoint_name(h, offload.ACTIVATION_INPUT)
    a = checkpoint_name(a, offload.FC2_INPUT)
    y = pallas_kernels.gmm(a, w2, group_sizes, backend=backend)
    return y, (x, w1, w2, group_sizes, p, h, a)

  @jax.custom_vjp
  def mlp(x, w1, w2, group_sizes, p):
    return forward(x, w1, w2, group_sizes, p)[0]

  def backward(residuals, dy):
    x, w1, w2, group_sizes, p, h, a = residuals
    dy = dy.astype(x.dtype)
    dh, dp = activation.gmm_dsrelu(dy, w2, group_sizes, h, p, backend=backend)
    dw2 = pallas_kernels.tgmm(a, dy, group_sizes, backend=backend)
    dw1 = pallas_kernels.tgmm(x, dh, group_sizes, backend=backend)
    dx = pallas_kernels.gmm(dh, w1, group_sizes, transpose_rhs=True, backend=backend)
    return dx, dw1, dw2, None, dp.astype(p.dtype)

  mlp.defvjp(forward, backward)
  return mlp
