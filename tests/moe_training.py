"""A training step for MoELayer tests: mean squared error to a target plus the
load-balancing loss, one optax update per call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def regression_step(x: jax.Array, target: jax.Array, balance_weight: float = 0.01):
  """An nnx.jit step(layer, optimizer) -> loss that fits layer(x) to target
  (both [..., H]) and updates the layer in place."""

  @nnx.jit
  def step(layer, optimizer):
    def loss(layer):
      y, aux = layer(x)
      return jnp.mean((y - target) ** 2) + balance_weight * aux["load_balancing_loss"]
    value, grads = nnx.value_and_grad(loss)(layer)
    optimizer.update(layer, grads)
    return value

  return step
