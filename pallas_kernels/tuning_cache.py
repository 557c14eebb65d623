"""Autotuned block configs on disk: one JSON file per device kind.

    {"card": ..., "jax": ..., "date": ..., "command": ...,
     "entries": {"gmm|bfloat16|2|32768|7168|2048|256": {"config": {field: value},
                 "ms": ..., "heuristic_ms": ..., "candidates": ...}, ...}}

An entry's key is (op, operand dtype, output bytes, M bucket, K, N, G), op one
of "gmm" (lhs [M, K] @ rhs [G, K, N]), "gmm_t" (rhs stored [G, N, K], the input
gradient) and "tgmm" (lhs [M, K].T @ rhs [M, N] per group). M is bucketed to the
next power of two: an M in (2^(b-1), 2^b] uses the config tuned at 2^b rows.

Lookups read the user's cache (`$JAXMOE_TUNING_DIR`, default
`~/.cache/jaxmoe/tuned_configs`), then the one shipped in this package
(`pallas_kernels/tuned_configs/`); `python -m pallas_kernels.autotune` writes the
user's. Files are read once per process (`clear()` forgets them).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re

import numpy as np

OPS = ("gmm", "gmm_t", "tgmm")
SHIPPED_DIR = pathlib.Path(__file__).parent / "tuned_configs"


def user_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("JAXMOE_TUNING_DIR")
                      or pathlib.Path.home() / ".cache" / "jaxmoe" / "tuned_configs")


def file_name(device_kind: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3.json'."""
  return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") + ".json"


def m_bucket(m: int) -> int:
  """The power of two an M is tuned at: the smallest one >= M."""
  return 1 << max(m - 1, 0).bit_length()


def key(op: str, m: int, k: int, n: int, g: int, *, dtype, out_itemsize: int) -> str:
  if op not in OPS:
    raise ValueError(f"Unknown op {op!r}; expected one of {OPS}.")
  return "|".join(map(str, (op, np.dtype(dtype).name, out_itemsize, m_bucket(m), k, n, g)))


@functools.cache
def _entries(device_kind: str) -> dict[str, dict]:
  """Shipped entries, overridden by the user's, for one device kind."""
  entries = {}
  for folder in (SHIPPED_DIR, user_dir()):
    path = folder / file_name(device_kind)
    if path.is_file():
      entries.update(read(path)["entries"])
  return entries


def lookup(op: str, m: int, k: int, n: int, g: int, *, dtype, out_itemsize: int,
           device_kind: str | None) -> dict | None:
  """The tuned config's fields for this problem, or None (no device kind, no entry)."""
  if device_kind is None:
    return None
  entry = _entries(device_kind).get(key(op, m, k, n, g, dtype=dtype,
                                        out_itemsize=out_itemsize))
  return None if entry is None else dict(entry["config"])


def clear() -> None:
  """Forgets the files read so far (after writing one, or changing JAXMOE_TUNING_DIR)."""
  _entries.cache_clear()


def read(path: os.PathLike) -> dict:
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data.get("entries"), dict):
    raise ValueError(f"{path}: not a tuning cache (expected an 'entries' object).")
  return data


def write(path: os.PathLike, data: dict) -> None:
  """Writes `data` (header and "entries") atomically, entries sorted by key."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = dict(data, entries=dict(sorted(data["entries"].items())))
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  clear()
