"""Mosaic GPU grouped GEMM kernels on a Hopper GPU, at full size (marked `gpu`).

The reference is `jax.lax.ragged_dot` on float32 copies of the bf16 inputs at
HIGHEST precision, on the GPU (NumPy float64 would take minutes at these
sizes); bf16 products are exact in float32, so it differs from float64 only by
float32 summation error, far below the tolerances here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_reference import assert_same_metadata
from pallas_kernels import config as config_lib
from pallas_kernels import metadata as metadata_lib
from pallas_kernels import metadata_kernel
from pallas_kernels.gmm_mgpu import gmm_mgpu
from pallas_kernels.tgmm_mgpu import tgmm_mgpu


def _on_hopper() -> bool:
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return False
  return device.platform == "gpu" and str(
      getattr(device, "compute_capability", "")).startswith("9")


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU")]

_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _group_sizes(rng, m_used, g, empty_every=0):
  cuts = np.sort(rng.integers(0, m_used + 1, size=g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [m_used]]))
  if empty_every:
    sizes[::empty_every] = 0  # the rows move to the padding tail
  return jnp.asarray(sizes, jnp.int32)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _gmm_ref(lhs, rhs, gs, transpose_rhs):
  rhs = rhs.astype(jnp.float32)
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  return jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs, gs,
                            precision=jax.lax.Precision.HIGHEST)


# Each kernel variant, whatever the heuristic picks for these shapes.
ONE_WARPGROUP = config_lib.GmmConfig(block_m=128, block_n=128, block_k=64,
                                     max_concurrent_steps=5)
WARP_SPECIALIZED = config_lib.GmmConfig(block_m=128, block_n=128, block_k=64,
                                        max_concurrent_steps=3, num_compute_wgs=2)
CHAINED = config_lib.GmmConfig(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                               num_compute_wgs=2, chain_items=True, epilogue_rows=64)
CLUSTERED = dataclasses.replace(WARP_SPECIALIZED, cluster_n=2)
# Consumers on the top and bottom 64 rows of a 128x256 tile, staged in 64x128 chunks.
SPLIT_ROWS = dataclasses.replace(CHAINED, block_m=64, block_n=256, split_rows=True,
                                 epilogue_rows=None, epilogue_cols=128)
# One program per (item, n-tile pair), in clusters of two.
PER_ITEM = dataclasses.replace(CLUSTERED, persistent=False)


@pytest.mark.parametrize("m,g,block_m", [(16384, 8, 128), (16384, 64, 128), (65536, 128, 128),
                                         (32768, 256, 128), (8192 + 72, 37, 64),
                                         (65536, 2047, 256)])
def test_gmm_metadata_kernel_matches_xla_ops_on_gpu(m, g, block_m):
  """The compiled Triton kernel (not the interpreter) against the XLA ops, bitwise."""
  rng = np.random.default_rng(g)
  xla_ops = jax.jit(metadata_lib.gmm_metadata, static_argnums=(1, 2))
  kernel = jax.jit(metadata_kernel.gmm_metadata, static_argnums=(1, 2))
  one_group = jnp.zeros((g,), jnp.int32).at[g // 2].set(m)
  for gs in [_group_sizes(rng, m - pad, g, empty_every)
             for pad, empty_every in ((0, 0), (301, 5), (m // 3, 2))] + [one_group]:
    assert_same_metadata(kernel(gs, m, block_m), xla_ops(gs, m, block_m))


@pytest.mark.parametrize("m,k,n,g,pad", [
    (16384, 2048, 2048, 8, 0), (16384, 1024, 4096, 64, 1000),
    (8192 + 72, 1024, 1536, 128, 301), (8192, 2048, 1024, 256, 0)])
@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("cfg", [ONE_WARPGROUP, WARP_SPECIALIZED, CHAINED, CLUSTERED,
                                 SPLIT_ROWS, PER_ITEM],
                         ids=["wg1", "ws", "chained", "clustered", "split_rows", "per_item"])
def test_gmm_full_size(m, k, n, g, pad, transpose_rhs, cfg):
  rng = np.random.default_rng(m + g)
  keys = jax.random.split(jax.random.key(m + k + n + g), 2)
  lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  shape = (g, n, k) if transpose_rhs else (g, k, n)
  rhs = jax.random.normal(keys[1], shape, jnp.bfloat16)
  gs = _group_sizes(rng, m - pad, g, empty_every=5)
  out = jax.jit(lambda a, b, c: gmm_mgpu(a, b, c, transpose_rhs=transpose_rhs,
                                         config=cfg))(lhs, rhs, gs)
  out = np.asarray(out.astype(jnp.float32))
  used = int(gs.sum())
  assert not np.isnan(out).any()
  assert (out[used:] == 0).all(), "padding rows must be exactly zero"
  ref = np.asarray(_gmm_ref(lhs, rhs, gs, transpose_rhs))
  assert _rel_err(out[:used], ref[:used]) < 1e-2


@pytest.mark.parametrize("m,k,n,g,pad", [
    (16384, 4096, 2048, 8, 0), (16384, 1024, 1024, 64, 999), (8192, 1024, 512, 256, 64)])
@pytest.mark.parametrize("out_dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("split_n", [False, True], ids=["default", "split_n"])
def test_tgmm_full_size(m, k, n, g, pad, out_dtype, tol, split_n):
  """The default config of each output dtype (bf16: two consumer warpgroups on the
  top and bottom 64 rows of a 128x256 tile), and with bf16 the consumers side by
  side instead (128x128 halves, staged in 64-row chunks)."""
  cfg = config_lib.tgmm_config(m, k, n, g, jnp.dtype(out_dtype).itemsize)
  if split_n:
    if cfg.num_compute_wgs == 1:
      pytest.skip("one consumer warpgroup")
    cfg = dataclasses.replace(cfg, block_k=128, block_n=128, split_rows=False,
                              epilogue_rows=64, epilogue_cols=None)
  rng = np.random.default_rng(m + g + 1)
  keys = jax.random.split(jax.random.key(m + k + n + g + 1), 2)
  lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  rhs = jax.random.normal(keys[1], (m, n), jnp.bfloat16)
  # NaN in the padding rows must not leak into any group.
  if pad:
    lhs, rhs = lhs.at[m - pad:].set(jnp.nan), rhs.at[m - pad:].set(jnp.nan)
  gs = _group_sizes(rng, m - pad, g, empty_every=7)
  out = jax.jit(lambda a, b, c: tgmm_mgpu(a, b, c, out_dtype=out_dtype, config=cfg))(
      lhs, rhs, gs)
  out = np.asarray(out.astype(jnp.float32))
  assert not np.isnan(out).any()
  empty = np.asarray(gs) == 0
  assert (out[empty] == 0).all()
  used = m - pad
  ref = jax.lax.ragged_dot_general(
      lhs[:used].astype(jnp.float32), rhs[:used].astype(jnp.float32), gs, _TGMM_DIMS,
      precision=jax.lax.Precision.HIGHEST)
  assert _rel_err(out, ref) < tol
