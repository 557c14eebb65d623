"""The FP8 training recipe of the expert MLP, and the checks of its input contract."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import quantize


# The recipe fields with more than one implemented value.
_CHOICES = {"wgrad_dtype": ("bfloat16", "float8_e4m3fn")}


@dataclasses.dataclass(frozen=True)
class BlockwiseRecipe:
  """Blockwise-scaled FP8 for the expert MLP's four grouped GEMMs (DeepSeek-V3's recipe,
  TransformerEngine's `Float8BlockScaling`), turned on by `grouped_mlp(..., fp8=...)`,
  `GroupedMLP(..., fp8=...)` and `MoELayer(..., fp8=...)`.

  * Operands are `float8_e4m3fn` (`fp8_dtype`), scales `float32` (`scale_dtype`); a
    scale is amax(|tile|) / 448, so every tile uses e4m3's whole range.
  * Activations and gradients (x, a = relu(h)**2 * p, dy, dh) are scaled per 1x128
    tile (`activation_tile`): one scale per row per 128 columns
    (`pallas_kernels.quantize.quantize_rows`).
  * Weights (w1, w2) are scaled per 128x128 block (`weight_block`;
    `quantize.quantize_blocks`), so the transposed weight of the input gradient
    reads the same numbers with no second quantisation.
  * Master weights keep the parameter dtype; they are quantised once per call, inside
    the step, and their FP8 values and scales are kept on device for the backward pass.
  * The forward GEMMs (h = x @ w1, y = a @ w2) and the input-gradient GEMMs
    (da = dy @ w2.T, dx = dh @ w1.T) run in FP8, accumulating in float32. The weight
    gradients (dw2 = a.T @ dy, dw1 = x.T @ dh) run in `wgrad_dtype`: "bfloat16" (the
    default), a bf16 grouped GEMM on the dequantised saved activations, or
    "float8_e4m3fn", the FP8 transposed grouped GEMM (`pallas_kernels.tgmm_fp8`) on
    column tiles of each group's rows (`pallas_kernels.quantize_rows_and_columns`:
    x, a, dy and dh quantised by rows and by columns in one pass; the column tiles of
    x and a are what the forward saves).
  * h, the SReLU and its derivative stay in x's dtype / float32.

  The hidden and FFN sizes must be multiples of 128. Only these values are
  implemented; the fields name them so that a run records its recipe.

  Example:
    >>> BlockwiseRecipe().weight_block
    (128, 128)
  """
  fp8_dtype: str = "float8_e4m3fn"
  scale_dtype: str = "float32"
  activation_tile: tuple[int, int] = (1, quantize.BLOCK)
  weight_block: tuple[int, int] = (quantize.BLOCK, quantize.BLOCK)
  wgrad_dtype: str = "bfloat16"

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value, default = getattr(self, field.name), field.default
      if field.name.endswith("dtype"):
        value = jnp.dtype(value).name  # Canonical, so equal recipes hash equal.
        object.__setattr__(self, field.name, value)
      else:
        value = tuple(value)
        object.__setattr__(self, field.name, value)
      allowed = _CHOICES.get(field.name, (default,))
      if value not in allowed:
        implemented = (f"={default!r} only" if len(allowed) == 1
                       else f" in {allowed}")
        raise ValueError(f"BlockwiseRecipe implements {field.name}{implemented}, got "
                         f"{value!r}.")


def check_recipe(fp8) -> None:
  """ValueError unless `fp8` is None or a BlockwiseRecipe."""
  if fp8 is not None and not isinstance(fp8, BlockwiseRecipe):
    raise ValueError(
        f"Expected 'fp8' to be None or a jaxmoe.fp8.BlockwiseRecipe, got {fp8!r}.")


def check_sizes(hidden_size: int, ffn_size: int) -> None:
  """ValueError unless H and F are multiples of the 128-wide scale tiles."""
  for name, what, size in (("H", "hidden size", hidden_size), ("F", "FFN size", ffn_size)):
    if size % quantize.BLOCK:
      raise ValueError(
          f"fp8 needs the {what} {name} to be a multiple of {quantize.BLOCK}, got "
          f"{name}={size} (its scale tiles are 1x{quantize.BLOCK} and "
          f"{quantize.BLOCK}x{quantize.BLOCK}).")
