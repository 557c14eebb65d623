"""The FP8 expert MLP (`grouped_mlp(..., fp8=BlockwiseRecipe())`): quantisation against
NumPy, forward and every gradient against a float64 NumPy reference that quantises at
the same points, on the XLA reference and on the kernels in the Pallas interpreter,
the modules, and the input contract. Residual placement is in test_offload.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
import numpy_reference as ref
from jaxmoe import BlockwiseRecipe
from numpy_reference import assert_close
from pallas_kernels import quantize

RECIPE = BlockwiseRecipe()
M, H, F, G = 136, 128, 256, 4
GROUPS = {  # M = 136 rows (the kernels take M % 8 == 0)
    "empty_group_odd_sizes": [41, 0, 63, 32],
    "all_rows_in_one_group": [0, M, 0, 0],
    "padding_rows": [17, 0, 51, 45],  # 23 rows past sum(group_sizes)
    "all_padding": [0, 0, 0, 0],
}
# With float32 x, the forward GEMMs and the input gradient agree with the float64
# reference up to float32 summation (both quantise the same numbers: measured <= 1e-6);
# the weight gradients take bf16 operands (measured <= 2e-4).
TOL = {"y": 1e-5, "x": 1e-5, "scales": 1e-5, "b1": 1e-5, "w1": 1e-3, "w2": 1e-3}
FP8_WGRAD = BlockwiseRecipe(wgrad_dtype="float8_e4m3fn")
# FP8 weight gradients: both quantise the same float32 numbers by column tiles, then
# sum exact products (measured <= 5e-7; 1.5-2.6e-2 from the bf16 weight gradients).
FP8_WGRAD_TOL = {"w1": 1e-5, "w2": 1e-5}


def _inputs(seed, dtype=jnp.float32, bias=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((M, H))
  x[:, :128] *= 10.0 ** rng.uniform(-2, 2, (M, 1))  # rows of very different size
  arrays = dict(
      x=jnp.asarray(x, dtype),
      w1=jnp.asarray(rng.standard_normal((G, H, F)) / np.sqrt(H), jnp.float32),
      w2=jnp.asarray(rng.standard_normal((G, F, H)) / np.sqrt(F), jnp.float32),
      scales=jnp.asarray(rng.uniform(0.1, 1, M), jnp.float32),
      b1=jnp.asarray(rng.standard_normal((G, F)) / 4, jnp.float32) if bias else None)
  dy = jnp.asarray(rng.standard_normal((M, H)), dtype)
  return arrays, dy


def _run(arrays, dy, sizes, backend, fp8=RECIPE):
  """(y, grads by name) of grouped_mlp, jitted."""
  names = [n for n, a in arrays.items() if a is not None]
  group_sizes = jnp.asarray(sizes, jnp.int32)

  def f(*args):
    kw = dict(zip(names, args))
    return jaxmoe.grouped_mlp(kw["x"], kw["w1"], kw["w2"], group_sizes, kw["scales"],
                              b1=kw.get("b1"), backend=backend, fp8=fp8)

  @jax.jit
  def run(*args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(dy)

  y, grads = run(*(arrays[n] for n in names))
  return y, dict(zip(names, grads))


def _check_against_numpy(arrays, dy, sizes, y, grads, scale_tol=1.0, recipe=RECIPE):
  x_dtype = arrays["x"].dtype
  expected_y, expected = ref.fp8_grouped_mlp(
      *(np.asarray(arrays[n].astype(jnp.float32)) for n in ("x", "w1", "w2")), sizes,
      np.asarray(arrays["scales"]), b1=None if arrays["b1"] is None else
      np.asarray(arrays["b1"]), dy=np.float64(np.asarray(dy.astype(jnp.float32))),
      h_dtype=None if x_dtype == jnp.float32 else jnp.dtype(x_dtype).name,
      wgrad_dtype=recipe.wgrad_dtype)
  tol = dict(TOL, **(FP8_WGRAD_TOL if recipe.wgrad_dtype == "float8_e4m3fn" else {}))
  used = sum(sizes)
  y = np.asarray(y.astype(jnp.float32))
  assert (y[used:] == 0).all() and (np.asarray(grads["x"].astype(jnp.float32))[used:] == 0).all()
  if not used:
    for name, g in grads.items():
      assert not np.asarray(g.astype(jnp.float32)).any(), name
    return
  assert_close(y, expected_y, tol["y"] * scale_tol, "y")
  for name, g in grads.items():
    assert g.dtype == arrays[name].dtype, name
    assert_close(np.asarray(g.astype(jnp.float32)), expected[name],
                 tol[name] * scale_tol, name)
  for e, size in enumerate(sizes):  # An empty expert gets exactly zero gradients.
    if size == 0:
      assert not np.asarray(grads["w1"][e]).any() and not np.asarray(grads["w2"][e]).any()


# --- Quantisation ------------------------------------------------------------------

def test_quantize_rows_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((24, 384)) * 10.0 ** rng.uniform(-3, 3, (24, 3)).repeat(128, 1)
  x[3, 128:256] = 0.0  # an all-zero tile: scale 1, values 0
  q = quantize.quantize_rows(jnp.asarray(x, jnp.float32))
  deq, values, scales = ref.quantize_rows(np.float32(x))
  assert q.values.dtype == quantize.FP8 and q.values.shape == (24, 384)
  assert q.scales.dtype == jnp.float32 and q.scales.shape == (3, 24)
  np.testing.assert_allclose(np.asarray(q.scales).T, scales, rtol=1e-6)
  assert np.asarray(q.scales)[1, 3] == 1.0
  np.testing.assert_array_equal(np.float64(np.asarray(q.values)), values)
  np.testing.assert_allclose(np.asarray(quantize.dequantize_rows(q)), deq, rtol=1e-6)
  # e4m3 keeps 3 mantissa bits: within 1/16 of each value, or half the smallest
  # subnormal (2**-10 times the tile's scale).
  err = np.abs(deq - x)
  bound = np.abs(x) / 16 + 2.0**-10 * np.repeat(scales, 128, axis=1)
  assert (err <= bound * (1 + 1e-6)).all()
  assert np.abs(values).max() == 448.0


def test_quantize_blocks_matches_numpy():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((3, 256, 384)) * 10.0 ** rng.uniform(-2, 2, (3, 2, 1, 3, 1)).repeat(
      128, 2).reshape(3, 256, 1, 3).repeat(128, 3).reshape(3, 256, 384)
  q = quantize.quantize_blocks(jnp.asarray(w, jnp.float32))
  deq, values, scales = ref.quantize_blocks(np.float32(w))
  assert q.scales.shape == (3, 2, 3) and q.values_t.shape == (3, 384, 256)
  np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=1e-6)
  np.testing.assert_array_equal(np.float64(np.asarray(q.values)), values)
  np.testing.assert_array_equal(np.asarray(q.values_t), np.swapaxes(np.asarray(q.values), 1, 2))
  np.testing.assert_allclose(np.asarray(quantize.dequantize_blocks(q)), deq, rtol=1e-6)
  assert np.abs(deq - w).max() <= np.abs(w).max() / 16


@pytest.mark.parametrize("sizes", [[41, 0, 63, 32], [17, 0, 51, 45]])
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["fwd", "dgrad"])
def test_gmm_fp8_xla_matches_numpy(sizes, transpose_rhs):
  import pallas_kernels
  rng = np.random.default_rng(2)
  lhs = rng.standard_normal((M, 256))
  w = rng.standard_normal((G, 384, 256) if transpose_rhs else (G, 256, 384))
  lhs_q, w_q = quantize.quantize_rows(jnp.asarray(lhs)), quantize.quantize_blocks(jnp.asarray(w))
  out = pallas_kernels.gmm_fp8(lhs_q, w_q, jnp.asarray(sizes, jnp.int32),
                               transpose_rhs=transpose_rhs, out_dtype=jnp.float32,
                               backend="xla")
  expected = ref.gmm(ref.quantize_rows(lhs)[0], ref.quantize_blocks(w)[0], sizes,
                     transpose_rhs=transpose_rhs)
  assert out.shape == (M, 384)
  assert_close(np.asarray(out), expected, 1e-6)


# --- The MLP against NumPy -----------------------------------------------------------

@pytest.mark.parametrize("case", sorted(GROUPS))
def test_fp8_mlp_xla_matches_numpy(case):
  arrays, dy = _inputs(3)
  y, grads = _run(arrays, dy, GROUPS[case], "xla")
  _check_against_numpy(arrays, dy, GROUPS[case], y, grads)


def test_fp8_mlp_xla_with_biases_matches_numpy():
  arrays, dy = _inputs(4, bias=True)
  sizes = GROUPS["padding_rows"]
  b2 = jnp.asarray(np.random.default_rng(5).standard_normal((G, H)), jnp.float32)
  y, grads = _run(arrays, dy, sizes, "xla")
  _check_against_numpy(arrays, dy, sizes, y, grads)
  # b2 is added after the FP8 GEMM, scaled by p, as on the bf16 path.
  with_b2 = jaxmoe.grouped_mlp(arrays["x"], arrays["w1"], arrays["w2"],
                               jnp.asarray(sizes, jnp.int32), arrays["scales"],
                               b1=arrays["b1"], b2=b2, backend="xla", fp8=RECIPE)
  b2_rows = np.concatenate([np.repeat(np.asarray(b2), sizes, axis=0),
                            np.zeros((M - sum(sizes), H))])
  np.testing.assert_allclose(np.asarray(with_b2), np.asarray(y) + b2_rows *
                             np.asarray(arrays["scales"])[:, None], rtol=1e-5, atol=1e-5)


def test_fp8_mlp_bf16_activations():
  arrays, dy = _inputs(6, dtype=jnp.bfloat16)
  sizes = GROUPS["empty_group_odd_sizes"]
  y, grads = _run(arrays, dy, sizes, "xla")
  assert y.dtype == grads["x"].dtype == jnp.bfloat16 and grads["w1"].dtype == jnp.float32
  # h is stored in bf16 (the reference rounds it too); y and dx round to bf16.
  _check_against_numpy(arrays, dy, sizes, y, grads, scale_tol=400)


@pytest.mark.parametrize("case", ["empty_group_odd_sizes", "padding_rows",
                                  "all_rows_in_one_group"])
def test_fp8_mlp_interpret_matches_numpy_and_xla(case):
  """The Mosaic GPU FP8 kernels (and the bf16 weight-gradient kernels) in the Pallas
  interpreter: against NumPy, and against the XLA reference, which quantises the same
  numbers and differs only in float32 summation order."""
  arrays, dy = _inputs(7, bias=case == "padding_rows")
  sizes = GROUPS[case]
  y, grads = _run(arrays, dy, sizes, "interpret")
  _check_against_numpy(arrays, dy, sizes, y, grads)
  y_xla, grads_xla = _run(arrays, dy, sizes, "xla")
  assert_close(np.asarray(y), np.asarray(y_xla), 1e-5, "y")
  for name in grads:
    assert_close(np.asarray(grads[name]), np.asarray(grads_xla[name]), 1e-4, name)


@pytest.mark.parametrize("case", sorted(GROUPS))
def test_fp8_wgrad_xla_matches_numpy(case):
  arrays, dy = _inputs(3, bias=case == "padding_rows")
  y, grads = _run(arrays, dy, GROUPS[case], "xla", fp8=FP8_WGRAD)
  _check_against_numpy(arrays, dy, GROUPS[case], y, grads, recipe=FP8_WGRAD)


@pytest.mark.parametrize("case", ["empty_group_odd_sizes", "all_rows_in_one_group"])
def test_fp8_wgrad_interpret_matches_numpy_and_xla(case):
  """`tgmm_fp8_mgpu` in the interpreter inside the MLP's backward pass."""
  arrays, dy = _inputs(10)
  sizes = GROUPS[case]
  y, grads = _run(arrays, dy, sizes, "interpret", fp8=FP8_WGRAD)
  _check_against_numpy(arrays, dy, sizes, y, grads, recipe=FP8_WGRAD)
  _, grads_xla = _run(arrays, dy, sizes, "xla", fp8=FP8_WGRAD)
  for name in ("w1", "w2"):
    assert_close(np.asarray(grads[name]), np.asarray(grads_xla[name]), 1e-5, name)


def test_auto_runs_fp8_not_bf16():
  """Without a Hopper GPU "auto" runs the FP8 XLA reference, never the bf16 GEMMs."""
  arrays, dy = _inputs(8)
  sizes = GROUPS["padding_rows"]
  y_auto, g_auto = _run(arrays, dy, sizes, "auto")
  y_xla, g_xla = _run(arrays, dy, sizes, "xla")
  np.testing.assert_array_equal(np.asarray(y_auto), np.asarray(y_xla))
  for name in g_auto:
    np.testing.assert_array_equal(np.asarray(g_auto[name]), np.asarray(g_xla[name]))
  y_plain, _ = _run(arrays, dy, sizes, "xla", fp8=None)
  assert not np.array_equal(np.asarray(y_auto), np.asarray(y_plain))
  # ... and near it: e4m3 keeps 3 mantissa bits, squared by the SReLU (measured 5.8%).
  err = np.linalg.norm(np.asarray(y_auto) - np.asarray(y_plain)) / np.linalg.norm(y_plain)
  assert 1e-3 < err < 0.1, err


# --- Modules -------------------------------------------------------------------------

def test_grouped_mlp_module_quantises_its_master_weights():
  kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32, backend="xla")
  fp8 = jaxmoe.GroupedMLP(G, H, F, fp8=RECIPE, rngs=nnx.Rngs(0), **kw)
  plain = jaxmoe.GroupedMLP(G, H, F, rngs=nnx.Rngs(0), **kw)
  assert fp8.weights()["w1"].dtype == jnp.float32  # no bf16 copy: quantised from f32
  arrays, _ = _inputs(9)
  sizes = jnp.asarray(GROUPS["padding_rows"], jnp.int32)

  def loss_and_grads(module):
    graphdef, params = nnx.split(module)
    loss = lambda params: jnp.sum(nnx.merge(graphdef, params)(  # noqa: E731
        arrays["x"], sizes, arrays["scales"]).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss8, grads8), (loss, grads) = loss_and_grads(fp8), loss_and_grads(plain)
  assert np.isfinite(loss8) and abs(loss8 - loss) / loss < 0.05
  for g8, g in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads)):
    assert g8.dtype == jnp.float32
    err = np.linalg.norm(np.asarray(g8) - np.asarray(g)) / np.linalg.norm(np.asarray(g))
    assert err < 0.1, err


def test_moe_layer_with_fp8():
  kw = dict(dtype=jnp.bfloat16, backend="xla")
  x = jax.random.normal(jax.random.key(0), (2, 32, H), jnp.bfloat16)
  outs = []
  for fp8 in (RECIPE, None):
    layer = jaxmoe.MoELayer(H, F, G, 2, fp8=fp8, rngs=nnx.Rngs(0), **kw)
    graphdef, params = nnx.split(layer)
    loss = lambda params: jnp.sum(nnx.merge(graphdef, params)(x)[0].astype(  # noqa: E731
        jnp.float32) ** 2)
    outs.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss8, grads8), (loss, grads) = outs
  assert np.isfinite(loss8) and abs(loss8 - loss) / loss < 0.05
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads8))


# --- Input contract ------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(hidden=64), "fp8 needs the hidden size H to be a multiple of 128, got H=64"),
    (dict(ffn=192), "fp8 needs the FFN size F to be a multiple of 128, got F=192"),
    (dict(fp8="e4m3"), "Expected 'fp8' to be None or a jaxmoe.fp8.BlockwiseRecipe"),
    (dict(rows=132, backend="interpret"), "backend='interpret' cannot run this input: "
     "M=132 is not a positive multiple of 8"),
])
def test_fp8_input_contract(change, match):
  hidden, ffn, rows = change.get("hidden", H), change.get("ffn", F), change.get("rows", M)
  x = jnp.zeros((rows, hidden))
  w1, w2 = jnp.zeros((G, hidden, ffn)), jnp.zeros((G, ffn, hidden))
  with pytest.raises(ValueError, match=match):
    jaxmoe.grouped_mlp(x, w1, w2, jnp.asarray([rows, 0, 0, 0], jnp.int32), jnp.ones(rows),
                       fp8=change.get("fp8", RECIPE), backend=change.get("backend", "xla"))
  if "rows" in change or "fp8" in change:
    return
  with pytest.raises(ValueError, match=match):
    jaxmoe.GroupedMLP(G, hidden, ffn, fp8=RECIPE, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    jaxmoe.MoELayer(hidden, ffn, G, 2, fp8=RECIPE, rngs=nnx.Rngs(0))


def test_recipe_is_validated_and_hashable():
  assert BlockwiseRecipe() == BlockwiseRecipe(fp8_dtype=jnp.float8_e4m3fn,
                                              weight_block=[128, 128])
  assert hash(BlockwiseRecipe()) == hash(BlockwiseRecipe(wgrad_dtype=jnp.bfloat16))
  with pytest.raises(ValueError, match=r"weight_block=\(128, 128\) only, got \(64, 64\)"):
    BlockwiseRecipe(weight_block=(64, 64))
  with pytest.raises(ValueError, match="fp8_dtype='float8_e4m3fn' only"):
    BlockwiseRecipe(fp8_dtype="float8_e5m2")
  assert FP8_WGRAD.wgrad_dtype == "float8_e4m3fn"
  with pytest.raises(ValueError, match=r"wgrad_dtype in \('bfloat16', 'float8_e4m3fn'\)"):
    BlockwiseRecipe(wgrad_dtype="float16")
  with pytest.raises(ValueError, match="fp8"):
    jaxmoe.GroupedMLP(G, H, F, fp8=True, rngs=nnx.Rngs(0))
