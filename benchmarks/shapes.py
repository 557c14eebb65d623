"""Named grouped GEMM shapes and group sizes shared by the JAX and torch benchmarks.

NumPy only, so that the torch benchmark (a separate process) draws the very same
group sizes.
"""

from __future__ import annotations

import numpy as np

# (M, K, N, G): Mixtral-like (G=8), fine-grained (G=64..256) experts.
SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (16384, 4096, 2048, 8),
    (16384, 2048, 4096, 8),
    (16384, 4096, 1024, 64),
    (16384, 1024, 4096, 64),
    (65536, 2048, 1536, 128),
    (32768, 7168, 2048, 256),
)


def random_group_sizes(m: int, g: int, seed: int = 0) -> np.ndarray:
  """int32 [g] summing to m: g-1 sorted uniform cut points (empty groups possible)."""
  rng = np.random.default_rng(seed + 1000 * g + m)
  cuts = np.sort(rng.integers(0, m + 1, size=g - 1))
  bounds = np.concatenate([[0], cuts, [m]])
  return np.diff(bounds).astype(np.int32)


def flops(m: int, k: int, n: int, passes: int = 1) -> float:
  return 2.0 * m * k * n * passes
