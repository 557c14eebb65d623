"""Expert parallelism: MoELayer on 8-device meshes equals the single-device layer.

The mesh tests need 8 devices. XLA fixes the CPU device count when jax starts, and
other test modules start it first in the same pytest process, so
`test_on_eight_host_devices` reruns this file in a subprocess with
`--xla_force_host_platform_device_count=8`; there the mesh tests run and the
launcher skips itself. On a machine with 8 or more devices they run directly.

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
from benchmarks import expert_parallel as expert_parallel_benchmark
from cuda_lowering import H100
from moe_training import regression_step
from jaxmoe import expert_parallel
from jaxmoe import offload

H, F, E, K = 16, 32, 8, 2
DEVICES = 8
TOKENS = 64  # 8 per device.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT_S = 600
AUTO, EXPLICIT = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit

needs_mesh = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason=f"needs {DEVICES} devices; runs in test_on_eight_host_devices' subprocess")


@pytest.mark.slow
def test_on_eight_host_devices():
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
  assert passed and int(passed.group(1)) >= 14, result.stdout[-3000:]


def _mesh(kind: str, axis_type=AUTO):
  """"8" (expert=8, no data axis), "2x4" (data=2 x expert=4) or "4x2" -> (mesh,
  data_axis)."""
  if "x" not in kind:
    size = int(kind)
    return jax.make_mesh((size,), ("expert",), axis_types=(axis_type,),
                         devices=jax.devices()[:size]), None
  shape = tuple(int(n) for n in kind.split("x"))
  return jax.make_mesh(shape, ("data", "expert"), axis_types=(axis_type,) * 2), "data"


def _split_over_experts(array) -> bool:
  spec = tuple(array.sharding.spec) + (None,) * array.ndim
  return spec[0] == "expert" and all(s is None for s in spec[1:array.ndim])


def _set(var, value):
  """Writes `value` into a Param, keeping the Param's placement."""
  var.set_value(jax.device_put(jnp.asarray(value), var.get_value().sharding))


# Router logits get pref[e] from a constant input feature 0, on top of the learnt part:
# "skewed": experts 4..7 get nothing (devices owning them receive no rows);
# "one_expert": every token picks expert 0, the buffers' worst case (the overflow
# path runs); "balanced": features 1..8 carry a one-hot pair (token i picks experts
# i and i+1 mod 8), so every device sends every peer the same number of rows.
PREFERENCES = {
    "skewed": [2.0, 2.0, 1.0, 0.0, -30.0, -30.0, -30.0, -30.0],
    "one_expert": [30.0] + [0.0] * 7,
    "balanced": [0.0] * 8,
}


def _layers(mesh, data_axis, routing, *, use_bias=True, **ep_kwargs):
  """The same parameters in a single-device layer and an expert-parallel one."""
  ep_kwargs = dict(dict(collective="padded", backend="xla"), **ep_kwargs)
  ref = jaxmoe.MoELayer(H, F, E, K, use_bias=use_bias, dtype=jnp.float32,
                        backend="xla", rngs=nnx.Rngs(3))
  ep = jaxmoe.MoELayer(H, F, E, K, use_bias=use_bias, dtype=jnp.float32,
                       mesh=mesh, data_axis=data_axis, rngs=nnx.Rngs(3), **ep_kwargs)
  keys = jax.random.split(jax.random.key(7), 2)
  router = np.array(ref.router_kernel[...]) * 10
  router[0] = PREFERENCES[routing]
  if routing == "balanced":
    router[1:1 + E] += 60.0 * np.eye(E)
  for layer in (ref, ep):
    _set(layer.router_kernel, router)
    if use_bias:
      _set(layer.experts.b1, 0.1 * jax.random.normal(keys[0], (E, F)))
      _set(layer.experts.b2, 0.1 * jax.random.normal(keys[1], (E, H)))
  return ref, ep


def _inputs(routing):
  x = jax.random.normal(jax.random.key(1), (8, TOKENS // 8, H))
  x = x.at[..., 0].set(1.0)  # The constant feature that carries PREFERENCES.
  if routing == "balanced":
    i = np.arange(TOKENS)
    pair = np.zeros((TOKENS, E), np.float32)
    pair[i, i % E] = pair[i, (i + 1) % E] = 1.0
    x = x.at[..., 1:1 + E].set(pair.reshape(8, -1, E))
  return x


def _kept_rows(ref, x, mesh, data_axis, capacity_factor, chunks=1):
  """The (token, slot) rows that fit their pair's capacity C: bool [T, K], in numpy
  from the single-device layer's routing and the layout of expert_parallel."""
  tokens = np.asarray(x).reshape(-1, H)
  logits = tokens @ np.asarray(ref.router_kernel[...])
  ids = np.argsort(-logits, axis=1, kind="stable")[:, :K]
  num_peers = mesh.shape["expert"]
  shards = num_peers * (mesh.shape[data_axis] if data_axis else 1) * chunks
  t = tokens.shape[0] // shards
  capacity = expert_parallel.pair_capacity(t * K, num_peers, capacity_factor)
  kept = np.zeros(ids.size, bool)
  for shard in range(shards):
    flat = ids[shard * t:(shard + 1) * t].reshape(-1)
    order = np.argsort(flat, kind="stable")
    owner = flat[order] // (E // num_peers)
    position = np.zeros_like(owner)
    for o in np.unique(owner):
      position[owner == o] = np.arange(np.sum(owner == o))
    kept[shard * t * K + order] = position < capacity
  return kept.reshape(-1, K)


@nnx.jit
def _forward_and_grads(layer, x):
  def loss(layer, x):
    y, aux = layer(x)
    value = jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"]
    return value, (y, aux)
  (_, (y, aux)), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      layer, x)
  return y, aux, grads


def _assert_same(ref, ep, x, mesh=None):
  y0, aux0, (g0, dx0) = _forward_and_grads(ref, x)
  if mesh is not None and data_axis_is_explicit(mesh):
    with jax.set_mesh(mesh):
      y1, aux1, (g1, dx1) = _forward_and_grads(ep, x)
  else:
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
  return aux0, aux1, g1


def data_axis_is_explicit(mesh) -> bool:
  return any(t == EXPLICIT for t in mesh.axis_types)


@needs_mesh
@pytest.mark.parametrize("mesh_kind,axis_type,collective,routing", [
    ("8", AUTO, "padded", "balanced"),
    ("8", AUTO, "padded", "one_expert"),
    ("2x4", EXPLICIT, "padded", "skewed"),
    ("4x2", AUTO, "padded", "one_expert"),
    ("2x4", AUTO, "ragged", "one_expert"),
    ("4x2", EXPLICIT, "ragged", "balanced"),
])
def test_matches_single_device(mesh_kind, axis_type, collective, routing, monkeypatch):
  """Outputs, gradients and aux; "overflow_rows" counts the rows past C exactly."""
  if collective == "ragged" and jax.devices()[0].platform == "cpu":
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all",
                        expert_parallel.ragged_all_to_all_reference)
  mesh, data_axis = _mesh(mesh_kind, axis_type)
  ref, ep = _layers(mesh, data_axis, routing, collective=collective)
  x = _inputs(routing)
  aux, aux_ep, grads = _assert_same(ref, ep, x, mesh)
  kept = _kept_rows(ref, x, mesh, data_axis, expert_parallel.DEFAULT_CAPACITY_FACTOR)
  assert int(aux_ep["overflow_rows"]) == np.sum(~kept)
  assert int(aux_ep["dropped_rows"]) == 0
  counts = np.asarray(aux["tokens_per_expert"])
  if routing == "balanced":
    assert np.all(counts == TOKENS * K // E) and int(aux_ep["overflow_rows"]) == 0
  if routing == "skewed":
    assert np.all(counts[4:] == 0) and np.all(counts[:2] > 0), counts
  if routing == "one_expert":
    assert counts[0] == TOKENS and int(aux_ep["overflow_rows"]) > 0, counts
  assert _split_over_experts(grads.experts.w1[...])


@needs_mesh
@pytest.mark.parametrize("capacity_factor", [0.5, 100.0])
def test_capacity_factor_changes_rounds_not_results(capacity_factor):
  """Far below 1 (many overflow rounds) and past X (one round: the worst-case
  buffers) on 2x4, skewed routing."""
  mesh, data_axis = _mesh("2x4")
  ref, ep = _layers(mesh, data_axis, "skewed", capacity_factor=capacity_factor)
  x = _inputs("skewed")
  _, aux_ep, _ = _assert_same(ref, ep, x)
  kept = _kept_rows(ref, x, mesh, data_axis, capacity_factor)
  assert int(aux_ep["overflow_rows"]) == np.sum(~kept)
  assert (np.sum(~kept) > 0) == (capacity_factor < 1)


@needs_mesh
def test_chunks_match_single_device():
  """chunks=2 on 4x2, one_expert routing: each chunk its own rounds and count."""
  mesh, data_axis = _mesh("4x2")
  ref, ep = _layers(mesh, data_axis, "one_expert", chunks=2)
  x = _inputs("one_expert")
  _, aux_ep, _ = _assert_same(ref, ep, x)
  kept = _kept_rows(ref, x, mesh, data_axis, expert_parallel.DEFAULT_CAPACITY_FACTOR,
                    chunks=2)
  assert int(aux_ep["overflow_rows"]) == np.sum(~kept) > 0


@needs_mesh
def test_drop_overflow_drops_and_counts_the_rows_past_capacity():
  """Switch-style: a dropped row contributes nothing; tokens with no dropped row
  equal the single-device layer's."""
  mesh, data_axis = _mesh("8")
  ref, ep = _layers(mesh, data_axis, "one_expert", drop_overflow=True)
  x = _inputs("one_expert")
  y0, _ = ref(x)
  y1, aux = nnx.jit(lambda layer, x: layer(x))(ep, x)
  kept = _kept_rows(ref, x, mesh, data_axis, expert_parallel.DEFAULT_CAPACITY_FACTOR)
  assert int(aux["dropped_rows"]) == np.sum(~kept) > 0
  assert int(aux["overflow_rows"]) == 0
  whole = kept.all(axis=1)
  assert 0 < whole.sum() < whole.size
  y0, y1 = np.asarray(y0).reshape(-1, H), np.asarray(y1).reshape(-1, H)
  np.testing.assert_allclose(y1[whole], y0[whole], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y1[~whole], y0[~whole], atol=1e-3)


def _weak_scaling_step(num_peers: int | None, capacity_factor: float, dtype):
  """(loss, abstract state, abstract x) of a training step at 64 tokens and 2
  experts per device on expert=num_peers (None: one device, no mesh), all
  residuals on device; loss = sum(y**2) in float32."""
  ep, devices = {}, num_peers or 1
  if num_peers is not None:
    ep = dict(mesh=_mesh(str(num_peers))[0], data_axis=None, collective="padded",
              capacity_factor=capacity_factor)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: jaxmoe.MoELayer(
      32, 256, 2 * devices, K, dtype=dtype, backend="xla", offload_names=(),
      rngs=nnx.Rngs(0), **ep)))
  sharding = jax.sharding.NamedSharding(ep["mesh"], P("expert")) if ep else None
  x = jax.ShapeDtypeStruct((64 * devices, 32), dtype, sharding=sharding)
  loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x)[0].astype(jnp.float32) ** 2)
  return loss, state, x


def _step_temp_bytes(num_peers: int, capacity_factor: float) -> int:
  """XLA's temporaries per device of the compiled float32 step (_weak_scaling_step)."""
  loss, state, x = _weak_scaling_step(num_peers, capacity_factor, jnp.float32)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@needs_mesh
def test_step_memory_grows_with_capacity_factor_not_with_devices():
  """Per-device temporaries at X=2 and X=8 equal within 1.3x at the default capacity
  factor, grow with the factor, and the worst-case buffers (capacity_factor=X,
  one round of X*R rows) are far larger at X=8."""
  default = expert_parallel.DEFAULT_CAPACITY_FACTOR
  two, eight = _step_temp_bytes(2, default), _step_temp_bytes(8, default)
  assert eight <= 1.3 * two, (two, eight)
  assert _step_temp_bytes(8, 2 * default) > 1.3 * eight
  assert _step_temp_bytes(8, 8.0) > 2.5 * eight


def _saved_activation_bytes(num_peers: int | None, capacity_factor: float = 1.25) -> int:
  """The activations per device that the bf16 step's forward (_weak_scaling_step)
  keeps for its backward."""
  loss, state, x = _weak_scaling_step(num_peers, capacity_factor, jnp.bfloat16)
  return expert_parallel_benchmark.saved_activation_bytes(loss, num_peers or 1, state, x)


@needs_mesh
def test_saved_activations_per_device_stay_near_one_devices():
  """At the default capacity factor the forward keeps <= 1.3x one device's
  activations per device at X=2 and X=8 (the overflow rounds are rematerialised);
  the worst-case sizing (capacity_factor=X) keeps about X times as many."""
  one = _saved_activation_bytes(None)
  for peers in (2, 8):
    assert one < _saved_activation_bytes(peers) <= 1.3 * one, peers
  assert _saved_activation_bytes(8, 8.0) > 4 * one


@needs_mesh
@pytest.mark.parametrize("placement,bitwise", [
    (dict(), True),  # The default: fc1_input and activation_input offloaded.
    (offload.OFFLOAD_UNPERMUTED, True),
    # Recomputing h and a changes XLA:CPU's fusions: equal up to rounding.
    (dict(offload_names=(), recompute_names=offload.RESIDUAL_NAMES), False),
])
def test_residual_placement_under_a_mesh_changes_no_result(placement, bitwise):
  """2x4 mesh, one_expert routing (overflow rounds run): outputs and gradients are
  those of all on device, "moe_input" offloaded included."""
  mesh, data_axis = _mesh("2x4")
  results = []
  for kwargs in (dict(offload_names=()), placement):
    _, ep = _layers(mesh, data_axis, "one_expert", **kwargs)
    results.append(_forward_and_grads(ep, _inputs("one_expert")))
  for a, b in zip(*(jax.tree_util.tree_leaves(r) for r in results)):
    if bitwise:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)


@needs_mesh
@pytest.mark.parametrize("offload_names", [(), ("moe_input",)])
def test_moe_input_offloads_under_a_mesh(offload_names):
  """fc1_input recomputed from "moe_input" (gather and exchange redone in backward):
  offloading it shows as pinned host memory in the CUDA lowering, none without."""
  mesh, data_axis = _mesh("2x4")
  layer = jaxmoe.MoELayer(H, F, E, K, backend="xla", mesh=mesh, data_axis=data_axis,
                          offload_names=offload_names, recompute_names=("fc1_input",),
                          rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x)[0].astype(jnp.float32) ** 2)

  text = jax.jit(jax.grad(loss)).trace(state, jnp.ones((TOKENS, H), jnp.bfloat16)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert ("pinned_host" in text) == bool(offload_names)


@needs_mesh
def test_explicit_axis_mesh_without_bias():
  """jax.make_mesh's default axis type (Explicit), no biases, under jax.set_mesh;
  a batch of 2 (fewer than the devices) comes back in its own layout."""
  mesh, data_axis = _mesh("2x4", EXPLICIT)
  ref, ep = _layers(mesh, data_axis, "skewed", use_bias=False)
  x = _inputs("skewed").reshape(2, TOKENS // 2, H)
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
  mesh, data_axis = _mesh("4x2")
  ref, ep = _layers(mesh, data_axis, "skewed", use_bias=False)
  x = _inputs("skewed")
  target = jnp.tanh(x[..., ::-1])

  step = regression_step(x, target)

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
  mesh, _ = _mesh("2x4")
  make = lambda **kw: jaxmoe.MoELayer(H, F, kw.pop("e", E), K, rngs=nnx.Rngs(0), **kw)
  with pytest.raises(ValueError, match="axis 'experts'"):
    make(mesh=mesh, expert_axis="experts")
  with pytest.raises(ValueError, match="data_axis=None"):
    make(mesh=_mesh("8")[0])  # data_axis defaults to "data".
  with pytest.raises(ValueError, match="divisible by the size of the expert axis"):
    make(mesh=_mesh("8")[0], data_axis=None, e=6)
  with pytest.raises(ValueError, match="collective"):
    make(mesh=mesh, collective="nccl")
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    make(mesh=mesh)(jnp.ones((10, H)))
  for bad in (0, -1.0, float("nan"), float("inf"), "2", True):
    with pytest.raises(ValueError, match="'capacity_factor'"):
      make(mesh=mesh, capacity_factor=bad)
  with pytest.raises(ValueError, match="'drop_overflow'"):
    make(mesh=mesh, drop_overflow="yes")
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="'chunks'"):
      make(mesh=mesh, chunks=bad)
  with pytest.raises(ValueError, match="divisible by chunks=3"):
    make(mesh=mesh, chunks=3)(jnp.ones((16, H)))
  with pytest.raises(ValueError, match="'capacity_factor', 'drop_overflow' and 'chunks' need"):
    make(capacity_factor=2.0)


@needs_mesh
def test_ragged_collective_lowers_for_cuda_with_offload():
  """The GPU path: ragged-all-to-all both ways (and transposed in the backward), and
  the default residuals still go to pinned host memory."""
  mesh, data_axis = _mesh("2x4")
  layer = jaxmoe.MoELayer(H, F, E, K, backend="xla", mesh=mesh, data_axis=data_axis,
                          collective="ragged", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux["load_balancing_loss"]

  x = jnp.ones((8, 8, H), jnp.bfloat16)
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

  def loss(router, w1, w2, x):
    weights = dict(w1=w1.astype(jnp.bfloat16), w2=w2.astype(jnp.bfloat16),
                   b1=None, b2=None)
    y, aux = expert_parallel.moe_forward(config, x, router, weights,
                                         layer.experts.pure_fn(),
                                         checkpoint=layer.experts.checkpointed)
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
