"""The residual names of the expert MLP and the `jax.checkpoint` policy that places them."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

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
# Tagged by the FP8 expert MLP (`jaxmoe/fp8_mlp.py`): the quantised weights' values and
# scales that its backward reads. Not placeable: like the weights, always kept on
# device, so that the weights are quantised once per step, not again in backward.
FP8_WEIGHTS = "fp8_weights"
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
  of `PLACEABLE_NAMES` stay on device, as does `FP8_WEIGHTS`. Everything untagged
  is recomputed.
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
  deferred = _DEFERRED_OFFLOADS.get()
  if deferred is not None:  # jaxmoe.layer_scan moves them; the layer keeps them.
    deferred.update(offload)
    kept, offload = kept + list(offload), ()
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=kept + [FP8_WEIGHTS],
      names_which_can_be_offloaded=list(offload),
      offload_src="device",
      offload_dst="pinned_host",
  )


# Set while `jaxmoe.layer_scan` traces a layer: the names the layer would offload.
_DEFERRED_OFFLOADS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "jaxmoe_deferred_offloads", default=None)


@contextlib.contextmanager
def deferred_offloads() -> Iterator[set[str]]:
  """Within this context `offload_policy` keeps the names it would offload on device
  and adds them to the set it yields, so that a layer scan can copy them to host
  itself, on its own schedule (`jaxmoe.layer_scan.offload_scan`)."""
  names: set[str] = set()
  token = _DEFERRED_OFFLOADS.set(names)
  try:
    yield names
  finally:
    _DEFERRED_OFFLOADS.reset(token)


def offloaded_bytes(offload_names: str | Iterable[str], hidden_size: int, ffn_size: int,
                    top_k: int, tokens: int, itemsize: int = 2) -> int:
  """Bytes that offloading `offload_names` sends to host (and back) for one layer
  of `tokens` tokens: `moe_input` is [tokens, H], `fc1_input` [tokens·top_k, H],
  `activation_input` and `fc2_input` [tokens·top_k, F]."""
  rows = tokens * top_k
  elements = {MOE_INPUT: tokens * hidden_size, FC1_INPUT: rows * hidden_size,
              ACTIVATION_INPUT: rows * ffn_size, FC2_INPUT: rows * ffn_size}
  return itemsize * sum(elements[n] for n in as_names(offload_names, "offload_names"))


def cover_flops_per_byte(offload_names: str | Iterable[str], hidden_size: int,
                         ffn_size: int, top_k: int) -> float | None:
  """Forward FLOPs that the copies of `offload_names` to host can hide under, per byte.

  A residual's copy starts when it exists and must end before its layer's forward
  pass does, so what covers it is the expert GEMM work after it in the layer:
  FC1 + FC2 (4·H·F FLOPs a row) for `moe_input` and `fc1_input`, FC2 alone (2·H·F)
  for `activation_input` and `fc2_input`. Per byte copied, with 2-byte (bf16 or
  fp16) residuals, that is 2·top_k·F, 2·F, H and H. Several names share the link:
  their FLOPs summed over their bytes summed.

  Offloading cost no step time on an H100 when this exceeded its matmul rate over
  the host link (~600 TFLOP/s / 52 GB/s ~ 11,500), and cost step time in every case
  below (docs/offload.md, "When offload pays"; see `copies_hide`).

  Returns:
    FLOPs per byte, or None when nothing is offloaded.

  Raises:
    ValueError: a name is not one of `PLACEABLE_NAMES`.
  """
  names = as_names(offload_names, "offload_names")
  if not names:
    return None
  gemm_per_token = 2 * hidden_size * ffn_size * top_k  # one GEMM over a token's top_k rows
  gemms_after = {MOE_INPUT: 2, FC1_INPUT: 2, ACTIVATION_INPUT: 1, FC2_INPUT: 1}
  flops = gemm_per_token * sum(gemms_after[n] for n in names)
  return flops / offloaded_bytes(names, hidden_size, ffn_size, top_k, tokens=1)


def copies_hide(offload_names: str | Iterable[str], hidden_size: int, ffn_size: int,
                top_k: int, *, matmul_flops_per_s: float = 600e12,
                host_link_bytes_per_s: float = 52e9) -> bool:
  """Whether offloading `offload_names` should cost no step time, by the rule of
  `cover_flops_per_byte` (defaults: an H100 over PCIe, as measured). True when
  nothing is offloaded."""
  cover = cover_flops_per_byte(offload_names, hidden_size, ffn_size, top_k)
  return cover is None or cover >= matmul_flops_per_s / host_link_bytes_per_s
