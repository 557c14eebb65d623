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
