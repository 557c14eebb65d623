"""The expert MLP with blockwise-scaled FP8 GEMMs (`jaxmoe.fp8.BlockwiseRecipe`).

One `custom_vjp` over the whole MLP, so that each GEMM reads operands quantised once
and the backward pass reuses the forward's quantised activations:

    forward                                       saved for backward, by name
    xq  = quantize_rows(x)                        xq  "fc1_input"  (e4m3 values + scales)
    w1q = quantize_blocks(w1), w2q likewise       values + scales  "fp8_weights" (device)
    h   = gmm_fp8(xq, w1q) [+ b1]                 h   "activation_input"
    aq  = quantize_rows(relu(h)**2 * p)           aq  "fc2_input"  (e4m3 values + scales)
    y   = gmm_fp8(aq, w2q)

    backward
    dyq = quantize_rows(dy)
    da  = gmm_fp8(dyq, w2q, transpose_rhs=True)   float32, w2q's [G, F, H] layout as stored
    dh  = da * p * 2 relu(h)                      in h's dtype
    dp  = sum_j da_j relu(h_j)**2,  db1 = per-expert sum of dh
    dhq = quantize_rows(dh)
    dx  = gmm_fp8(dhq, w1q, transpose_rhs=True)
    dw2 = tgmm(dequant(aq), dy),  dw1 = tgmm(dequant(xq), dh)   in bf16 (recipe.wgrad_dtype)

With wgrad_dtype float8_e4m3fn the weight gradients are `tgmm_fp8`s, whose operands
are quantised by column tiles of each group's rows: x, a, dy and dh each go through
`pallas_kernels.quantize_rows_and_columns`, one read giving the row tiles for gmm
and the column tiles for tgmm_fp8, and the forward saves the column tiles of x and a
under "fc1_input" and "fc2_input" (the backward reads x and a only there):

    dw2 = tgmm_fp8(columns(a), columns(dy)),  dw1 = tgmm_fp8(columns(x), columns(dh))

The SReLU derivative runs in FC2's input-gradient epilogue
(`activation.gmm_fp8_dsrelu` writes dh and dp; da never reaches HBM). Every
quantisation is one pass of a Pallas kernel (`pallas_kernels.quantize_blocks` writes
both layouts of a weight; `pallas_kernels.quantize_rows` computes the SReLU of h on
the fly and quantises a, which never reaches HBM unquantised).

The residuals are tagged inside the forward rule under the bf16 path's names, each
FP8 residual as a (values, scales) pair under one name, so `offload_policy` moves
or recomputes them exactly as it does the bf16 tensors, at about half the bytes.
The saved e4m3 values are bitcast to uint8 (free in XLA): `jax.checkpoint` passes
every float residual through `reduce_precision(exponent_bits=4, mantissa_bits=3)`,
which follows IEEE rules and turns e4m3fn's finite 256..448 (each tile's largest
values) into NaN (jax 0.11.2, `ad_checkpoint._insert_reduce_precision`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from pallas_kernels import activation
from pallas_kernels import quantize
from jaxmoe import fp8 as fp8_lib
from jaxmoe import offload

# What gmm_fp8 writes (bf16 or f32); other dtypes go through f32.
_KERNEL_OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def fp8_grouped_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array, group_sizes: jax.Array,
                    scales: jax.Array, *, b1: jax.Array | None,
                    recipe: fp8_lib.BlockwiseRecipe, backend: str) -> jax.Array:
  """y = (relu(x_g @ w1_g + b1_g)**2 * p) @ w2_g with FP8 GEMMs, [M, H] in x.dtype.

  Args as `jaxmoe.grouped_mlp` (validated there): x [M, H], w1 [G, H, F] and w2
  [G, F, H] in any float dtype (the master weights), b1 [G, F] or None.
  """
  dtypes = tuple(None if a is None else jnp.dtype(a.dtype) for a in (x, w1, w2, b1, scales))
  return _fp8_mlp(recipe, backend, dtypes)(x, w1, w2, b1, group_sizes, scales)


def _gmm_dtype(dtype: jnp.dtype) -> jnp.dtype:
  return dtype if dtype in _KERNEL_OUT_DTYPES else jnp.dtype(jnp.float32)


def _group_of_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """[M] int32: the group of each row, G for padding rows."""
  return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(num_rows), side="right")


def _saved(q):
  """A quantised tensor as saved for backward: its e4m3 values bitcast to uint8."""
  return type(q)(*(None if a is None or a.dtype != quantize.FP8
                   else jax.lax.bitcast_convert_type(a, jnp.uint8) for a in q[:-1]),
                 q[-1])


def _restored(q):
  """Inverse of `_saved`."""
  return type(q)(*(None if a is None else jax.lax.bitcast_convert_type(a, quantize.FP8)
                   for a in q[:-1]), q[-1])


@functools.cache
def _fp8_mlp(recipe: fp8_lib.BlockwiseRecipe, backend: str, dtypes: tuple):
  x_dtype, w1_dtype, w2_dtype, b1_dtype, p_dtype = dtypes
  wgrad_dtype = jnp.dtype(recipe.wgrad_dtype)
  gmm_fp8 = functools.partial(pallas_kernels.gmm_fp8, backend=backend)
  quantize_rows = functools.partial(pallas_kernels.quantize_rows, backend=backend)

  fp8_wgrad = wgrad_dtype == quantize.FP8

  def quantized(t, group_sizes, srelu_scales=None):
    """(row tiles of t for gmm_fp8, what the weight gradient keeps of t: its column
    tiles for tgmm_fp8 with FP8 weight gradients, else the row tiles)."""
    if fp8_wgrad:
      return pallas_kernels.quantize_rows_and_columns(
          t, group_sizes, srelu_scales=srelu_scales, backend=backend)
    rows = quantize_rows(t, srelu_scales=srelu_scales)
    return rows, rows

  def wgrad(lhs_kept, rhs_kept, group_sizes, num_rows, out_dtype):
    """[G, K, N] = lhs.T @ rhs per group, from what `quantized` kept of each (or,
    for bf16 weight gradients, from a row-quantised lhs and a float rhs)."""
    if fp8_wgrad:
      return pallas_kernels.tgmm_fp8(
          lhs_kept, rhs_kept, group_sizes, num_rows=num_rows,
          out_dtype=_gmm_dtype(out_dtype), backend=backend).astype(out_dtype)
    lhs = quantize.dequantize_rows(lhs_kept)
    return pallas_kernels.tgmm(
        lhs.astype(wgrad_dtype), rhs_kept.astype(wgrad_dtype), group_sizes,
        preferred_element_type=jnp.float32, backend=backend).astype(out_dtype)

  def forward(x, w1, w2, b1, group_sizes, p):
    xq, x_kept = quantized(x, group_sizes)
    w1q, w2q = (pallas_kernels.quantize_blocks(w, backend=backend) for w in (w1, w2))
    h = gmm_fp8(xq, w1q, group_sizes, out_dtype=_gmm_dtype(x_dtype))
    if b1 is not None:
      b1_rows = jnp.concatenate([b1, jnp.zeros_like(b1[:1])])[
          _group_of_rows(group_sizes, x.shape[0])]  # zero for padding rows
      h = h.astype(jnp.float32) + b1_rows.astype(jnp.float32)
    h = checkpoint_name(h.astype(x_dtype), offload.ACTIVATION_INPUT)
    aq, a_kept = quantized(h, group_sizes, srelu_scales=p)
    y = gmm_fp8(aq, w2q, group_sizes, out_dtype=_gmm_dtype(x_dtype)).astype(x_dtype)
    # The backward pass reads the weights' [G, in, out] layout only (values_t is the
    # forward's), with their scales.
    saved_w = checkpoint_name(
        tuple(_saved(quantize.BlockQuantized(q.values, None, q.scales)) for q in (w1q, w2q)),
        offload.FP8_WEIGHTS)
    return y, (checkpoint_name(_saved(x_kept), offload.FC1_INPUT), saved_w, group_sizes, p,
               h, checkpoint_name(_saved(a_kept), offload.FC2_INPUT))

  @jax.custom_vjp
  def mlp(x, w1, w2, b1, group_sizes, p):
    return forward(x, w1, w2, b1, group_sizes, p)[0]

  def backward(residuals, dy):
    x_kept, (w1q, w2q), group_sizes, p, h, a_kept = residuals
    x_kept, w1q, w2q, a_kept = map(_restored, (x_kept, w1q, w2q, a_kept))
    dyq, dy_kept = quantized(dy, group_sizes)
    dh, dp = activation.gmm_fp8_dsrelu(dyq, w2q, group_sizes,
                                       h.astype(_gmm_dtype(h.dtype)), p, backend=backend)
    dhq, dh_kept = quantized(dh, group_sizes)
    dx = gmm_fp8(dhq, w1q, group_sizes, transpose_rhs=True,
                 out_dtype=_gmm_dtype(x_dtype)).astype(x_dtype)
    num_rows = dy.shape[0]
    dw2 = wgrad(a_kept, dy_kept if fp8_wgrad else dy, group_sizes, num_rows, w2_dtype)
    dw1 = wgrad(x_kept, dh_kept if fp8_wgrad else dh, group_sizes, num_rows, w1_dtype)
    db1 = None
    if b1_dtype is not None:
      num_groups = group_sizes.shape[0]
      db1 = jax.ops.segment_sum(dh, _group_of_rows(group_sizes, dh.shape[0]),
                                num_segments=num_groups + 1)[:num_groups].astype(b1_dtype)
    return dx, dw1, dw2, db1, None, dp.astype(p_dtype)

  mlp.defvjp(forward, backward)
  return mlp
