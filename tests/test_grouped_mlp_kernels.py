"""grouped_mlp on the Mosaic GPU kernels (in the interpreter), fused and unfused:
forward and every gradient against float64 NumPy, residual placement with the real
kernels, and the whole gradient lowered for an H100 (bitwise equality with offload
runs on the GPU: tests/test_gpu_mlp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import jaxmoe
import numpy_reference as ref
from cuda_lowering import as_if_on_h100, lower_for_h100
from test_grouped_mlp import check_against_reference, make_inputs

M, H, F = 200, 128, 256  # M: a multiple of 8 but not of the 64/128-row tiles


@pytest.mark.parametrize("fused, use_bias, group_sizes", [
    (True, False, [90, 0, 70, 0]),   # empty groups, 40 padding rows
    (True, False, [0, 200, 0, 0]),   # all rows in one group
    (False, False, [13, 0, 120, 60]),
    (True, True, [64, 64, 0, 60]),   # b1: the unfused kernels; b2 on top
])
def test_kernel_mlp_matches_reference(fused, use_bias, group_sizes):
  rng = np.random.default_rng(sum(group_sizes) + 7 * fused + use_bias)
  inputs = make_inputs(rng, np.array(group_sizes, np.int32), M, H, F, jnp.bfloat16,
                       use_bias)
  check_against_reference(inputs, jnp.bfloat16, "interpret", rng, fused=fused)


def _loss(backend, fused, x, w1, w2, p, gs):
  y = jaxmoe.grouped_mlp(x, w1, w2, gs, p, backend=backend, fused=fused)
  return jnp.sum(jnp.sin(y.astype(jnp.float32)))


def _small_inputs():
  rng = np.random.default_rng(0)
  inputs = make_inputs(rng, np.array([100, 0, 60, 20], np.int32), M, H, F,
                       jnp.bfloat16, False)
  return [inputs[k] for k in ("x", "w1", "w2", "scales", "group_sizes")]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("offload_names, recompute_names", [
    (("fc1_input", "activation_input"), ()),
    (("fc2_input",), ("fc1_input",)),
    ((), ("activation_input", "fc2_input")),
])
def test_kernel_path_residuals_follow_the_policy(offload_names, recompute_names, fused):
  """Traced for the real kernels (the interpreter's callbacks cannot be checkpointed)."""
  args = _small_inputs()
  policy = jaxmoe.offload_policy(offload_names, recompute_names)
  loss = lambda *a: _loss("mosaic_gpu", fused, *a)  # noqa: E731
  with as_if_on_h100():
    residuals = saved_residuals(jax.checkpoint(loss, policy=policy), *args)
  shapes = {"fc1_input": (M, H), "activation_input": (M, F), "fc2_input": (M, F)}
  host = sorted(a.shape for a, _ in residuals if "<host>" in a.str_short())
  assert host == sorted(shapes[n] for n in offload_names)
  kept = {n for n in shapes if n not in offload_names + recompute_names}
  named = {why.split("named '")[1].split("'")[0] for _, why in residuals if "named '" in why}
  assert named == kept


@pytest.mark.parametrize("fused", [True, False])
def test_mlp_gradient_lowers_for_h100_with_pinned_host_residuals(fused):
  rng = np.random.default_rng(1)
  m, h, f, g = 4096, 1024, 2048, 64
  gs = jnp.asarray(ref.random_group_sizes(rng, m - 100, g))
  args = (jnp.zeros((m, h), jnp.bfloat16), jnp.zeros((g, h, f), jnp.bfloat16),
          jnp.zeros((g, f, h), jnp.bfloat16), jnp.zeros((m,), jnp.float32), gs)
  loss = jax.checkpoint(lambda *a: _loss("mosaic_gpu", fused, *a),
                        policy=jaxmoe.offload_policy())
  text = lower_for_h100(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
  assert text.count('_xla_buffer_placement = "pinned_host"') == 2
  assert text.count("mosaic_gpu") >= 5  # fwd: 2 GEMMs (+1 SReLU); bwd: 4 GEMMs (+1)
