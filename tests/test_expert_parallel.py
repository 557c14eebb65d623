"""Expert parallelism: MoELayer on a 4-device mesh equals the single-device layer.

The mesh tests need 4 devices. XLA fixes the CPU device count when jax starts, and
other test modules start it first in the same pytest process, so
`test_on_four_host_devices` reruns this file in a subprocess with
`--xla_force_host_platform_device_count=4`; there the mesh tests run and the
launcher skips itself. On a machine with 4 or more devices they run directly.

XLA:CPU has no ragged-all-to-all, so on CPU the "ragged" path runs with
`expert_parallel.ragged_all_to_all_reference` (the same offsets, moved by
all_gather), and a last test lowers the real collective for CUDA.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxmoe
from cuda_lowering import H100
from jaxmoe import expert_parallel

H, F, E, K = 16, 32, 8, 2
DEVICES = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT_S = 600

needs_mesh = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason=f"needs {DEVICES} devices; runs in test_on_four_host_devices' subprocess")


@pytest.mark.slow
def test_on_four_host_devices():
  if jax.device_count() >= DEVICES:
    pytest.skip("this process has the devices: the mesh tests ran here")
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAXMOE_EP_CHILD="1",
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES}",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run(
      [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q",
       "-p", "no:cacheprovider"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
  passed = re.search(r"(\d+) passed", result.stdout)
  assert passed and int(passed.group(1)) >= 10, result.stdout[-3000:]


def _mesh(kind: str, axis_type=jax.sharding.AxisType.Auto):
  """("expert=4", data_axis=None) or ("data=2 x expert=2", data_axis="data")."""
  if kind == "expert4":
    return jax.make_mesh((4,), ("expert",), axis_types=(axis_type,)), None
  return jax.make_mesh((2, 2), ("data", "expert"), axis_types=(axis_type,) * 2), "data"


def _split_over_experts(array) -> bool:
  spec = tuple(array.sharding.spec) + (None,) * array.ndim
  return spec[0] == "expert" and all(s is None for s in spec[1:array.ndim])


def _set(var, value):
  """Writes `value` into a Param, keeping the Param's placement."""
  var.set_value(jax.device_put(jnp.asarray(value), var.get_value().sharding))


# Router logits get pref[e] from a constant input feature, on top of the learnt part:
# "skewed": experts 4..7 get nothing (on expert=4, devices 2 and 3 receive no rows);
# "one_device": every token picks experts 0 and 1, all rows go to expert device 0 (the
# buffers' worst case); "random": the router as initialised, times 10.
PREFERENCES = {
    "skewed": [2.0, 2.0, 1.0, 0.0, -30.0, -30.0, -30.0, -30.0],
    "one_device": [30.0, 30.0] + [-30.0] * 6,
    "random": [0.0] * 8,
}


def _layers(mesh, data_axis, routing, *, collective="padded", use_bias=True):
  """The same parameters in a single-device layer and an expert-parallel one."""
  ref = jaxmoe.MoELayer(H, F, E, K, use_bias=use_bias, dtype=jnp.float32,
                        rngs=nnx.Rngs(3))
  ep = jaxmoe.MoELayer(H, F, E, K, use_bias=use_bias, dtype=jnp.float32,
                       mesh=mesh, data_axis=data_axis, collective=collective,
                       rngs=nnx.Rngs(3))
  keys = jax.random.split(jax.random.key(7), 2)
  router = np.array(ref.router_kernel[...]) * 10
  router[0] = PREFERENCES[routing]
  for layer in (ref, ep):
    _set(layer.router_kernel, router)
    if use_bias:
      _set(layer.experts.b1, 0.1 * jax.random.normal(keys[0], (E, F)))
      _set(layer.experts.b2, 0.1 * jax.random.normal(keys[1], (E, H)))
  return ref, ep


def _inputs():
  x = jax.random.normal(jax.random.key(1), (4, 6, H))  # 24 tokens, 6 per device
  return x.at[..., 0].set(1.0)  # The constant feature that carries PREFERENCES.


@nnx.jit
def _forward_and_grads(layer, x):
  def loss(layer, x):
    y, aux = layer(x)
    value = jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"]
    return value, (y, aux)
  (_, (y, aux)), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      layer, x)
  return y, aux, grads


def _assert_same(ref, ep, x):
  y0, aux0, (g0, dx0) = _forward_and_grads(ref, x)
  y1, aux1, (g1, dx1) = _forward_and_grads(ep, x)
  close = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), **close)
  np.testing.assert_array_equal(aux1["tokens_per_expert"], aux0["tokens_per_expert"])
  for name in ("load_balancing_loss", "router_z_loss"):
    np.testing.assert_allclose(aux1[name], aux0[name], rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx0), **close)
  params0 = nnx.state(g0, nnx.Param)
  params1 = nnx.state(g1, nnx.Param)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params0),
                               jax.tree_util.tree_leaves_with_path(params1)):
    assert np.any(np.asarray(a) != 0), path
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  return aux0, g1


@needs_mesh
@pytest.mark.parametrize("mesh_kind,routing", [
    ("expert4", "skewed"), ("expert4", "one_device"),
    ("data2_expert2", "skewed"), ("data2_expert2", "random")])
def test_padded_all_to_all_matches_single_device(mesh_kind, routing):
  mesh, data_axis = _mesh(mesh_kind)
  ref, ep = _layers(mesh, data_axis, routing, collective="padded")
  aux, grads = _assert_same(ref, ep, _inputs())
  counts = np.asarray(aux["tokens_per_expert"])
  if routing == "skewed":
    assert np.all(counts[4:] == 0) and np.all(counts[:2] > 0), counts
  if routing == "one_device":
    assert counts[0] == counts[1] == 24 and counts[2:].sum() == 0, counts
  assert _split_over_experts(grads.experts.w1[...])


@needs_mesh
@pytest.mark.parametrize("mesh_kind,routing", [
    ("expert4", "skewed"), ("data2_expert2", "one_device")])
def test_ragged_path_matches_single_device(mesh_kind, routing, monkeypatch):
  if jax.devices()[0].platform == "cpu":
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all",
                        expert_parallel.ragged_all_to_all_reference)
  mesh, data_axis = _mesh(mesh_kind)
  ref, ep = _layers(mesh, data_axis, routing, collective="ragged")
  _assert_same(ref, ep, _inputs())


@needs_mesh
def test_explicit_axis_mesh_without_bias():
  """jax.make_mesh's default axis type (Explicit), no biases, under jax.set_mesh;
  a batch of 2 (fewer than the devices) comes back in its own layout."""
  mesh, data_axis = _mesh("data2_expert2", jax.sharding.AxisType.Explicit)
  ref, ep = _layers(mesh, data_axis, "skewed", use_bias=False)
  x = _inputs().reshape(2, 12, H)
  y0, aux0, _ = _forward_and_grads(ref, x)
  with jax.set_mesh(mesh):
    y1, aux1, _ = _forward_and_grads(ep, x)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux1["load_balancing_loss"], aux0["load_balancing_loss"],
                             rtol=1e-6)


@needs_mesh
def test_optax_steps_on_the_sharded_layer():
  """nnx.jit + nnx.Optimizer: same losses and parameters as one device, and the
  expert weights and their Adam moments stay split over the expert axis."""
  mesh, data_axis = _mesh("data2_expert2")
  ref, ep = _layers(mesh, data_axis, "random", use_bias=False)
  x = _inputs()
  target = jnp.tanh(x[..., ::-1])

  @nnx.jit
  def step(layer, optimizer):
    def loss(layer):
      y, aux = layer(x)
      return jnp.mean((y - target) ** 2) + 0.01 * aux["load_balancing_loss"]
    value, grads = nnx.value_and_grad(loss)(layer)
    optimizer.update(layer, grads)
    return value

  losses = {}
  for name, layer in (("ref", ref), ("ep", ep)):
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    losses[name] = [float(step(layer, optimizer)) for _ in range(3)]
  np.testing.assert_allclose(losses["ep"], losses["ref"], rtol=1e-5)
  assert losses["ep"][-1] < losses["ep"][0]
  np.testing.assert_allclose(np.asarray(ep.experts.w1[...]),
                             np.asarray(ref.experts.w1[...]), rtol=1e-4, atol=1e-6)
  assert _split_over_experts(ep.experts.w1[...])
  spec = nnx.get_partition_spec(nnx.state(ep))["experts"]["w1"].get_value()
  assert tuple(spec) == ("expert", None, None)
  moments = nnx.state(optimizer, nnx.optimizer.OptState)["opt_state"][0]
  assert _split_over_experts(moments.mu["experts"]["w2"].get_value())


@needs_mesh
def test_bad_mesh_and_inputs_raise_value_error():
  mesh, _ = _mesh("data2_expert2")
  make = lambda **kw: jaxmoe.MoELayer(H, F, kw.pop("e", E), K, rngs=nnx.Rngs(0), **kw)
  with pytest.raises(ValueError, match="axis 'experts'"):
    make(mesh=mesh, expert_axis="experts")
  with pytest.raises(ValueError, match="data_axis=None"):
    make(mesh=_mesh("expert4")[0])  # data_axis defaults to "data".
  with pytest.raises(ValueError, match="divisible by the size of the expert axis"):
    make(mesh=_mesh("expert4")[0], data_axis=None, e=6)
  with pytest.raises(ValueError, match="collective"):
    make(mesh=mesh, collective="nccl")
  with pytest.raises(ValueError, match="divisible by the 4 devices"):
    make(mesh=mesh)(jnp.ones((10, H)))
  with pytest.raises(ValueError, match="'moe_input' is not supported with a mesh"):
    make(mesh=mesh, offload_names=("moe_input",))


@needs_mesh
def test_ragged_collective_lowers_for_cuda_with_offload():
  """The GPU path: ragged-all-to-all both ways (and transposed in the backward), and
  the default residuals still go to pinned host memory."""
  mesh, data_axis = _mesh("data2_expert2")
  layer = jaxmoe.MoELayer(H, F, E, K, backend="xla", mesh=mesh, data_axis=data_axis,
                          collective="ragged", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux["load_balancing_loss"]

  x = jnp.ones((4, 6, H), jnp.bfloat16)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(state, x).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("ragged_all_to_all") >= 6  # x, scales, y; and their transposes.
  assert "pinned_host" in text


@pytest.mark.skipif(os.environ.get("JAXMOE_EP_CHILD") == "1",
                    reason="needs no devices: runs in the parent process")
def test_gpu_path_lowers_for_h100_with_mosaic_kernels():
  """ragged_all_to_all + the Mosaic GPU kernels + offload, on an abstract 2 x 2 H100
  mesh: the kernels' outputs must carry their inputs' varying mesh axes, or the
  custom_vjp type check fails (pallas_kernels.ops._vary_like_inputs)."""
  mesh = jax.sharding.AbstractMesh((2, 2), ("data", "expert"), abstract_device=H100)
  hidden, ffn, tokens = 256, 512, 512
  layer = jaxmoe.MoELayer(hidden, ffn, E, K, backend="mosaic_gpu", rngs=nnx.Rngs(0))
  config = expert_parallel.Config(mesh, "expert", "data", E, K, "softmax",
                                  jnp.bfloat16, "ragged")
  mlp = layer.experts.checkpointed(layer.experts.pure_fn())

  def loss(router, w1, w2, x):
    weights = dict(w1=w1.astype(jnp.bfloat16), w2=w2.astype(jnp.bfloat16),
                   b1=None, b2=None)
    y, aux = expert_parallel.moe_forward(config, x, router, weights, mlp)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux["load_balancing_loss"]

  def spec(shape, dtype, *axes):
    sharding = jax.sharding.NamedSharding(mesh, P(*axes))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  args = (spec((hidden, E), jnp.float32), spec((E, hidden, ffn), jnp.float32, "expert"),
          spec((E, ffn, hidden), jnp.float32, "expert"),
          spec((tokens, hidden), jnp.bfloat16, ("data", "expert")))
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("ragged_all_to_all") >= 6
  assert "mosaic_gpu" in text and "pinned_host" in text
