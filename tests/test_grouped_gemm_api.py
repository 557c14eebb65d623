"""pallas_kernels.gmm / tgmm: forward, VJP and validation against float64 NumPy."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
import pallas_kernels

M, K, N = 37, 16, 24  # odd M: not a multiple of any tile
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _operands(rng, group_sizes, dtype, transpose_rhs=False):
  g = len(group_sizes)
  lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
  rhs_shape = (g, N, K) if transpose_rhs else (g, K, N)
  rhs = jnp.asarray(rng.standard_normal(rhs_shape), dtype)
  return lhs, rhs, jnp.asarray(group_sizes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("case", list(ref.group_cases(np.random.default_rng(0), M)))
def test_gmm_forward_and_vjp(case, transpose_rhs, dtype):
  rng = np.random.default_rng(zlib.crc32(f"{case}{transpose_rhs}{dtype}".encode()))
  group_sizes = ref.group_cases(rng, M)[case]
  lhs, rhs, gs = _operands(rng, group_sizes, dtype, transpose_rhs)
  out, vjp = jax.vjp(
      lambda l, r: pallas_kernels.gmm(l, r, gs, transpose_rhs=transpose_rhs,
                                      backend="xla"), lhs, rhs)
  assert out.dtype == dtype
  ref.assert_close(out, ref.gmm(lhs, rhs, group_sizes, transpose_rhs), TOL[dtype], "out")
  valid = int(group_sizes.sum())
  assert not np.any(np.asarray(out[valid:], np.float32)), "padding rows must be zero"

  dout = jnp.asarray(rng.standard_normal(out.shape), dtype)
  dlhs, drhs = vjp(dout)
  rhs_kn = np.float64(rhs).transpose(0, 2, 1) if transpose_rhs else np.float64(rhs)
  ref.assert_close(dlhs, ref.gmm(dout, rhs_kn, group_sizes, transpose_rhs=True),
                   TOL[dtype], "dlhs")
  expected_drhs = ref.tgmm(lhs, dout, group_sizes)
  if transpose_rhs:
    expected_drhs = expected_drhs.transpose(0, 2, 1)
  ref.assert_close(drhs, expected_drhs, TOL[dtype], "drhs")
  assert dlhs.dtype == lhs.dtype and drhs.dtype == rhs.dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(ref.group_cases(np.random.default_rng(0), M)))
def test_tgmm_forward_and_vjp(case, dtype):
  rng = np.random.default_rng(zlib.crc32(f"{case}{dtype}".encode()))
  group_sizes = ref.group_cases(rng, M)[case]
  lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((M, N)), dtype)
  gs = jnp.asarray(group_sizes)
  out, vjp = jax.vjp(lambda l, r: pallas_kernels.tgmm(l, r, gs, backend="xla"), lhs, rhs)
  ref.assert_close(out, ref.tgmm(lhs, rhs, group_sizes), TOL[dtype], "out")
  for g in np.flatnonzero(group_sizes == 0):
    assert not np.any(np.asarray(out[g], np.float32)), "empty groups must be zero"
  dout = jnp.asarray(rng.standard_normal(out.shape), dtype)
  dlhs, drhs = vjp(dout)
  ref.assert_close(dlhs, ref.gmm(rhs, dout, group_sizes, transpose_rhs=True), TOL[dtype], "dlhs")
  ref.assert_close(drhs, ref.gmm(lhs, dout, group_sizes), TOL[dtype], "drhs")


def test_preferred_element_type_sets_output_dtype():
  rng = np.random.default_rng(1)
  lhs, rhs, gs = _operands(rng, np.array([10, 0, 27], np.int32), jnp.bfloat16)
  out = pallas_kernels.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32, backend="xla")
  assert out.dtype == jnp.float32
  ref.assert_close(out, ref.gmm(lhs, rhs, gs), 1e-5, "f32 out of bf16 inputs")
  out_t = pallas_kernels.tgmm(lhs, lhs, gs, preferred_element_type=jnp.float32)
  assert out_t.dtype == jnp.float32


def test_auto_on_cpu_matches_xla_under_jit():
  rng = np.random.default_rng(2)
  lhs, rhs, gs = _operands(rng, np.array([5, 20, 0, 12], np.int32), jnp.float32)
  auto = jax.jit(lambda *a: pallas_kernels.gmm(*a))(lhs, rhs, gs)
  xla = pallas_kernels.gmm(lhs, rhs, gs, backend="xla")
  np.testing.assert_array_equal(auto, xla)


@pytest.mark.parametrize("bad, match", [
    (dict(lhs=np.zeros((2, 3, 16))), "Expected 2-D 'lhs'"),
    (dict(rhs=np.zeros((16, 24))), "Expected 3-D 'rhs'"),
    (dict(rhs=np.zeros((3, 15, 24))), "Contracting sizes differ"),
    (dict(group_sizes=np.zeros(4, np.int32)), r"'group_sizes' of shape \[3\]"),
    (dict(group_sizes=np.zeros(3, np.float32)), "int32 'group_sizes'"),
    (dict(lhs=np.zeros((8, 16), np.int32)), "floating dtype for 'lhs'"),
    (dict(rhs=np.zeros((3, 16, 24), np.float16)), "of one dtype"),
    (dict(backend="cuda"), "Unknown backend"),
])
def test_gmm_rejects_bad_input(bad, match):
  args = dict(lhs=np.zeros((8, 16), np.float32), rhs=np.zeros((3, 16, 24), np.float32),
              group_sizes=np.array([2, 3, 3], np.int32), backend="xla")
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    pallas_kernels.gmm(args.pop("lhs"), args.pop("rhs"), args.pop("group_sizes"), **args)


def test_tgmm_rejects_mismatched_rows():
  with pytest.raises(ValueError, match="Row counts differ"):
    pallas_kernels.tgmm(np.zeros((8, 16), np.float32), np.zeros((9, 4), np.float32),
                        np.array([8], np.int32))
