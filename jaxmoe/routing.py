"""Top-k routing and the Switch-style load-balancing loss."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Router = Literal["softmax", "sigmoid"]
ROUTERS: tuple[str, ...] = ("softmax", "sigmoid")


class Routing(NamedTuple):
  """Where each token goes.

  expert_ids: [T, k] int32, the chosen experts of each token.
  weights: [T, k] float32, their combine weights (sum to 1 over k).
  probs: [T, E] float32, the router's distribution over all experts.
  """
  expert_ids: jax.Array
  weights: jax.Array
  probs: jax.Array


def route(logits: jax.Array, top_k: int, router: Router = "softmax") -> Routing:
  """Picks the top_k experts of each token from router logits [T, E].

  "softmax": probs = softmax(logits); the top_k probabilities, renormalised, are
  the weights (Mixtral). "sigmoid": independent sigmoid scores; the top_k scores,
  normalised, are the weights, and probs are the scores normalised over all
  experts (DeepSeek-V3).
  """
  if router not in ROUTERS:
    raise ValueError(f"Unknown router {router!r}; expected one of {ROUTERS}.")
  num_experts = logits.shape[-1]
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"Expected 1 <= top_k <= num_experts={num_experts}, got {top_k}.")
  logits = logits.astype(jnp.float32)
  if router == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
  else:
    scores = jax.nn.sigmoid(logits)
  top_scores, expert_ids = jax.lax.top_k(scores, top_k)
  weights = top_scores / jnp.sum(top_scores, axis=-1, keepdims=True)
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return Routing(expert_ids.astype(jnp.int32), weights, probs)


def tokens_per_expert(expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """[E] int32: how many (token, slot) pairs each expert receives."""
  return jnp.bincount(expert_ids.reshape(-1), length=num_experts).astype(jnp.int32)


def load_balancing_loss(routing: Routing, counts: jax.Array) -> jax.Array:
  """Switch Transformer auxiliary loss E * sum_e f_e * P_e (1.0 when balanced).

  f_e is the share of routed slots sent to expert e, P_e the mean router
  probability of e over tokens.
  """
  num_experts = routing.probs.shape[-1]
  fraction = counts.astype(jnp.float32) / routing.expert_ids.size
  mean_prob = jnp.mean(routing.probs, axis=0)
  return num_experts * jnp.sum(fraction * mean_prob)
