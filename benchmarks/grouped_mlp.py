"""Expert MLP benchmark: fused vs unfused kernels vs `ragged_dot` vs a dense einsum.

    y = (relu(x_g @ w1_g)**2 * p) @ w2_g      per expert g, bf16, random group sizes

Implementations: "fused" (`grouped_mlp(backend="mosaic_gpu", fused=True)`),
"unfused" (the same kernels with standalone SReLU kernels), "ragged_dot"
(`backend="xla"`), and "dense_einsum": equal group sizes as a batched einsum [G, M/G, H],
the upper reference. Passes: fwd, and fwd+bwd through `jax.vjp` with a random
cotangent, returning the gradients of x, w1, w2 and the scales. All implementations
and passes of a shape are timed in turn, in 5 interleaved rounds
(`timing.interleaved_ms`: 10 back-to-back calls, one wait, median of 3 per round).

    PYTHONPATH=. python benchmarks/grouped_mlp.py [--quick | --shapes 0,2] [--out FILE]

Writes benchmarks/results/grouped_mlp.json after each shape (with "complete": false
until the last one is done, so a run cut short keeps what it measured) and prints a
table of ms and ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import random_group_sizes  # noqa: E402
from timing import interleaved_ms  # noqa: E402

import jaxmoe  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "grouped_mlp.json")
# (tokens * top_k, H, F, G) of the expert MLP benchmark.
SHAPES = ((16384, 4096, 2048, 8), (16384, 4096, 1024, 64), (32768, 7168, 2048, 256))


def dense_einsum_mlp(x, w1, w2, group_sizes, scales):
  """Equal groups as a batched einsum: the reference a grouped MLP can at best match."""
  del group_sizes
  g, h, _ = w1.shape
  xg = x.reshape(g, -1, h)
  # bf16 in, bf16 out (f32 accumulation inside): a float32 result type would make
  # the backward run float32 GEMMs.
  hid = jnp.einsum("gmh,ghf->gmf", xg, w1).astype(jnp.float32)
  relu = jnp.maximum(hid, 0.0)
  a = (relu * relu * scales.reshape(g, -1, 1)).astype(x.dtype)
  return jnp.einsum("gmf,gfh->gmh", a, w2).reshape(x.shape)


IMPLS = {
    "fused": lambda *a: jaxmoe.grouped_mlp(*a, backend="mosaic_gpu", fused=True),
    "unfused": lambda *a: jaxmoe.grouped_mlp(*a, backend="mosaic_gpu", fused=False),
    "ragged_dot": lambda *a: jaxmoe.grouped_mlp(*a, backend="xla"),
    "dense_einsum": dense_einsum_mlp,
}


def inputs(m, h, f, g, key=0):
  keys = jax.random.split(jax.random.key(key), 5)
  x = jax.random.normal(keys[0], (m, h), jnp.bfloat16)
  w1 = (jax.random.normal(keys[1], (g, h, f)) * h**-0.5).astype(jnp.bfloat16)
  w2 = (jax.random.normal(keys[2], (g, f, h)) * f**-0.5).astype(jnp.bfloat16)
  scales = jax.random.uniform(keys[3], (m,), jnp.float32)
  dy = jax.random.normal(keys[4], (m, h), jnp.bfloat16)
  return x, w1, w2, scales, dy


def bench_shape(m, h, f, g, log) -> list[dict]:
  """ms per call of every implementation and pass, timed in interleaved rounds."""
  x, w1, w2, scales, dy = inputs(m, h, f, g)
  random_gs = jnp.asarray(random_group_sizes(m, g))
  equal_gs = jnp.full((g,), m // g, jnp.int32)
  runs, records = {}, []
  for impl, mlp in IMPLS.items():
    gs = equal_gs if impl == "dense_einsum" else random_gs
    fwd = jax.jit(lambda x, w1, w2, p, mlp=mlp, gs=gs: mlp(x, w1, w2, gs, p))

    @jax.jit
    def fwd_bwd(x, w1, w2, p, dy, mlp=mlp, gs=gs):
      y, pull = jax.vjp(lambda *a: mlp(*a[:3], gs, a[3]), x, w1, w2, p)
      return y, pull(dy)

    for name, fn, args in (("fwd", fwd, (x, w1, w2, scales)),
                           ("fwd+bwd", fwd_bwd, (x, w1, w2, scales, dy))):
      try:
        jax.block_until_ready(fn(*args))
        runs[(impl, name)] = (fn, args)
      except Exception as e:  # noqa: BLE001 -- report what does not run (OOM, unsupported)
        log(f"  {impl} {name}: failed {type(e).__name__}: {str(e)[:300]}")
        records.append({"tokens": m, "H": h, "F": f, "G": g, "pass": name, "impl": impl,
                        "ms": None})
  for (impl, name), ms in interleaved_ms(runs, calls=10).items():
    log(f"  {impl:12} {name:8} {ms:.3f} ms")
    records.append({"tokens": m, "H": h, "F": f, "G": g, "pass": name, "impl": impl,
                    "ms": round(ms, 3)})
  return records


def print_table(records):
  print(f"{'tokens,H,F,G':24} {'pass':8} {'fused':>8} {'unfused':>8} {'ragged':>8} "
        f"{'dense':>8} {'fus/unf':>8} {'dense/fus':>9} {'ragged/fus':>10}")
  keys = sorted({(r["tokens"], r["H"], r["F"], r["G"], r["pass"]) for r in records},
                key=lambda k: (k[3], k[4]))
  for key in keys:
    ms = {r["impl"]: r["ms"] for r in records
          if (r["tokens"], r["H"], r["F"], r["G"], r["pass"]) == key}
    ratio = lambda a, b: (f"{ms[a] / ms[b]:.2f}" if ms.get(a) and ms.get(b) else "-")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"{str(key[:4]):24} {key[4]:8} {fmt(ms.get('fused')):>8} {fmt(ms.get('unfused')):>8} "
          f"{fmt(ms.get('ragged_dot')):>8} {fmt(ms.get('dense_einsum')):>8} "
          f"{ratio('unfused', 'fused'):>8} {ratio('dense_einsum', 'fused'):>9} "
          f"{ratio('ragged_dot', 'fused'):>10}")


def parse_shapes(text: str) -> tuple:
  """'0,2' -> those entries of SHAPES; ValueError naming the valid indices otherwise."""
  try:
    return tuple(SHAPES[int(i)] for i in text.split(","))
  except (ValueError, IndexError):
    raise ValueError(f"--shapes takes indices into {len(SHAPES)} shapes (0-{len(SHAPES) - 1}, "
                     f"comma-separated), got {text!r}") from None


def write_results(path: str, records: list[dict], complete: bool) -> None:
  device = jax.devices()[0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"card": device.device_kind, "jax": jax.__version__,
               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
               "complete": complete, "records": records}, f, indent=1)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="only the first shape")
  p.add_argument("--shapes", help="comma-separated indices into SHAPES (default: all)")
  p.add_argument("--out", default=RESULTS)
  args = p.parse_args()
  selected = "0" if args.quick else args.shapes
  try:
    shapes = parse_shapes(selected) if selected else SHAPES
  except ValueError as e:
    p.error(str(e))
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  records = []
  for i, shape in enumerate(shapes):
    log(f"{shape}")
    records += bench_shape(*shape, log)
    write_results(args.out, records, complete=i == len(shapes) - 1)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print_table(records)


if __name__ == "__main__":
  main()
