"""On the H100: the expert MLP and MoE layer on the Mosaic GPU kernels at full size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from benchmarks import grouped_mlp as grouped_mlp_benchmark
import numpy_reference as ref
from pallas_kernels import config as config_lib
from pallas_kernels import tuning_cache

pytestmark = pytest.mark.gpu


def _inputs(m, h, f, g, seed=0):
  rng = np.random.default_rng(seed)
  gs = ref.random_group_sizes(rng, m - 136, g, num_empty=2)  # 136 padding rows
  x, w1, w2, p, dy = grouped_mlp_benchmark.inputs(m, h, f, g, key=seed)
  return x, w1, w2, jnp.asarray(gs), p, dy


def _value_and_grads(backend, fused, x, w1, w2, gs, p, dy, dtype=None):
  cast = (lambda a: a.astype(dtype)) if dtype else (lambda a: a)

  def f(x, w1, w2, p):
    return jaxmoe.grouped_mlp(cast(x), cast(w1), cast(w2), gs, p, backend=backend,
                              fused=fused)

  @jax.jit
  def run(x, w1, w2, p, dy):
    y, pull = jax.vjp(f, x, w1, w2, p)
    return (y, *pull(cast(dy)))
  with jax.default_matmul_precision("highest"):
    return run(x, w1, w2, p, dy)


def _assert_kernel_mlp_matches_f32_reference(fused, x, w1, w2, gs, p, dy):
  """y and every gradient of the kernel MLP within 2e-2 of float32 XLA; y zero past the groups."""
  got = _value_and_grads("mosaic_gpu", fused, x, w1, w2, gs, p, dy)
  want = _value_and_grads("xla", False, x, w1, w2, gs, p, dy, dtype=jnp.float32)
  for name, a, b in zip(("y", "dx", "dw1", "dw2", "dp"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), name
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert err < 2e-2, (name, err)
  valid = int(gs.sum())
  assert not np.any(np.asarray(got[0][valid:], np.float32)), "padding rows of y"


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("m, h, f, g", [(8192, 1024, 2048, 16), (8192, 1024, 1024, 64)])
def test_kernel_mlp_matches_f32_reference(m, h, f, g, fused):
  _assert_kernel_mlp_matches_f32_reference(fused, *_inputs(m, h, f, g))


@pytest.mark.parametrize("fused", [True, False])
def test_kernel_mlp_one_program_per_item(fused, monkeypatch):
  """All four gmm calls (FC1 with the fused activation, FC2, their input gradients) with
  one program per work item, as the tuned G=256 forward runs, against float32 XLA."""
  m, h, f, g = 8192, 1024, 1024, 64  # every gmm call of the MLP
  per_item = dataclasses.asdict(config_lib.GmmConfig(**config_lib._WS, grid_block_n=8,
                                                     persistent=False))
  monkeypatch.setattr(tuning_cache, "lookup",
                      lambda op, *a, **kw: None if op == "tgmm" else per_item)
  assert not config_lib.gmm_config(m, h, f, g, transpose_rhs=True).persistent
  _assert_kernel_mlp_matches_f32_reference(fused, *_inputs(m, h, f, g, seed=2))


@pytest.mark.parametrize("fused", [True, False])
def test_offload_is_bitwise_equal_on_gpu(fused):
  x, w1, w2, gs, p, dy = _inputs(8192, 1024, 2048, 16, seed=1)

  def loss(x, w1, w2, p):
    y = jaxmoe.grouped_mlp(x, w1, w2, gs, p, backend="mosaic_gpu", fused=fused)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * dy.astype(jnp.float32))

  grads = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, w1, w2, p)  # noqa: E731
  plain = grads(loss)
  for names in (("fc1_input", "activation_input"), jaxmoe.RESIDUAL_NAMES):
    offloaded = grads(jax.checkpoint(loss, policy=jaxmoe.offload_policy(names)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(offloaded)):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_moe_layer_kernels_match_xla_backend():
  x = jax.random.normal(jax.random.key(3), (4, 1024, 1024), jnp.bfloat16)
  outs = {}
  for backend in ("mosaic_gpu", "xla"):
    layer = jaxmoe.MoELayer(1024, 2048, 16, 2, backend=backend, rngs=nnx.Rngs(0))
    y, aux = nnx.jit(lambda layer, x: layer(x))(layer, x)
    outs[backend] = (np.asarray(y, np.float32), np.asarray(aux["tokens_per_expert"]))
  np.testing.assert_array_equal(outs["mosaic_gpu"][1], outs["xla"][1])
  err = (np.linalg.norm(outs["mosaic_gpu"][0] - outs["xla"][0])
         / np.linalg.norm(outs["xla"][0]))
  assert err < 2e-2, err
