"""Digests of the Mosaic GPU kernels that the benchmark shapes lower to, on a CPU.

Each line: a pass at a benchmark shape, how many Mosaic GPU kernels it lowers to,
and a digest of their MLIR (without source locations), lowered for an H100. Equal
digests at two commits mean the GPU runs the same kernels, so a refactor can be
checked without a GPU:

    .venv/bin/python tools/kernel_ir_digest.py > /tmp/after.txt
    git stash; .venv/bin/python tools/kernel_ir_digest.py > /tmp/before.txt; git stash pop
    diff /tmp/before.txt /tmp/after.txt

The tuning cache is read as on an H100, so a changed cache entry changes a digest.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.mosaic.gpu import core as mgpu_core  # noqa: E402

import jaxmoe  # noqa: E402
import pallas_kernels  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
from cuda_lowering import lower_for_h100  # noqa: E402
from pallas_kernels import activation  # noqa: E402

_modules: list[str] = []
_serde = mgpu_core._run_serde_pass  # private: the last step before a kernel is serialised


def _record_module(module, *, serialize, ir_version=None):
  if serialize:  # Without the dump name: a counter of the kernels lowered so far.
    _modules.append(re.sub(r'mosaic_gpu.dump_basename = "[^"]*"', "",
                           module.operation.get_asm(enable_debug_info=False)))
  return _serde(module, serialize=serialize, ir_version=ir_version)


def _spec(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def passes():
  """(name, fn, abstract args) of every kernel pass at the benchmark shapes."""
  for m, k, n, g in SHAPES:
    sizes, where = _spec((g,), jnp.int32), f"{m},{k},{n},{g}"
    yield (f"gmm {where}", lambda a, b, s: pallas_kernels.gmm(a, b, s, backend="mosaic_gpu"),
           (_spec((m, k)), _spec((g, k, n)), sizes))
    yield (f"gmm_t {where}", lambda a, b, s: pallas_kernels.gmm(
        a, b, s, transpose_rhs=True, backend="mosaic_gpu"),
           (_spec((m, k)), _spec((g, n, k)), sizes))
    yield (f"tgmm {where}", lambda a, b, s: pallas_kernels.tgmm(a, b, s, backend="mosaic_gpu"),
           (_spec((m, k)), _spec((m, n)), sizes))
  m, h, f, g = 16384, 2048, 4096, 8
  for fused in (True, False):
    def loss(x, w1, w2, sizes, p, fused=fused):
      y = jaxmoe.grouped_mlp(x, w1, w2, sizes, p, backend="mosaic_gpu", fused=fused)
      return jnp.sum(y.astype(jnp.float32) ** 2)
    yield (f"mlp fwd+bwd fused={fused} {m},{h},{f},{g}", jax.grad(loss, argnums=(0, 1, 2)),
           (_spec((m, h)), _spec((g, h, f)), _spec((g, f, h)), _spec((g,), jnp.int32),
            _spec((m,), jnp.float32)))
  yield (f"srelu fwd {m},{f}", lambda x, p: activation.scaled_srelu(x, p, backend="mosaic_gpu"),
         (_spec((m, f)), _spec((m,), jnp.float32)))


def main():
  mgpu_core._run_serde_pass = _record_module
  for name, fn, args in passes():
    _modules.clear()
    lower_for_h100(fn, *args)
    digest = hashlib.sha1("\n".join(_modules).encode()).hexdigest()[:16]
    print(f"{name}: {len(_modules)} kernels {digest}", flush=True)


if __name__ == "__main__":
  main()
