"""Input validation and dtype helpers shared by every grouped GEMM backend."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Backend = Literal["auto", "mosaic_gpu", "interpret", "xla"]
BACKENDS: tuple[str, ...] = ("auto", "mosaic_gpu", "interpret", "xla")


def check_rank(name: str, x: jax.typing.ArrayLike, rank: int, shape_doc: str) -> None:
  if np.ndim(x) != rank:
    raise ValueError(
        f"Expected {rank}-D '{name}' of shape {shape_doc}, "
        f"got shape {tuple(np.shape(x))}.")


def check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"Expected a floating dtype for '{name}', got {x.dtype}.")


def check_group_sizes(group_sizes: jax.Array, num_groups: int | None = None) -> None:
  """group_sizes must be int32 of shape [num_groups] (any length when None)."""
  check_rank("group_sizes", group_sizes, 1, f"[{num_groups or 'G'}]")
  if num_groups is not None and group_sizes.shape[0] != num_groups:
    raise ValueError(
        f"Expected 'group_sizes' of shape [{num_groups}] (one entry per group), "
        f"got shape {tuple(group_sizes.shape)}.")
  if group_sizes.dtype != jnp.int32:
    raise ValueError(f"Expected int32 'group_sizes', got {group_sizes.dtype}.")


def check_same_dtype(lhs: jax.Array, rhs: jax.Array) -> None:
  if lhs.dtype != rhs.dtype:
    raise ValueError(
        f"Expected 'lhs' and 'rhs' of one dtype, got {lhs.dtype} and {rhs.dtype}.")


def check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}.")


def out_dtype(lhs: jax.Array, preferred_element_type) -> jnp.dtype:
  return jnp.dtype(lhs.dtype if preferred_element_type is None
                   else preferred_element_type)


def validate_gmm(lhs, rhs, group_sizes, transpose_rhs: bool) -> None:
  """Checks gmm's operands: lhs [M, K], rhs [G, K, N] ([G, N, K] transposed)."""
  check_rank("lhs", lhs, 2, "[M, K]")
  check_rank("rhs", rhs, 3, "[G, N, K]" if transpose_rhs else "[G, K, N]")
  check_float("lhs", lhs)
  check_float("rhs", rhs)
  check_same_dtype(lhs, rhs)
  rhs_k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.shape[1] != rhs_k:
    layout = "[G, N, K]" if transpose_rhs else "[G, K, N]"
    raise ValueError(
        f"Contracting sizes differ: lhs is [M, K] = {tuple(lhs.shape)} but rhs "
        f"is {layout} = {tuple(rhs.shape)}.")
  check_group_sizes(group_sizes, rhs.shape[0])


def validate_tgmm(lhs, rhs, group_sizes) -> None:
  """Checks tgmm's operands: lhs [M, K], rhs [M, N], group_sizes [G]."""
  check_rank("lhs", lhs, 2, "[M, K]")
  check_rank("rhs", rhs, 2, "[M, N]")
  check_float("lhs", lhs)
  check_float("rhs", rhs)
  check_same_dtype(lhs, rhs)
  if lhs.shape[0] != rhs.shape[0]:
    raise ValueError(
        f"Row counts differ: lhs is [M, K] = {tuple(lhs.shape)}, rhs is "
        f"[M, N] = {tuple(rhs.shape)}.")
  check_group_sizes(group_sizes)


# The kernels' input contract (README, "Backends and the input contract"): every block
# size a config can pick is a multiple of 64, so a K, N (or the MLP's H, F) that is one
# splits into whole blocks of some config; TMA tiles lhs rows in 8s.
KERNEL_SIZE_MULTIPLE = 64
KERNEL_ROWS_MULTIPLE = 8


def check_kernel_multiple(name: str, size: int) -> None:
  """NotImplementedError unless `size` is a multiple of KERNEL_SIZE_MULTIPLE."""
  if size % KERNEL_SIZE_MULTIPLE:
    raise NotImplementedError(
        f"{name}={size} is not a multiple of {KERNEL_SIZE_MULTIPLE}.")


def check_kernel_sizes(m: int, k: int, n: int) -> None:
  """NotImplementedError unless a grouped GEMM kernel takes lhs [M, K] and N output
  columns: K and N multiples of 64, M a positive multiple of 8.

  NotImplementedError, not ValueError, so that "auto" falls back to XLA; an explicit
  kernel backend turns it into a ValueError (`ops.dispatch`).
  """
  check_kernel_multiple("K", k)
  check_kernel_multiple("N", n)
  if m == 0 or m % KERNEL_ROWS_MULTIPLE:
    raise NotImplementedError(
        f"M={m} is not a positive multiple of {KERNEL_ROWS_MULTIPLE}.")


def on_hopper_gpu() -> bool:
  """True when the default device is an NVIDIA GPU of compute capability >= 9.0."""
  if jax.default_backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return float(capability) >= 9.0
