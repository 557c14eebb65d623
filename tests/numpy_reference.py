"""Float64 NumPy references for the grouped GEMMs and the expert MLP, test inputs and
assertions."""

from __future__ import annotations

import dataclasses

import numpy as np


def group_slices(group_sizes):
  """Yields (g, slice of rows of group g)."""
  start = 0
  for g, size in enumerate(np.asarray(group_sizes)):
    yield g, slice(start, start + int(size))
    start += int(size)


def gmm(lhs, rhs, group_sizes, transpose_rhs=False):
  lhs, rhs = np.float64(lhs), np.float64(rhs)
  if transpose_rhs:
    rhs = rhs.transpose(0, 2, 1)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  for g, rows in group_slices(group_sizes):
    out[rows] = lhs[rows] @ rhs[g]
  return out


def tgmm(lhs, rhs, group_sizes):
  lhs, rhs = np.float64(lhs), np.float64(rhs)
  out = np.zeros((len(group_sizes), lhs.shape[1], rhs.shape[1]))
  for g, rows in group_slices(group_sizes):
    out[g] = lhs[rows].T @ rhs[rows]
  return out


def grouped_mlp(x, w1, w2, group_sizes, p, b1=None, b2=None, dy=None):
  """Forward (and, with dy, every gradient) of the expert MLP in float64.

  Returns y, or (y, {"x", "w1", "w2", "scales", "b1", "b2"}) when dy is given.
  """
  x, w1, w2, p = map(np.float64, (x, w1, w2, p))
  m, hidden = x.shape
  num_groups, _, ffn = w1.shape
  b1 = np.zeros((num_groups, ffn)) if b1 is None else np.float64(b1)
  b2 = np.zeros((num_groups, hidden)) if b2 is None else np.float64(b2)
  y = np.zeros((m, hidden))
  grads = {"x": np.zeros_like(x), "w1": np.zeros_like(w1), "w2": np.zeros_like(w2),
           "scales": np.zeros_like(p), "b1": np.zeros_like(b1), "b2": np.zeros_like(b2)}
  for g, rows in group_slices(group_sizes):
    pg = p[rows, None]
    h = x[rows] @ w1[g] + b1[g]
    relu = np.maximum(h, 0.0)
    a = relu**2 * pg
    y[rows] = a @ w2[g] + b2[g] * pg
    if dy is None:
      continue
    dyg = np.float64(dy[rows])
    da = dyg @ w2[g].T
    dh = da * pg * 2 * relu
    grads["scales"][rows] = np.sum(da * relu**2, axis=1) + dyg @ b2[g]
    grads["w2"][g] = a.T @ dyg
    grads["b2"][g] = np.sum(pg * dyg, axis=0)
    grads["w1"][g] = x[rows].T @ dh
    grads["b1"][g] = np.sum(dh, axis=0)
    grads["x"][rows] = dh @ w1[g].T
  return y if dy is None else (y, grads)


def random_group_sizes(rng, num_rows, num_groups, *, num_empty=1):
  """int32 [G] summing to num_rows, with at least `num_empty` empty groups (if G > 1)."""
  num_empty = min(num_empty, num_groups - 1)
  sizes = np.zeros(num_groups, np.int64)
  filled = rng.choice(num_groups, num_groups - num_empty, replace=False)
  cuts = np.sort(rng.integers(0, num_rows + 1, len(filled) - 1))
  sizes[filled] = np.diff(np.concatenate([[0], cuts, [num_rows]]))
  return sizes.astype(np.int32)


# (name, M, G, group sizes maker) covering the cases every backend must get right.
def group_cases(rng, m):
  """Group-size patterns over M rows: random with empty groups, all rows in one
  group, and padding rows past sum(group_sizes)."""
  return {
      "random_g1": random_group_sizes(rng, m, 1),
      "random_g4_empty": random_group_sizes(rng, m, 4),
      "random_g8_two_empty": random_group_sizes(rng, m, 8, num_empty=2),
      "all_rows_in_one_group": np.array([0, 0, m, 0], np.int32),
      "padding_rows": random_group_sizes(rng, m - 7, 4),
      "all_padding": np.zeros(3, np.int32),
  }


def assert_close(actual, expected, rtol, name=""):
  """Normwise relative error below rtol, and elementwise close at rtol * max|expected|."""
  actual, expected = np.float64(actual), np.float64(expected)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  scale = max(np.max(np.abs(expected)), 1e-30)
  err = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)
  assert err <= rtol, f"{name}: normwise relative error {err:.3g} > {rtol}"
  np.testing.assert_allclose(actual, expected, rtol=0, atol=4 * rtol * scale,
                             err_msg=name)


def assert_same_metadata(got, want):
  """Two GmmMetadata (or TgmmMetadata) equal field by field, bitwise."""
  for field in dataclasses.fields(want):
    np.testing.assert_array_equal(np.asarray(getattr(got, field.name)),
                                  np.asarray(getattr(want, field.name)), err_msg=field.name)


# Blockwise FP8 (jaxmoe.fp8.BlockwiseRecipe): scale = amax / 448 per 1x128 row tile or
# 128x128 weight block, values rounded to e4m3 (ml_dtypes). The scale and the division
# are float32 as XLA computes them in `pallas_kernels.quantize` (amax / 448 becomes
# amax * float32(1 / 448), one ulp off the quotient for half the values), so that one
# input gives the same e4m3 values: otherwise about one weight in 10^5 lands on the
# other side of a rounding midpoint, which moves a whole column of h. Dequantised
# results are float64.
FP8_BLOCK, FP8_MAX = 128, 448.0


def _round(x, dtype):
  import ml_dtypes
  return np.float64(np.asarray(x).astype(getattr(ml_dtypes, dtype)))


def _quantize(tiles, axes):
  """(values as float64, float32 scales) of float32 tiles, amax over `axes`."""
  tiles = np.float32(tiles)
  amax = np.abs(tiles).max(axis=axes, keepdims=True)
  scales = np.where(amax > 0, amax * np.float32(1 / FP8_MAX), np.float32(1.0))
  return _round(tiles / scales, "float8_e4m3fn"), np.float64(scales)


def quantize_rows(x):
  """x [M, K] -> (dequantised float64 [M, K], e4m3 values as float64 [M, K], scales
  [M, K // 128])."""
  m, k = x.shape
  values, scales = _quantize(np.reshape(x, (m, k // FP8_BLOCK, FP8_BLOCK)), (2,))
  return (values * scales).reshape(m, k), values.reshape(m, k), scales[:, :, 0]


def quantize_group_columns(x, group_sizes):
  """x [M, K] float32 -> dequantised float64 [M, K] of its column tiles: one scale per
  column per 128 rows of a group, counted from the group's first row (what
  `quantize.quantize_columns` lays out); rows past sum(group_sizes) are zeros."""
  out = np.zeros(x.shape)
  for _, rows in group_slices(group_sizes):
    for start in range(rows.start, rows.stop, FP8_BLOCK):
      chunk = slice(start, min(start + FP8_BLOCK, rows.stop))
      values, scales = _quantize(x[chunk], (0,))
      out[chunk] = values * scales
  return out


def quantize_blocks(w):
  """w [G, K, N] -> (dequantised float64 [G, K, N], values, scales [G, K//128, N//128])."""
  g, k, n = w.shape
  blocks = np.reshape(w, (g, k // FP8_BLOCK, FP8_BLOCK, n // FP8_BLOCK, FP8_BLOCK))
  values, scales = _quantize(blocks, (2, 4))
  return ((values * scales).reshape(g, k, n), values.reshape(g, k, n),
          scales[:, :, 0, :, 0])


def fp8_grouped_mlp(x, w1, w2, group_sizes, p, b1=None, dy=None, h_dtype=None,
                    wgrad_dtype="bfloat16"):
  """The FP8 expert MLP (`jaxmoe/fp8_mlp.py`) in float64, quantising where it does:
  x, w1, w2 and a = relu(h)**2 * p forward; dy and dh backward. The weight gradients
  take the dequantised a and x and the unquantised dy and dh, rounded to bf16 (the
  recipe's wgrad_dtype "bfloat16"), or x, a, dy and dh themselves (as float32)
  quantised by column tiles of each group ("float8_e4m3fn"); everything else is exact, except h and dh, rounded to
  `h_dtype` (e.g. "bfloat16": the kernels store h, and dh, in x's dtype) when given.

  Returns y, or (y, {"x", "w1", "w2", "scales", "b1"}) when dy is given.
  """
  p = np.float64(p)
  m, hidden = x.shape
  num_groups, _, ffn = w1.shape
  xd, w1d, w2d = quantize_rows(x)[0], quantize_blocks(w1)[0], quantize_blocks(w2)[0]
  b1 = np.zeros((num_groups, ffn)) if b1 is None else np.float64(b1)
  h = np.zeros((m, ffn))
  for g, rows in group_slices(group_sizes):
    h[rows] = xd[rows] @ w1d[g] + b1[g]
  if h_dtype is not None:
    h = _round(h, h_dtype)
  relu = np.maximum(h, 0.0)
  ad = quantize_rows(relu**2 * p[:, None])[0]
  y = gmm(ad, w2d, group_sizes)
  if dy is None:
    return y
  da = gmm(quantize_rows(dy)[0], w2d, group_sizes, transpose_rhs=True)
  dh = da * p[:, None] * 2 * relu
  if h_dtype is not None:
    dh = _round(dh, h_dtype)  # the dgrad epilogue writes dh in h's dtype
  dx = gmm(quantize_rows(dh)[0], w1d, group_sizes, transpose_rhs=True)
  if wgrad_dtype == "bfloat16":
    wgrad_operand = lambda a: _round(a, "bfloat16")  # noqa: E731
    x_kept, a_kept = xd, ad
  else:
    wgrad_operand = lambda a: quantize_group_columns(np.float32(a), group_sizes)  # noqa: E731
    x_kept, a_kept = x, relu**2 * p[:, None]
  wgrad = lambda a, b: tgmm(wgrad_operand(a), wgrad_operand(b), group_sizes)  # noqa: E731
  grads = {"x": dx, "w1": wgrad(x_kept, dh), "w2": wgrad(a_kept, dy),
           "scales": np.sum(da * relu**2, axis=1),
           "b1": np.stack([dh[rows].sum(axis=0) for _, rows in group_slices(group_sizes)])}
  return y, grads
