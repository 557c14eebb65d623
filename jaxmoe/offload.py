"""The residual names of the expert MLP and the `jax.checkpoint` policy that places them."""

from __future__ import annotations

from collections.abc import Iterable

import jax

# Residuals tagged with `jax.ad_checkpoint.checkpoint_name` in `grouped_mlp`.
FC1_INPUT = "fc1_input"                # x, [M, H]: the permuted tokens
ACTIVATION_INPUT = "activation_input"  # h = x @ w1 + b1, [M, F]
FC2_INPUT = "fc2_input"                # a = relu(h)**2 * p, [M, F]
RESIDUAL_NAMES: tuple[str, ...] = (FC1_INPUT, ACTIVATION_INPUT, FC2_INPUT)
DEFAULT_OFFLOAD_NAMES: tuple[str, ...] = (FC1_INPUT, ACTIVATION_INPUT)
# Tagged by `MoELayer` only: its own input tokens [T, H] before the top_k-fold
# gather into fc1_input. Offloading it and recomputing fc1_input moves top_k times
# fewer bytes over the host link for the same device memory saved.
MOE_INPUT = "moe_input"
PLACEABLE_NAMES: tuple[str, ...] = RESIDUAL_NAMES + (MOE_INPUT,)
OFFLOAD_UNPERMUTED = dict(offload_names=(MOE_INPUT, ACTIVATION_INPUT),
                          recompute_names=(FC1_INPUT,))


def as_names(names: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
  """Normalises a name or names to a tuple, checking each against PLACEABLE_NAMES."""
  if names is None:
    return ()
  names = (names,) if isinstance(names, str) else tuple(names)
  for name in names:
    if name not in PLACEABLE_NAMES:
      raise ValueError(
          f"Unknown residual name {name!r} in {what}; valid names are "
          f"{PLACEABLE_NAMES}.")
  return names


def offload_policy(offload_names: str | Iterable[str] = DEFAULT_OFFLOAD_NAMES,
                   recompute_names: str | Iterable[str] = ()):
  """A `jax.checkpoint` policy placing each expert-MLP residual.

  Names in `offload_names` are saved in pinned host memory, names in
  `recompute_names` are recomputed in the backward pass, and the other names
  of `PLACEABLE_NAMES` stay on device. Everything untagged is recomputed.
  `RESIDUAL_NAMES` are the expert MLP's; `MOE_INPUT` exists inside `MoELayer`
  (see `OFFLOAD_UNPERMUTED`).

  Raises:
    ValueError: a name is not one of `PLACEABLE_NAMES`, or is in both lists.
  """
  offload = as_names(offload_names, "offload_names")
  recompute = as_names(recompute_names, "recompute_names")
  both = sorted(set(offload) & set(recompute))
  if both:
    raise ValueError(
        f"Residual names {both} are both offloaded and recomputed; give each of "
        f"{PLACEABLE_NAMES} at most one placement.")
  kept = [n for n in PLACEABLE_NAMES if n not in offload and n not in recompute]
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=kept,
      names_which_can_be_offloaded=list(offload),
      offload_src="device",
      offload_dst="pinned_host",
  )
