"""Blockwise-scaled FP8 weight-gradient GEMM (`tgmm_fp8_mgpu`) and its group-aligned
column quantisation (`quantize.quantize_columns` in XLA, `quantize_columns_triton` in
one pass): the layout against NumPy (both), the kernels in the Pallas interpreters
against float64 references on the dequantised operands and bitwise against XLA, the
kernels lowered for `cuda` at full size, their input checks, and (`-m gpu`) full size
on a Hopper GPU."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
import pallas_kernels
from cuda_lowering import lower_for_h100
from numpy_reference import assert_close
from pallas_kernels import config as config_lib
from pallas_kernels import quantize
from pallas_kernels.quantize_columns_triton import quantize_columns_triton
from pallas_kernels.tgmm_fp8_mgpu import tgmm_fp8_mgpu
from test_mgpu_kernels_gpu import _group_sizes as gpu_group_sizes

BLOCK = quantize.BLOCK


def _rows(rng, m, k, sizes):
  """float32 [M, K], rows of very different size, NaN in the padding rows (which
  must not reach any group)."""
  x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))
  x[sum(sizes):] = np.nan
  return jnp.asarray(x, jnp.float32)


COLUMN_QUANTISERS = {"xla": quantize.quantize_columns,
                     "kernel": functools.partial(quantize_columns_triton, interpret=True)}


@pytest.mark.parametrize("sizes", [[41, 0, 200, 32], [0, 300, 0], [0, 0, 0], [129, 128, 1]])
@pytest.mark.parametrize("impl", COLUMN_QUANTISERS)
def test_quantize_columns_matches_numpy(sizes, impl):
  m, k = 304, 256
  rng = np.random.default_rng(len(sizes) + sizes[0])
  x = _rows(rng, m, k, sizes)
  gs = jnp.asarray(sizes, jnp.int32)
  q = COLUMN_QUANTISERS[impl](x, gs)
  p = quantize.aligned_rows(m, len(sizes))
  assert q.values.shape == (k, p) and q.values.dtype == quantize.FP8
  assert q.scales.shape == (p // BLOCK, k) and q.scales.dtype == jnp.float32
  aligned = np.asarray(quantize.dequantize_rows(q)).T  # [P, K]
  assert np.isfinite(aligned).all()
  expected = ref.quantize_group_columns(np.asarray(x), sizes)
  blocks = quantize.group_blocks(gs, m)
  used = np.zeros(p, bool)
  for (g, rows), first in zip(ref.group_slices(sizes), np.asarray(blocks.first)):
    start = first * BLOCK
    # Equal up to the float32 product of value and scale (an e4m3 step is >= 6 %).
    np.testing.assert_allclose(aligned[start:start + sizes[g]], expected[rows], rtol=1e-6)
    used[start:start + sizes[g]] = True
    assert blocks.count[g] == -(-sizes[g] // BLOCK)
  assert not aligned[~used].any(), "positions that hold no row must be zeros"


@pytest.mark.parametrize("m,k,sizes,dtype", [
    (304, 256, [41, 0, 200, 32], jnp.bfloat16), (392, 128, [129, 128, 1, 70], jnp.float32),
    (136, 384, [0, 136], jnp.bfloat16), (200, 128, [0, 0, 0], jnp.float32)])
@pytest.mark.parametrize("row_quantised", [False, True], ids=["float", "row_quantised"])
def test_quantize_columns_op_backends_agree(m, k, sizes, dtype, row_quantised):
  """The kernel's numbers are XLA's, bitwise, from a float x or from a row-quantised
  one (dequantised on the fly)."""
  x = _rows(np.random.default_rng(m + k), m, k, sizes).astype(dtype)
  if row_quantised:
    x = quantize.quantize_rows(jnp.nan_to_num(x))
  gs = jnp.asarray(sizes, jnp.int32)
  kernel = pallas_kernels.quantize_columns(x, gs, backend="interpret")
  xla = pallas_kernels.quantize_columns(x, gs, backend="xla")
  for a, b in zip(kernel, xla):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("x,match", [
    (jnp.ones((64, 200)), "multiple of 128"),
    (jnp.ones((2, 64, 128)), "2-D"),
    (jnp.ones((64, 128), jnp.int32), "floating"),
    (quantize.RowQuantized(jnp.ones((64, 128)), jnp.ones((1, 64))), "e4m3 values"),
    (quantize.RowQuantized(jnp.ones((64, 128), quantize.FP8), jnp.ones((64, 1))), "scales"),
])
@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_quantize_columns_op_rejects_bad_input(x, match, backend):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.quantize_columns(x, jnp.asarray([30, 34], jnp.int32), backend=backend)


def test_quantize_columns_kernel_lowers_for_h100():
  m, k, g = 16384, 4096, 8
  p = quantize.aligned_rows(m, g)
  values = jax.ShapeDtypeStruct((m, k), quantize.FP8)
  scales = jax.ShapeDtypeStruct((k // BLOCK, m), jnp.float32)
  text = lower_for_h100(lambda v, s, gs: tuple(pallas_kernels.quantize_columns(
      quantize.RowQuantized(v, s), gs, backend="mosaic_gpu")), values, scales,
      jax.ShapeDtypeStruct((g,), jnp.int32))
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert f"tensor<{k}x{p}xf8E4M3FN>" in text and f"tensor<{p // BLOCK}x{k}xf32>" in text


@pytest.mark.parametrize("m,k,sizes,dtype,srelu", [
    (304, 256, [41, 0, 200, 32], jnp.bfloat16, False),  # padding rows, an empty group
    (392, 128, [129, 128, 1, 70], jnp.float32, True),
    (136, 384, [0, 136], jnp.bfloat16, True),  # all rows in one group
    (200, 128, [0, 0, 0], jnp.float32, False),  # all padding
    (13, 128, [5, 0], jnp.bfloat16, False),  # odd M, fewer rows than a block
    (520, 256, [1, 129, 0, 7], jnp.float32, True)])  # 383 padding rows: three blocks
def test_quantize_rows_and_columns_matches_numpy_and_xla(m, k, sizes, dtype, srelu):
  """Both layouts from one read: the rows as `quantize_rows` (every row, padding rows
  too), the columns as `quantize_columns`, of x or of relu(x)**2 * p; the kernel's
  numbers are XLA's, bitwise."""
  rng = np.random.default_rng(m + k + srelu)
  x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))
  x = jnp.asarray(x, dtype)
  p = jnp.asarray(rng.uniform(0.1, 1.0, m), jnp.float32) if srelu else None
  gs = jnp.asarray(sizes, jnp.int32)
  kernel = pallas_kernels.quantize_rows_and_columns(x, gs, srelu_scales=p,
                                                    backend="interpret")
  xla = pallas_kernels.quantize_rows_and_columns(x, gs, srelu_scales=p, backend="xla")
  for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(xla)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  rows, columns = kernel
  a = np.asarray(x, np.float64)
  if srelu:  # in float32, as the recipe computes it (`quantize.srelu_f32`)
    relu = np.maximum(np.float32(a), np.float32(0))
    a = np.float64(relu * relu * np.asarray(p)[:, None])
  _, values, scales = ref.quantize_rows(a)
  np.testing.assert_allclose(np.asarray(rows.scales).T, scales, rtol=1e-6)
  # An ulp between the reference's amax * (1 / 448) and amax / 448 moves a value to the
  # neighbouring e4m3 number at a rounding tie only.
  assert (np.float64(np.asarray(rows.values)) != values).mean() < 1e-4
  aligned = np.asarray(quantize.dequantize_rows(columns)).T  # [P, K]
  expected = ref.quantize_group_columns(np.float32(a), sizes)
  for (g, group_rows), first in zip(ref.group_slices(sizes),
                                    np.asarray(quantize.group_blocks(gs, m).first)):
    np.testing.assert_allclose(aligned[first * BLOCK:first * BLOCK + sizes[g]],
                               expected[group_rows], rtol=1e-6)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_quantize_rows_and_columns_rejects_bad_input(backend):
  gs = jnp.asarray([30, 34], jnp.int32)
  for x, kwargs, match in ((jnp.ones((64, 200)), {}, "multiple of 128"),
                           (jnp.ones((64, 128), jnp.int32), {}, "floating"),
                           (jnp.ones((64, 128)), dict(srelu_scales=jnp.ones(63)), "srelu_scales")):
    with pytest.raises(ValueError, match=match):
      pallas_kernels.quantize_rows_and_columns(x, gs, backend=backend, **kwargs)
  with pytest.raises(ValueError, match="group_sizes"):
    pallas_kernels.quantize_rows_and_columns(jnp.ones((64, 128)), jnp.ones(2), backend=backend)


def test_quantize_rows_and_columns_kernel_lowers_for_h100():
  m, k, g = 16384, 4096, 8
  p = quantize.aligned_rows(m, g)
  text = lower_for_h100(
      lambda x, gs, s: jax.tree.leaves(pallas_kernels.quantize_rows_and_columns(
          x, gs, srelu_scales=s, backend="mosaic_gpu")),
      jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g,), jnp.int32),
      jax.ShapeDtypeStruct((m,), jnp.float32))
  assert text.count("__gpu$xla.gpu.triton") == 1
  for shape in (f"{m}x{k}xf8E4M3FN", f"{k // BLOCK}x{m}xf32", f"{k}x{p}xf8E4M3FN",
                f"{p // BLOCK}x{k}xf32"):
    assert f"tensor<{shape}>" in text, shape


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["columns", "columns_of_rows", "rows_and_columns",
                                "rows_and_columns_srelu"])
def test_quantize_columns_kernel_full_size(op):
  """`quantize_columns` of a float or a row-quantised x, and `quantize_rows_and_columns`
  of x or of relu(x)**2 * p: the kernel against XLA at full size on the GPU."""
  m, k, g = 16384, 4096, 8
  sizes = gpu_group_sizes(np.random.default_rng(g), m - 1000, g, empty_every=5)
  x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  if op.startswith("columns"):
    if op == "columns_of_rows":
      x = jax.jit(quantize.quantize_rows)(x)
    run = jax.jit(lambda x, backend: pallas_kernels.quantize_columns(x, sizes, backend=backend),
                  static_argnames="backend")
  else:
    p = jax.random.uniform(jax.random.key(2), (m,), jnp.float32, 0.1, 1.0)
    p = p if op.endswith("srelu") else None
    run = jax.jit(lambda x, backend: pallas_kernels.quantize_rows_and_columns(
        x, sizes, srelu_scales=p, backend=backend), static_argnames="backend")
  kernel, xla = run(x, backend="mosaic_gpu"), run(x, backend="xla")
  for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(xla)):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == jnp.float32:  # the scales
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    else:
      diff = np.asarray(a, np.float32) != np.asarray(b, np.float32)
      assert diff.mean() < 1e-5, diff.mean()  # an ulp of float32 division, at ties only


def _operands(rng, m, k, n, sizes):
  gs = jnp.asarray(sizes, jnp.int32)
  xq = quantize.quantize_columns(_rows(rng, m, k, sizes), gs)
  dyq = quantize.quantize_columns(_rows(rng, m, n, sizes), gs)
  return (xq.values, xq.scales, dyq.values, dyq.scales, gs)


def _reference(lhs_values, lhs_scales, rhs_values, rhs_scales, gs, m):
  """float64 [G, K, N] from the dequantised operands, each group's aligned blocks."""
  lhs = np.float64(quantize.dequantize_rows(quantize.RowQuantized(lhs_values, lhs_scales)))
  rhs = np.float64(quantize.dequantize_rows(quantize.RowQuantized(rhs_values, rhs_scales)))
  blocks = quantize.group_blocks(gs, m)
  return np.stack([lhs[:, BLOCK * f:BLOCK * (f + c)] @ rhs[:, BLOCK * f:BLOCK * (f + c)].T
                   for f, c in zip(np.asarray(blocks.first), np.asarray(blocks.count))])


SMALL = config_lib.Fp8TgmmConfig(block_k=64, block_n=64, max_concurrent_steps=2,
                                 epilogue_rows=None)
WS = config_lib.Fp8TgmmConfig(block_k=64, block_n=64, max_concurrent_steps=2,
                              epilogue_rows=None, num_compute_wgs=2)
WS_SPLIT = config_lib.Fp8TgmmConfig(block_k=64, block_n=64, max_concurrent_steps=3,
                                    epilogue_rows=None, num_compute_wgs=2, split_rows=True)
CASES = [
    # (M, K, N, group sizes, out dtype, config)
    (304, 128, 256, [41, 0, 200, 32], jnp.float32, None),  # an empty group, 31 padding rows
    (304, 128, 128, [0, 304, 0], jnp.bfloat16, None),  # all rows in one group, 3 blocks
    (200, 128, 128, [0, 0, 0], jnp.float32, None),  # all padding
    (392, 192, 128, [129, 128, 1, 70], jnp.float32, SMALL),  # odd sizes, 64-wide tiles
    (264, 256, 192, [17, 0, 150, 97], jnp.bfloat16, SMALL),
    # Warp-specialised: a producer, two consumers side by side or one above the other;
    # groups of one block, fewer than the pipeline's stages.
    (304, 128, 256, [41, 0, 200, 32], jnp.float32, WS),
    (392, 256, 128, [129, 128, 1, 70], jnp.bfloat16, WS),
    (392, 256, 128, [129, 128, 1, 70], jnp.float32, WS_SPLIT),
    (200, 128, 128, [0, 0, 0], jnp.bfloat16, WS_SPLIT),
]


@pytest.mark.parametrize("m,k,n,sizes,out_dtype,cfg", CASES)
def test_tgmm_fp8_interpret(m, k, n, sizes, out_dtype, cfg):
  rng = np.random.default_rng(m + k + n)
  operands = _operands(rng, m, k, n, sizes)
  out = tgmm_fp8_mgpu(*operands, num_rows=m, out_dtype=out_dtype, interpret=True,
                      config=cfg)
  assert out.shape == (len(sizes), k, n) and out.dtype == out_dtype
  out = np.asarray(out.astype(jnp.float32))
  for g, size in enumerate(sizes):
    if size == 0:
      assert not out[g].any(), "an empty group's gradient must be zeros"
  expected = _reference(*operands, m)
  assert_close(out, expected, {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}[out_dtype])
  # The ops entry point and the XLA reference agree with it.
  xq, dyq = (quantize.RowQuantized(*operands[i:i + 2]) for i in (0, 2))
  xla = pallas_kernels.tgmm_fp8(xq, dyq, operands[4], num_rows=m, out_dtype=jnp.float32,
                                backend="xla")
  assert_close(np.asarray(xla), expected, 1e-6, "xla")


@pytest.mark.parametrize("m,k,n,g,out_dtype", [
    (16384, 2048, 4096, 8, jnp.float32),  # dw1 of the G=8 benchmark layer
    (16384, 4096, 2048, 8, jnp.bfloat16),  # dw2
    (16384, 4096, 1024, 64, jnp.float32),
    (32768, 2048, 7168, 256, jnp.float32),
    (16384, 2048, 4096, 8, "ws"), (16384, 4096, 2048, 8, "ws_split"),
])
def test_tgmm_fp8_lowers_for_h100_with_e4m3_wgmma(m, k, n, g, out_dtype):
  cfg = None
  if isinstance(out_dtype, str):  # warp-specialised, bf16 out
    cfg = config_lib.Fp8TgmmConfig(block_k=64, max_concurrent_steps=4, num_compute_wgs=2,
                                   split_rows=out_dtype == "ws_split")
    out_dtype = jnp.bfloat16
  p, f8, f32 = quantize.aligned_rows(m, g), quantize.FP8, jnp.float32
  text = lower_for_h100(
      lambda a, s, b, t, c: tgmm_fp8_mgpu(a, s, b, t, c, num_rows=m, out_dtype=out_dtype,
                                          config=cfg),
      jax.ShapeDtypeStruct((k, p), f8), jax.ShapeDtypeStruct((p // BLOCK, k), f32),
      jax.ShapeDtypeStruct((n, p), f8), jax.ShapeDtypeStruct((p // BLOCK, n), f32),
      jax.ShapeDtypeStruct((g,), jnp.int32))
  wgmmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", text)
  assert wgmmas and all(w.endswith(".f32.e4m3.e4m3") for w in wgmmas), wgmmas
  assert "stablehlo.transpose" not in text


@pytest.mark.parametrize("change,error,match", [
    (dict(lhs_dtype=jnp.bfloat16), NotImplementedError, "lhs_values"),
    (dict(out_dtype=jnp.float16), NotImplementedError, "bf16 or f32"),
    (dict(k=192), NotImplementedError, "K=192"),
    (dict(n=192), NotImplementedError, "N=192"),
    (dict(rhs_scales_rows=3), ValueError, "rhs_scales"),
    (dict(interpret=False), NotImplementedError, "Hopper"),
])
def test_tgmm_fp8_unsupported(change, error, match):
  if not change.get("interpret", True) and jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  k, n, p = change.get("k", 256), change.get("n", 256), 512
  lhs = jnp.zeros((k, p), change.get("lhs_dtype", quantize.FP8))
  rhs = jnp.zeros((n, p), quantize.FP8)
  with pytest.raises(error, match=match):
    tgmm_fp8_mgpu(lhs, jnp.ones((p // BLOCK, k)), rhs,
                  jnp.ones((change.get("rhs_scales_rows", p // BLOCK), n)),
                  jnp.zeros((2,), jnp.int32), num_rows=256,
                  out_dtype=change.get("out_dtype", jnp.float32),
                  interpret=change.get("interpret", True))


def test_tgmm_fp8_op_checks_the_layout():
  q = quantize.RowQuantized(jnp.zeros((256, 512), quantize.FP8), jnp.ones((4, 256)))
  with pytest.raises(ValueError, match=r"'lhs' values of shape \[\*, 640\]"):
    pallas_kernels.tgmm_fp8(q, q, jnp.zeros((2,), jnp.int32), num_rows=384, backend="xla")


def test_fp8_tgmm_config_validates_itself():
  with pytest.raises(ValueError, match="two float32 accumulators"):
    config_lib.Fp8TgmmConfig(block_k=256)
  with pytest.raises(ValueError, match="exceeds 8192"):  # a consumer beside a producer
    config_lib.Fp8TgmmConfig(num_compute_wgs=2)
  with pytest.raises(ValueError, match="split_rows=True needs two consumer"):
    config_lib.Fp8TgmmConfig(split_rows=True)
  ws = config_lib.Fp8TgmmConfig(block_k=64, max_concurrent_steps=3, num_compute_wgs=2,
                                split_rows=True)
  # Per stage: both consumers' lhs tiles, the shared rhs tile, their scales; one staging
  # buffer per consumer.
  assert ws.smem_bytes(1, 2) == 3 * (128 + 128) * (128 + 4) + 2 * 64 * 128 * 2
  with pytest.raises(NotImplementedError, match="K=192 is not a multiple of 128"):
    ws.validate_for(192, 256, 1, 2)
  with pytest.raises(ValueError, match="block_n"):
    config_lib.Fp8TgmmConfig(block_n=96)
  with pytest.raises(ValueError, match="shared memory"):
    config_lib.Fp8TgmmConfig(max_concurrent_steps=8)
  cfg = config_lib.Fp8TgmmConfig()
  assert cfg.smem_bytes(1, 4) == 4 * 256 * (128 + 4) + 64 * 128 * 4
  # The default: two consumers one above the other where they tile K and N.
  default = config_lib.fp8_tgmm_config(2048, 4096, 4)
  assert (default.num_compute_wgs, default.split_rows, default.cta_tile_rows) == (2, True, 128)
  assert default.smem_bytes(1, 4) <= config_lib.SMEM_BYTES
  assert config_lib.fp8_tgmm_config(128, 192, 4) == cfg  # N not in 128-column tiles
  with pytest.raises(NotImplementedError, match="K=320"):
    cfg.validate_for(320, 256, 1, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,g,pad", [(16384, 2048, 4096, 8, 1000),
                                         (16384, 1024, 4096, 64, 301)])
@pytest.mark.parametrize("cfg", [None, "ws", "ws_split"])
def test_tgmm_fp8_full_size(m, k, n, g, pad, cfg):
  """On the GPU against ragged_dot of the dequantised operands in float32 (HIGHEST);
  the tolerance allows for the FP8 tensor core's limited-precision accumulation
  within each 128-row block."""
  keys = jax.random.split(jax.random.key(m + k + n + g), 2)
  sizes = gpu_group_sizes(np.random.default_rng(g), m - pad, g, empty_every=5)
  xq = jax.jit(quantize.quantize_columns)(jax.random.normal(keys[0], (m, k)), sizes)
  dyq = jax.jit(quantize.quantize_columns)(jax.random.normal(keys[1], (m, n)), sizes)

  if cfg is not None:  # two consumers side by side, or one above the other
    cfg = config_lib.Fp8TgmmConfig(block_k=64, max_concurrent_steps=3, num_compute_wgs=2,
                                   split_rows=cfg == "ws_split")
  out = np.asarray(jax.jit(lambda *a: tgmm_fp8_mgpu(*a, num_rows=m, config=cfg))(
      xq.values, xq.scales, dyq.values, dyq.scales, sizes))
  assert not out[np.asarray(sizes) == 0].any()
  xla = jax.jit(lambda u, v, s: pallas_kernels.tgmm_fp8(u, v, s, num_rows=m, backend="xla"))
  assert_close(out, np.asarray(xla(xq, dyq, sizes)), 1e-3)
