"""jaxmoe.layer_scan: same values and gradients as a plain scan, offloaded names moved, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # private: lists what backward keeps

import jaxmoe
from jaxmoe import layer_scan
from cuda_lowering import as_if_on_h100

T, H, F, E, K = 48, 16, 32, 4, 2


def _stack(num_layers, backend="xla", dtype=jnp.float32, hidden=H, ffn=F, **placement):
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return jaxmoe.MoELayer(hidden, ffn, E, K, backend=backend, dtype=dtype,
                           param_dtype=dtype, rngs=rngs, **placement)
  return make(nnx.Rngs(0))


def _block(h, layer):
  y, aux = layer(h)
  return h + y.astype(h.dtype), aux["load_balancing_loss"]


def _stack_loss(stack, x, pipelined):
  """A nonlinear loss of the stack's output and its per-layer aux losses."""
  if pipelined:
    y, lb = layer_scan.scan_layers(_block, x, stack)
  else:
    y, lb = nnx.scan(_block, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, stack)
  return jnp.sum(jnp.sin(y.astype(jnp.float32))) + jnp.sum(lb * jnp.arange(1, lb.size + 1))


def _loss_and_grads(stack, x, pipelined):
  loss = lambda stack, x: _stack_loss(stack, x, pipelined)  # noqa: E731
  return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(stack, x)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("placement", [
    {},
    dict(offload_names=("fc1_input", "activation_input", "fc2_input")),
    jaxmoe.offload.OFFLOAD_UNPERMUTED,
])
def test_moe_stack_matches_nnx_scan_bitwise(num_layers, placement):
  stack = _stack(num_layers, **placement)
  x = jax.random.normal(jax.random.key(num_layers), (T, H))
  expected = jax.tree.leaves(_loss_and_grads(stack, x, pipelined=False))
  got = jax.tree.leaves(_loss_and_grads(stack, x, pipelined=True))
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_matches_float64_reference_with_integer_xs():
  """A tanh layer with a per-layer integer shift (not differentiated) against NumPy."""
  rng = np.random.default_rng(0)
  num_layers, n = 5, 6
  w = rng.standard_normal((num_layers, n, n)) / 3
  shifts = rng.integers(-2, 3, num_layers)
  x0 = rng.standard_normal((4, n))

  def layer(xs, c):
    return jnp.tanh(c @ xs["w"] + xs["shift"]), jnp.sum(c ** 2)

  def loss(w, x):
    c, outs = layer_scan.offload_scan(
        layer, x, {"w": w, "shift": jnp.asarray(shifts, jnp.int32)})
    return jnp.sum(c) + jnp.sum(outs)

  value, (dw, dx) = jax.value_and_grad(loss, argnums=(0, 1))(
      jnp.asarray(w, jnp.float32), jnp.asarray(x0, jnp.float32))
  # Float64 forward and reverse mode by hand.
  cs, total = [x0], 0.0
  for i in range(num_layers):
    total += np.sum(cs[-1] ** 2)
    cs.append(np.tanh(cs[-1] @ w[i] + shifts[i]))
  total += np.sum(cs[-1])
  d_c, d_w = np.ones_like(x0), np.zeros_like(w)
  for i in reversed(range(num_layers)):
    d_pre = d_c * (1 - cs[i + 1] ** 2)
    d_w[i] = cs[i].T @ d_pre
    d_c = d_pre @ w[i].T + 2 * cs[i]
  np.testing.assert_allclose(value, total, rtol=1e-5)
  np.testing.assert_allclose(dw, d_w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dx, d_c, rtol=1e-4, atol=1e-5)


def _masked_softmax_layer(xs, c):
  """A layer whose residuals include a value of no input (a causal mask made in the
  layer) and one its backward never reads (jax.vjp keeps jnp.where's masked input)."""
  n = c.shape[-1]
  causal = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
  logits = jnp.where(causal, c @ xs["w"], -1e9)
  return jnp.sin(jax.nn.softmax(logits) * causal), jnp.sum(c ** 2)


def _scan_loss(pipelined):
  def loss(w, x):
    if pipelined:
      c, outs = layer_scan.offload_scan(_masked_softmax_layer, x, {"w": w})
    else:
      c, outs = jax.lax.scan(lambda c, w: _masked_softmax_layer({"w": w}, c), x, w)
    return jnp.sum(jnp.cos(c)) + jnp.sum(outs)
  return loss


def _device_residual_bytes(fn, *args):
  """Bytes of the residuals that fn's backward keeps on device, arguments excluded
  (the pipelined scan's parameters appear as its residuals, but are no copies)."""
  return sum(aval.size * aval.dtype.itemsize for aval, origin in saved_residuals(fn, *args)
             if "<host>" not in str(aval) and not origin.startswith("from the argument"))


def test_keeps_no_more_residuals_than_lax_scan():
  """The mask is kept once (lax.scan hoists it), the masked logits not at all."""
  num_layers, n = 4, 16
  w = jax.random.normal(jax.random.key(1), (num_layers, n, n)) / 4
  x = jax.random.normal(jax.random.key(2), (n, n))
  plain = _device_residual_bytes(_scan_loss(pipelined=False), w, x)
  pipelined = _device_residual_bytes(_scan_loss(pipelined=True), w, x)
  # Before: the mask (bool) and the masked logits were stacked for every layer.
  assert pipelined <= plain, (pipelined, plain)
  np.testing.assert_allclose(
      jax.grad(_scan_loss(True), argnums=(0, 1))(w, x)[0],
      jax.grad(_scan_loss(False), argnums=(0, 1))(w, x)[0], rtol=1e-5, atol=1e-6)


def test_eager_gradient_matches_nnx_scan():
  """Differentiating without jit: layer 0 (outside the loop) must keep the residuals
  of the loop's layers in the same order (traced eagerly, it kept others, and the
  loop's carry types did not match)."""
  stack = _stack(3, offload_names=("fc1_input", "activation_input"))
  x = jax.random.normal(jax.random.key(5), (T, H))
  loss = lambda stack, x: _stack_loss(stack, x, pipelined=True)  # noqa: E731
  got = jax.tree.leaves(nnx.value_and_grad(loss, argnums=(0, 1))(stack, x))
  expected = jax.tree.leaves(_loss_and_grads(stack, x, pipelined=False))
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def _host_placements(offload_names, pipelined, num_layers=2, **kwargs):
  """Shapes of the pinned-host moves in the stack's gradient, lowered for an H100."""
  hidden, ffn = 128, 256  # Multiples of 64, for the kernels (of 128 for FP8).
  stack = _stack(num_layers, backend="mosaic_gpu", dtype=jnp.bfloat16, hidden=hidden,
                 ffn=ffn, offload_names=offload_names, **kwargs)
  graphdef, state = nnx.split(stack)
  x = jax.random.normal(jax.random.key(0), (256, hidden), jnp.bfloat16)

  def loss(state, x):
    return _stack_loss(nnx.merge(graphdef, state), x, pipelined)

  with as_if_on_h100():
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(state, x).lower(
        lowering_platforms=("cuda",)).as_text()
  shapes = [line.split("(tensor<")[1].split(">")[0].split("x")[:-1] for line in
            text.splitlines() if '_xla_buffer_placement = "pinned_host"' in line]
  return [int(np.prod([int(d) for d in shape])) for shape in shapes]


@pytest.mark.parametrize("offload_names", [(), ("fc1_input",),
                                           ("fc1_input", "activation_input")])
def test_cuda_lowering_moves_the_same_residuals_as_nnx_scan(offload_names):
  """nnx.scan moves each named residual; layer_scan one flat buffer with all of them."""
  per_name = _host_placements(offload_names, pipelined=False)
  packed = _host_placements(offload_names, pipelined=True)
  assert bool(packed) == bool(offload_names) == bool(per_name)
  assert len(packed) <= len(per_name)
  assert sum(packed) == sum(per_name)


def test_fp8_stack_matches_nnx_scan_bitwise_and_moves_the_fp8_residuals():
  """FP8 experts: fc1_input and fc2_input are e4m3 values (as uint8) plus float32
  scales; layer_scan packs them per dtype and moves what nnx.scan moves."""
  names = ("fc1_input", "fc2_input")
  stack = _stack(3, hidden=128, ffn=256, fp8=jaxmoe.BlockwiseRecipe(), offload_names=names)
  x = jax.random.normal(jax.random.key(3), (T, 128))
  expected = jax.tree.leaves(_loss_and_grads(stack, x, pipelined=False))
  got = jax.tree.leaves(_loss_and_grads(stack, x, pipelined=True))
  assert np.isfinite(np.asarray(got[0]))
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
  fp8 = dict(fp8=jaxmoe.BlockwiseRecipe())
  packed = _host_placements(names, pipelined=True, **fp8)
  assert packed and sum(packed) == sum(_host_placements(names, pipelined=False, **fp8))


def test_errors():
  layer = lambda w, c: (c @ w, jnp.sum(c))  # noqa: E731
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="leading layer axis"):
    layer_scan.offload_scan(layer, x, {"a": jnp.ones((2, 3, 3)), "b": jnp.ones((3, 3, 3))})
  with pytest.raises(ValueError, match="leading layer axis"):
    layer_scan.offload_scan(layer, x, {})
  with pytest.raises(ValueError, match="carry to be a float array"):
    layer_scan.offload_scan(layer, jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3, 3)))
  int_out = lambda w, c: (c @ w, jnp.argmax(c))  # noqa: E731
  with pytest.raises(ValueError, match="every out of layer_fn to be a float array"):
    jax.grad(lambda w: jnp.sum(layer_scan.offload_scan(int_out, x, w)[0]))(jnp.ones((2, 3, 3)))


@pytest.mark.gpu
def test_gpu_stack_matches_nnx_scan_and_offloads():
  """4 layers on the Mosaic GPU kernels, default offload: the gradients of nnx.scan, and
  the compiled step keeps the residuals in pinned host buffers."""
  from jaxmoe import hlo_report
  stack = _stack(4, backend="auto", dtype=jnp.bfloat16, hidden=1024, ffn=2048)
  x = jax.random.normal(jax.random.key(0), (4096, 1024), jnp.bfloat16)
  expected = jax.tree_util.tree_leaves_with_path(_loss_and_grads(stack, x, pipelined=False))
  got = jax.tree.leaves(_loss_and_grads(stack, x, pipelined=True))
  # Not bitwise: XLA's scatter-adds (the gather's transpose) use atomics on a GPU, so
  # two runs of one program differ in the last bits too. (On an H100 the worst leaf
  # read 0.9-1.2e-3 over four inputs.)
  for (path, e), g in zip(expected, got):
    g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), f"{name}: {np.sum(~np.isfinite(g))} non-finite values"
    rel = np.linalg.norm(g - e) / np.linalg.norm(e)
    assert rel <= 1e-2, f"{name}: relative difference {rel:.2e} to nnx.scan's"
  graphdef, state = nnx.split(stack)

  def loss(state):
    return _stack_loss(nnx.merge(graphdef, state), x, pipelined=True)

  summary = hlo_report.offload_summary(jax.jit(jax.grad(loss)).lower(state).compile().as_text())
  # One flat buffer a layer, to host and back.
  assert summary["host_dynamic_update_slice"] >= 1, summary
  assert summary["host_dynamic_slice"] >= 1, summary
