"""The functional expert MLP: grouped GEMM -> scaled squared ReLU -> grouped GEMM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from pallas_kernels import activation
from pallas_kernels import common
from jaxmoe import fp8 as fp8_lib
from jaxmoe import fp8_mlp
from jaxmoe import fused_mlp
from jaxmoe import offload


def grouped_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array,
                group_sizes: jax.Array, scales: jax.Array, *,
                b1: jax.Array | None = None, b2: jax.Array | None = None,
                backend: common.Backend = "auto", fused: bool = True,
                fp8: fp8_lib.BlockwiseRecipe | None = None) -> jax.Array:
  """Expert MLP over tokens sorted by expert.

      h = x_g @ w1_g + b1_g               ("activation_input")
      a = relu(h)**2 * p[:, None]         ("fc2_input"; x is "fc1_input")
      y = a @ w2_g + b2_g * p[:, None]

  Args:
    x: [M, H] float, rows sorted by expert; rows past sum(group_sizes) are padding.
    w1: [G, H, F], same dtype as x (any float dtype with fp8: the master weights).
    w2: [G, F, H], likewise.
    group_sizes: [G] int32, rows per expert.
    scales: [M] float, the router probability p of each row.
    b1: optional [G, F]; b2: optional [G, H].
    backend: grouped GEMM backend (see `pallas_kernels.gmm`).
    fused: on the kernel backends, compute the activation in FC1's epilogue and
      its derivative in FC2's input-gradient epilogue (`fused_mlp.py`); with b1
      the unfused kernels run. The result is the same up to rounding order.
      Ignored with fp8.
    fp8: None (the default) for GEMMs in x's dtype, or a `jaxmoe.fp8.BlockwiseRecipe`
      for blockwise-scaled FP8 GEMMs (`fp8_mlp.py`; H and F multiples of 128). Its
      "xla" backend is a reference on the same quantised operands (ragged_dot in
      float32), which "auto" runs where the kernels cannot: never bf16 GEMMs.

  Returns:
    y: [M, H] in x.dtype; padding rows are zero. Differentiable in x, w1, w2,
    b1, b2 and scales.

  Raises:
    ValueError: for shapes or dtypes that do not fit, an `fp8` that is not a
      BlockwiseRecipe, or with fp8 an H or F that is not a multiple of 128.
  """
  _validate(x, w1, w2, group_sizes, scales, b1, b2, fp8)
  if fp8 is not None:
    y = fp8_mlp.fp8_grouped_mlp(x, w1, w2, group_sizes, scales, b1=b1, recipe=fp8,
                                backend=backend)
    return _add_scaled_bias(y, b2, group_sizes, scales)
  if fused and b1 is None and _runs_kernels(backend):
    y = fused_mlp.fused_grouped_mlp(x, w1, w2, group_sizes, scales, backend=backend)
    return _add_scaled_bias(y, b2, group_sizes, scales)
  x = checkpoint_name(x, offload.FC1_INPUT)
  h = pallas_kernels.gmm(x, w1, group_sizes, backend=backend)
  if b1 is not None:
    h = h + rows_of_groups(b1.astype(h.dtype), group_sizes, x.shape[0])
  h = checkpoint_name(h, offload.ACTIVATION_INPUT)
  a = activation.scaled_srelu(h, scales, backend=backend)
  a = checkpoint_name(a, offload.FC2_INPUT)
  y = pallas_kernels.gmm(a, w2, group_sizes, backend=backend)
  return _add_scaled_bias(y, b2, group_sizes, scales)


def _runs_kernels(backend: str) -> bool:
  return backend in ("mosaic_gpu", "interpret") or (
      backend == "auto" and common.on_hopper_gpu())


def _add_scaled_bias(y, b2, group_sizes, scales):
  """y + b2_g * p[:, None] (plain XLA: autodiff adds dy . b2 to dp)."""
  if b2 is None:
    return y
  b2_rows = rows_of_groups(b2.astype(jnp.float32), group_sizes, y.shape[0])
  return (y + b2_rows * scales[:, None].astype(jnp.float32)).astype(y.dtype)


def rows_of_groups(table: jax.Array, group_sizes: jax.Array,
                   num_rows: int) -> jax.Array:
  """Row r of the result is table[group of r]; zero for padding rows.

  Args:
    table: [G, D] per-group values.
    group_sizes: [G] int32.
    num_rows: M.

  Returns:
    [M, D] in table.dtype.
  """
  group_ends = jnp.cumsum(group_sizes)
  group_of_row = jnp.searchsorted(group_ends, jnp.arange(num_rows), side="right")
  padded = jnp.concatenate([table, jnp.zeros_like(table[:1])])  # row G: padding
  return padded[group_of_row]


def _validate(x, w1, w2, group_sizes, scales, b1, b2, fp8) -> None:
  fp8_lib.check_recipe(fp8)
  common.check_rank("x", x, 2, "[M, H]")
  common.check_rank("w1", w1, 3, "[G, H, F]")
  common.check_rank("w2", w2, 3, "[G, F, H]")
  m, hidden = x.shape
  num_groups, _, ffn = w1.shape
  expected = {
      "w1": (w1, (num_groups, hidden, ffn), "[G, H, F]"),
      "w2": (w2, (num_groups, ffn, hidden), "[G, F, H]"),
      "scales": (scales, (m,), "[M]"),
      "b1": (b1, (num_groups, ffn), "[G, F]"),
      "b2": (b2, (num_groups, hidden), "[G, H]"),
  }
  for name, (array, shape, doc) in expected.items():
    if array is not None and tuple(array.shape) != shape:
      raise ValueError(
          f"Expected '{name}' of shape {doc} = {shape} (from x [M, H] = "
          f"{tuple(x.shape)} and w1 [G, H, F] = {tuple(w1.shape)}), got "
          f"{tuple(array.shape)}.")
    if array is not None:
      common.check_float(name, array)
  common.check_float("x", x)
  if fp8 is not None:  # Any float master weights: they are quantised.
    fp8_lib.check_sizes(hidden, ffn)
  for name, w in (("w1", w1), ("w2", w2)):
    if fp8 is None and w.dtype != x.dtype:
      raise ValueError(f"Expected '{name}' in x's dtype {x.dtype}, got {w.dtype}.")
  common.check_group_sizes(group_sizes, num_groups)
