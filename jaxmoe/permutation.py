"""Sorting (token, slot) pairs by expert and combining the expert outputs back."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Dispatch(NamedTuple):
  """Rows of the expert MLP's input, sorted by expert.

  order: [T*k] int32, the flat (token, slot) index of each sorted row.
  scales: [T*k] float32, the combine weight of each sorted row.
  group_sizes: [E] int32, rows per expert.
  """
  order: jax.Array
  scales: jax.Array
  group_sizes: jax.Array


def plan_dispatch(expert_ids: jax.Array, weights: jax.Array,
                  group_sizes: jax.Array) -> Dispatch:
  """Sorts the flat (token, slot) pairs of expert_ids [T, k] by expert, stably."""
  order = jnp.argsort(expert_ids.reshape(-1), stable=True).astype(jnp.int32)
  return Dispatch(order, weights.reshape(-1)[order], group_sizes)


def permute(x: jax.Array, dispatch: Dispatch, top_k: int) -> jax.Array:
  """x [T, H] -> x_sorted [T*k, H]: row i is the token of sorted pair i."""
  return x[dispatch.order // top_k]


def unpermute_and_combine(y_sorted: jax.Array, dispatch: Dispatch,
                          top_k: int) -> jax.Array:
  """y_sorted [T*k, H] -> [T, H], summing each token's k (already scaled) rows."""
  inverse = jnp.zeros_like(dispatch.order).at[dispatch.order].set(
      jnp.arange(dispatch.order.shape[0], dtype=dispatch.order.dtype))
  per_slot = y_sorted[inverse].reshape(-1, top_k, y_sorted.shape[-1])
  return jnp.sum(per_slot.astype(jnp.float32), axis=1).astype(y_sorted.dtype)
