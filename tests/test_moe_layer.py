"""MoELayer: routing, dispatch and combine against a per-token NumPy reference; training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmoe
from moe_training import regression_step

H, F, E = 16, 32, 8


def _reference_layer(layer, x, router):
  """Per-token loop in float64: y_t = sum over chosen experts e of w_e * MLP_e(x_t)."""
  x = np.float64(x).reshape(-1, H)
  w_router = np.float64(layer.router_kernel[...])
  w1 = np.float64(layer.experts.w1[...])
  w2 = np.float64(layer.experts.w2[...])
  logits = x @ w_router
  if router == "softmax":
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  y = np.zeros_like(x)
  counts = np.zeros(E, np.int64)
  for t in range(x.shape[0]):
    chosen = np.argsort(-scores[t], kind="stable")[:layer.top_k]
    weights = scores[t, chosen] / scores[t, chosen].sum()
    for e, w in zip(chosen, weights):
      y[t] += w * (np.maximum(x[t] @ w1[e], 0) ** 2) @ w2[e]
      counts[e] += 1
  probs = scores / scores.sum(-1, keepdims=True)
  lb_loss = E * np.sum(counts / counts.sum() * probs.mean(0))
  return y, counts, lb_loss


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_layer_matches_per_token_reference(top_k, router):
  layer = jaxmoe.MoELayer(H, F, E, top_k, router=router, dtype=jnp.float32,
                          rngs=nnx.Rngs(top_k))
  # Larger router weights: decisive routing, some experts get nothing.
  layer.router_kernel[...] = layer.router_kernel[...] * 40
  x = jax.random.normal(jax.random.key(top_k), (3, 7, H))  # 21 tokens, odd
  y, aux = layer(x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert set(aux) >= {"load_balancing_loss", "tokens_per_expert"}
  y_ref, counts_ref, lb_ref = _reference_layer(layer, x, router)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, H), y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(aux["tokens_per_expert"], counts_ref)
  assert int(aux["tokens_per_expert"].sum()) == 21 * top_k
  np.testing.assert_allclose(aux["load_balancing_loss"], lb_ref, rtol=1e-5)


def test_layer_gradients_reach_router_and_experts():
  layer = jaxmoe.MoELayer(H, F, E, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (12, H))

  def loss(layer):
    y, aux = layer(x)
    return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"]

  grads = nnx.grad(loss)(layer)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert np.all(np.isfinite(g)) and np.any(g != 0), path


def test_bad_construction_and_input():
  with pytest.raises(ValueError, match="top_k"):
    jaxmoe.MoELayer(H, F, 4, 5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="router"):
    jaxmoe.MoELayer(H, F, 4, 2, router="hash", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
    jaxmoe.MoELayer(H, F, 4, 2, rngs=nnx.Rngs(0))(jnp.ones((3, 8)))


def test_fifty_optax_steps_learn_a_toy_task():
  """Regress a fixed nonlinear map through the layer: the loss must drop clearly."""
  layer = jaxmoe.MoELayer(H, F, 4, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(layer, optax.adam(3e-3), wrt=nnx.Param)
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (256, H))
  target = jnp.tanh(x @ jax.random.normal(keys[1], (H, H)))

  step = regression_step(x, target)

  losses = [float(step(layer, optimizer)) for _ in range(50)]
  assert losses[-1] < 0.5 * losses[0], losses


def test_scan_over_layers_matches_a_python_loop():
  """A stack made with nnx.vmap and run with nnx.scan (offload on) equals a loop."""
  num_layers = 3

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_stack(rngs):
    return jaxmoe.MoELayer(H, F, 4, 2, dtype=jnp.float32, rngs=rngs)

  stack = make_stack(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (10, H))

  @nnx.jit
  def run_scan(stack, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(x, layer):
      y, aux = layer(x)
      return x + y, aux["load_balancing_loss"]
    return body(x, stack)

  def loss_scan(stack):
    y, lb = run_scan(stack, x)
    return jnp.sum(jnp.sin(y)) + jnp.sum(lb)

  y_scan, lb_scan = run_scan(stack, x)
  grads_scan = nnx.grad(loss_scan)(stack)

  graphdef, state = nnx.split(stack)
  layers = [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            for i in range(num_layers)]
  y_loop, lbs = x, []
  for layer in layers:
    y, aux = layer(y_loop)
    y_loop = y_loop + y
    lbs.append(aux["load_balancing_loss"])
  np.testing.assert_allclose(y_scan, y_loop, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lb_scan, np.array(lbs), rtol=1e-5)
  w1_grads = nnx.state(grads_scan, nnx.Param)["experts"]["w1"][...]
  assert w1_grads.shape == (num_layers, 4, H, F) and np.all(np.isfinite(w1_grads))
  assert np.all(np.abs(w1_grads).reshape(num_layers, -1).max(1) > 0)
