"""jaxmoe.grouped_mlp: forward and every gradient against the float64 NumPy reference."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import numpy_reference as ref

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
BACKENDS = ["xla"]


def make_inputs(rng, group_sizes, m, hidden, ffn, dtype, use_bias):
  g = len(group_sizes)
  normal = lambda *shape, scale=1.0: jnp.asarray(
      scale * rng.standard_normal(shape), dtype)
  return dict(
      x=normal(m, hidden),
      w1=normal(g, hidden, ffn, scale=hidden**-0.5),
      w2=normal(g, ffn, hidden, scale=ffn**-0.5),
      group_sizes=jnp.asarray(group_sizes),
      scales=jnp.asarray(rng.uniform(0.05, 1.0, m), jnp.float32),
      b1=normal(g, ffn, scale=0.5) if use_bias else None,
      b2=normal(g, hidden, scale=0.5) if use_bias else None,
  )


def check_against_reference(inputs, dtype, backend, rng, fused=True):
  diff = {k: v for k, v in inputs.items()
          if k not in ("group_sizes",) and v is not None}
  fixed = {k: v for k, v in inputs.items() if k not in diff}

  def f(diff):
    return jaxmoe.grouped_mlp(backend=backend, fused=fused, **diff, **fixed)

  y, vjp = jax.vjp(f, diff)
  dy = jnp.asarray(rng.standard_normal(y.shape), dtype)
  (grads,) = vjp(dy)
  np_inputs = {k: (None if v is None else np.asarray(v, np.float64))
               for k, v in inputs.items()}
  y_ref, grads_ref = ref.grouped_mlp(
      np_inputs["x"], np_inputs["w1"], np_inputs["w2"], inputs["group_sizes"],
      np_inputs["scales"], np_inputs["b1"], np_inputs["b2"], dy=np.float64(dy))
  assert y.dtype == dtype
  ref.assert_close(y, y_ref, TOL[dtype], "y")
  valid = int(np.sum(inputs["group_sizes"]))
  assert not np.any(np.asarray(y[valid:], np.float32)), "padding rows of y must be zero"
  assert not np.any(np.asarray(grads["x"][valid:], np.float32)), "padding rows of dx"
  for name, grad in grads.items():
    assert grad.dtype == inputs[name].dtype, name
    ref.assert_close(grad, grads_ref[name],
                     TOL[dtype], f"d{name}")
  for g in np.flatnonzero(np.asarray(inputs["group_sizes"]) == 0):
    for name in ("w1", "w2", "b1", "b2"):
      if name in grads:
        assert not np.any(np.asarray(grads[name][g], np.float32)), f"d{name}[{g}]"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("case", list(ref.group_cases(np.random.default_rng(0), 45)))
def test_grouped_mlp_matches_reference(case, use_bias, dtype, backend):
  rng = np.random.default_rng(zlib.crc32(f"{case}{use_bias}{dtype}".encode()))
  m = 45
  group_sizes = ref.group_cases(rng, m)[case]
  inputs = make_inputs(rng, group_sizes, m, 24, 40, dtype, use_bias)
  check_against_reference(inputs, dtype, backend, rng)


@pytest.mark.parametrize("hidden", [128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transformer_engine_case(hidden, dtype):
  """TE's grouped MLP test: G=4, sizes a shuffle of 0, 1, 2, 3 times a block."""
  rng = np.random.default_rng(hidden)
  block = 32
  group_sizes = (rng.permutation(4) * block).astype(np.int32)
  m = int(group_sizes.sum())
  inputs = make_inputs(rng, group_sizes, m, hidden, 2 * hidden, dtype, use_bias=True)
  check_against_reference(inputs, dtype, "xla", rng)


def test_scale_is_applied_after_squaring():
  """a = relu(h)**2 * p, not (relu(h) * p)**2: doubling p doubles y (without b2)."""
  rng = np.random.default_rng(3)
  inputs = make_inputs(rng, np.array([6, 4], np.int32), 10, 8, 16, jnp.float32, False)
  y1 = jaxmoe.grouped_mlp(**inputs)
  inputs["scales"] = 2 * inputs["scales"]
  np.testing.assert_allclose(jaxmoe.grouped_mlp(**inputs), 2 * y1, rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(x=jnp.zeros((10, 9))), r"'w1' of shape \[G, H, F\]"),
    (dict(w2=jnp.zeros((2, 16, 9))), r"'w2' of shape \[G, F, H\]"),
    (dict(scales=jnp.zeros((9,))), r"'scales' of shape \[M\]"),
    (dict(b1=jnp.zeros((2, 8))), r"'b1' of shape \[G, F\]"),
    (dict(b2=jnp.zeros((3, 8))), r"'b2' of shape \[G, H\]"),
    (dict(group_sizes=jnp.array([10], jnp.int32)), "'group_sizes' of shape"),
    (dict(w1=jnp.zeros((2, 8, 16), jnp.bfloat16)), "'w1' in x's dtype"),
    (dict(x=jnp.zeros((10,))), "Expected 2-D 'x'"),
])
def test_grouped_mlp_rejects_bad_input(bad, match):
  inputs = make_inputs(np.random.default_rng(0), np.array([6, 4], np.int32), 10, 8, 16,
                       jnp.float32, False)
  inputs.update(bad)
  with pytest.raises(ValueError, match=match):
    jaxmoe.grouped_mlp(**inputs)
