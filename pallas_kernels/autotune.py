"""Autotuner for the grouped GEMM block configs: sweeps candidates on the GPU, writes a cache.

    python -m pallas_kernels.autotune                       # the MODELS at two token counts
    python -m pallas_kernels.autotune --models olmoe --tokens 4096
    python -m pallas_kernels.autotune --gemms 16384x4096x2048x8   # M x K x N x G
    python -m pallas_kernels.autotune --check --tokens 1536      # default vs best, no write

For each problem (op, M, K, N, G) — op "gmm" (x @ w), "gmm_t" (dy @ w.T, the input
gradient) or "tgmm" (x.T @ dy per group, the weight gradient) — every candidate config
that fits is compiled, run once and compared with the heuristic's output (a config
that computes something else is dropped), timed, and the fastest three are timed again
against each other and the heuristic in interleaved rounds; the winner goes into the
cache under (op, dtype, output bytes, M bucket, K, N, G) for this device kind
(`tuning_cache`). Inputs are random normal, group sizes a random draw (`group_sizes`).

An expert MLP of hidden size H, FFN size F, G experts and M = tokens * top_k rows runs
six grouped GEMMs (`mlp_problems`); a plain grouped GEMM x [M, K] @ w [G, K, N] runs
three (`gemm_problems`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import statistics
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import config as config_lib
from pallas_kernels import tuning_cache
from pallas_kernels.gmm_mgpu import gmm_mgpu
from pallas_kernels.tgmm_mgpu import tgmm_mgpu

# name -> (hidden H, expert FFN F, experts G, top_k): the expert MLPs of public MoE models.
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v3": (7168, 2048, 256, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
}
TOKENS = (2048, 8192)


class Problem(NamedTuple):
  op: str  # one of tuning_cache.OPS
  m: int
  k: int  # contracted size of gmm / gmm_t; the output rows of tgmm
  n: int
  g: int

  def __str__(self):
    return f"{self.op}({self.m}x{self.k}x{self.n}, G={self.g})"

  @property
  def flops(self) -> float:
    return 2.0 * self.m * self.k * self.n


def gemm_problems(m: int, k: int, n: int, g: int) -> list[Problem]:
  """The three passes of x [M, K] @ w [G, K, N]: forward, input and weight gradient."""
  return [Problem("gmm", m, k, n, g), Problem("gmm_t", m, n, k, g), Problem("tgmm", m, k, n, g)]


def mlp_problems(hidden: int, ffn: int, experts: int, top_k: int, tokens: int) -> list[Problem]:
  """The six grouped GEMMs of the expert MLP's forward and backward (FC1 = x @ w1 [G, H, F],
  FC2 = a @ w2 [G, F, H]): both passes of each, as `gemm_problems` of FC1 and FC2."""
  m = tokens * top_k
  return gemm_problems(m, hidden, ffn, experts) + gemm_problems(m, ffn, hidden, experts)


def group_sizes(m: int, g: int, seed: int = 0) -> np.ndarray:
  """int32 [g] summing to m: a multinomial draw of m rows over g experts with
  Dirichlet(1) probabilities (as skewed as uniform random cut points)."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(m, rng.dirichlet(np.ones(g))).astype(np.int32)


def _gmm_candidates(p: Problem) -> list:
  ws = dict(block_m=128, block_n=128, block_k=64, num_compute_wgs=2)
  make = [
      lambda: config_lib.GmmConfig(**ws, max_concurrent_steps=4, grid_block_n=8,
                                   chain_items=True, epilogue_rows=64),
      lambda: config_lib.GmmConfig(**ws, max_concurrent_steps=4, grid_block_n=4,
                                   chain_items=True, epilogue_rows=64),
      lambda: config_lib.GmmConfig(**ws, max_concurrent_steps=3, grid_block_n=8),
      lambda: config_lib.GmmConfig(**ws, max_concurrent_steps=3, grid_block_n=4),
      lambda: config_lib.GmmConfig(**ws, max_concurrent_steps=3, grid_block_n=8, cluster_n=2),
      lambda: config_lib.GmmConfig(**ws, max_concurrent_steps=3, grid_block_n=8,
                                   persistent=False),
      lambda: config_lib.GmmConfig(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4,
                                   grid_block_n=8, num_compute_wgs=2, split_rows=True,
                                   epilogue_cols=128),
      lambda: config_lib.GmmConfig(128, 192, 64, 4, 4),
  ]
  return [config_lib.heuristic_gmm_config(p.m, p.k, p.n, p.g)] + _valid(make, p)


def _tgmm_candidates(p: Problem) -> list:
  ws = dict(block_m=64, warp_specialized=True)
  make = [
      lambda: config_lib.TgmmConfig(**ws, block_k=64, block_n=256, max_concurrent_steps=4,
                                    grid_block_n=8, num_compute_wgs=2, split_rows=True,
                                    epilogue_cols=128),
      lambda: config_lib.TgmmConfig(**ws, block_k=64, block_n=256, max_concurrent_steps=4,
                                    grid_block_n=4, num_compute_wgs=2, split_rows=True,
                                    epilogue_cols=128),
      lambda: config_lib.TgmmConfig(**ws, block_k=128, block_n=128, max_concurrent_steps=4,
                                    grid_block_n=8, num_compute_wgs=2, epilogue_rows=64),
      lambda: config_lib.TgmmConfig(**ws, block_k=128, block_n=128, max_concurrent_steps=5,
                                    grid_block_n=4),
      lambda: config_lib.TgmmConfig(128, 128, 128, 3, 4, warp_specialized=True),
  ]
  return [config_lib.heuristic_tgmm_config(p.m, p.k, p.n, p.g)] + _valid(make, p)


def _valid(makers, p: Problem) -> list:
  """The configs that build and fit the problem (bf16 in and out)."""
  out = []
  for make in makers:
    try:
      cfg = make()
      cfg.validate_for(p.k, p.n)
    except (ValueError, NotImplementedError):
      continue
    out.append(cfg)
  return out


def candidates(p: Problem) -> list:
  """The heuristic's config first, then the other candidates that fit, without repeats."""
  configs = _tgmm_candidates(p) if p.op == "tgmm" else _gmm_candidates(p)
  return list(dict.fromkeys(configs))


def _inputs(p: Problem, seed: int = 0):
  """Random bf16 operands and group sizes of the problem."""
  ka, kb = jax.random.split(jax.random.key(seed))
  gs = jnp.asarray(group_sizes(p.m, p.g, seed))
  lhs = jax.random.normal(ka, (p.m, p.k), jnp.bfloat16)
  rhs_shape = {"gmm": (p.g, p.k, p.n), "gmm_t": (p.g, p.n, p.k), "tgmm": (p.m, p.n)}[p.op]
  return lhs, jax.random.normal(kb, rhs_shape, jnp.bfloat16), gs


def _kernel(p: Problem, cfg):
  if p.op == "tgmm":
    return jax.jit(functools.partial(tgmm_mgpu, config=cfg))
  return jax.jit(functools.partial(gmm_mgpu, transpose_rhs=p.op == "gmm_t", config=cfg))


def time_ms(fn, args, *, calls: int | None = None, repeats: int = 3,
            min_ms: float = 25.0) -> float:
  """Median over `repeats` of the mean time of `calls` back-to-back calls of fn(*args).

  The host dispatches the calls and waits once, so dispatch overlaps the GPU (one
  `block_until_ready` per sub-millisecond call under-reads by ~25%). `calls=None`:
  as many as take about `min_ms`, from a timed call after the warm-up.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  if calls is None:
    calls = max(3, min(200, int(min_ms / max((time.perf_counter() - start) * 1e3, 1e-3))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times) * 1e3


@dataclasses.dataclass
class Result:
  problem: Problem
  best: object  # the winning config
  ms: dict  # config -> median ms of the final interleaved rounds
  heuristic: object
  default: object  # what gmm_config / tgmm_config returned before this sweep
  dropped: list  # (config, why)
  candidates: int  # configs compiled, the dropped ones included

  def ratio(self, cfg) -> float:
    """Time of cfg over the best's (1.0 = as fast as the best)."""
    return self.ms[cfg] / self.ms[self.best]

  def entry(self) -> dict:
    return {"config": dataclasses.asdict(self.best), "ms": round(self.ms[self.best], 5),
            "heuristic_ms": round(self.ms[self.heuristic], 5),
            "tflops": round(self.problem.flops / self.ms[self.best] / 1e9, 1),
            "candidates": self.candidates}

  def record(self) -> dict:
    """One line of the report: the problem, the best TF/s and each pick's time over the best's."""
    p = self.problem
    return {"op": p.op, "M": p.m, "K": p.k, "N": p.n, "G": p.g,
            "best_tflops": self.entry()["tflops"],
            "heuristic_x": round(self.ratio(self.heuristic), 4),
            "default_x": round(self.ratio(self.default), 4),
            "best": str(self.best), "default": str(self.default)}


def _default_config(p: Problem):
  if p.op == "tgmm":
    return config_lib.tgmm_config(p.m, p.k, p.n, p.g)
  return config_lib.gmm_config(p.m, p.k, p.n, p.g, transpose_rhs=p.op == "gmm_t")


def sweep(p: Problem, *, finalists: int = 3, rounds: int = 3, workers: int = 4,
          log=print) -> Result:
  """Times every candidate of `p` on the current GPU; see the module docstring."""
  default = _default_config(p)
  configs = list(dict.fromkeys(candidates(p) + [default]))
  heuristic = configs[0]
  args = _inputs(p)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    compiled = dict(zip(configs, pool.map(lambda c: _compile(p, c, args), configs)))
  dropped = [(c, fn) for c, fn in compiled.items() if isinstance(fn, str)]
  fns = {c: fn for c, fn in compiled.items() if not isinstance(fn, str)}
  if heuristic not in fns:
    raise RuntimeError(f"{p}: the heuristic's config failed: {compiled[heuristic]}")
  expected = fns[heuristic](*args)
  for c in list(fns):
    if not bool(_close(fns[c](*args), expected)):
      dropped.append((c, "output differs from the heuristic config's"))
      del fns[c]
  first = {c: time_ms(fn, args) for c, fn in fns.items()}
  final = sorted(first, key=first.get)[:finalists]
  final += [c for c in (heuristic, default) if c in fns and c not in final]
  times = {c: [] for c in final}
  for r in range(rounds):
    for c in final[r % len(final):] + final[:r % len(final)]:
      times[c].append(time_ms(fns[c], args))
  ms = {c: statistics.median(t) for c, t in times.items()}
  best = min(ms, key=ms.get)
  for c, why in dropped:
    log(f"    dropped {c}: {why[:160]}")
  return Result(p, best, ms, heuristic, default if default in ms else heuristic, dropped,
                len(configs))


@jax.jit
def _close(out: jax.Array, expected: jax.Array) -> jax.Array:
  """np.allclose(out, expected, rtol=2e-2, atol=2e-2 * max|expected|), on the device:
  a tgmm output of G=256 experts is gigabytes, too many to compare on the host."""
  out, expected = out.astype(jnp.float32), expected.astype(jnp.float32)
  atol = 2e-2 * jnp.max(jnp.abs(expected))
  return jnp.all(jnp.abs(out - expected) <= atol + 2e-2 * jnp.abs(expected))


def _compile(p: Problem, cfg, args):
  """The compiled kernel, or the reason it failed to compile (a string)."""
  try:
    return _kernel(p, cfg).lower(*args).compile()
  except Exception as e:  # noqa: BLE001 -- a candidate may fail to lower; say why
    return f"{type(e).__name__}: {e}"


def _parse_gemm(text: str) -> tuple[int, int, int, int]:
  try:
    m, k, n, g = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--gemms {text!r}: expected MxKxNxG, e.g. "
                                     "16384x4096x2048x8") from None
  return m, k, n, g


def problems_from_args(args, parser) -> list[Problem]:
  """The problems the command line names, without repeats, in order."""
  unknown = set(args.models) - set(MODELS)
  if unknown:
    parser.error(f"unknown --models {sorted(unknown)}; expected some of {sorted(MODELS)}")
  out = [p for name in args.models for t in args.tokens for p in mlp_problems(*MODELS[name], t)]
  out += [p for gemm in args.gemms for p in gemm_problems(*gemm)]
  return list(dict.fromkeys(out))


def _csv(kind):
  return lambda text: [kind(v) for v in text.split(",") if v]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", type=_csv(str), default=list(MODELS),
                      help=f"comma-separated, of {','.join(MODELS)} (default: all; '' for none)")
  parser.add_argument("--tokens", type=_csv(int), default=list(TOKENS),
                      help="tokens per device for the models (M = tokens * top_k)")
  parser.add_argument("--gemms", type=_csv(_parse_gemm), default=[],
                      help="grouped GEMMs MxKxNxG, comma-separated (their three passes)")
  parser.add_argument("--out", default=None, help="cache file (default: the user's cache "
                      "for this device, tuning_cache.user_dir())")
  parser.add_argument("--check", action="store_true",
                      help="time the current default against the sweep's best; write nothing")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="stop starting new problems after this many seconds")
  parser.add_argument("--skip-cached", action="store_true",
                      help="leave out problems that --out already holds")
  parser.add_argument("--compile-workers", type=int, default=4,
                      help="threads compiling a problem's candidates (1: one at a time)")
  parser.add_argument("--report", default=None,
                      help="also write each problem's result (JSON records) to this file")
  args = parser.parse_args(argv)
  problems = problems_from_args(args, parser)
  device = jax.devices()[0]
  if device.platform != "gpu":
    parser.error(f"the autotuner times kernels on a GPU; this process has {device}")
  kind = device.device_kind
  path = args.out or tuning_cache.user_dir() / tuning_cache.file_name(kind)
  cache = {"entries": {}}
  try:
    cache = tuning_cache.read(path)
  except FileNotFoundError:
    pass
  cache.update(card=kind, jax=jax.__version__, date=datetime.date.today().isoformat(),
               command=" ".join(["python -m pallas_kernels.autotune"] + sys.argv[1:]))
  log = functools.partial(print, flush=True)
  report = {k: cache[k] for k in ("card", "jax", "date", "command")} | {"records": []}
  start = time.perf_counter()
  for i, p in enumerate(problems):
    key = tuning_cache.key(p.op, p.m, p.k, p.n, p.g, dtype=jnp.bfloat16, out_itemsize=2)
    if args.skip_cached and key in cache["entries"]:
      continue
    if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
      log(f"budget of {args.budget_s:.0f} s spent: {len(problems) - i} problems left")
      break
    try:
      r = sweep(p, workers=args.compile_workers, log=log)
    except RuntimeError as e:
      log(f"[{i + 1}/{len(problems)}] {p}: skipped: {e}")
      continue
    log(f"[{i + 1}/{len(problems)}] {p}: best {r.entry()['tflops']} TF/s {r.best}; "
        f"heuristic {r.ratio(r.heuristic):.3f}x, default {r.ratio(r.default):.3f}x the best's "
        f"time ({len(r.ms)} finalists, {r.entry()['candidates']} candidates, "
        f"{time.perf_counter() - start:.0f} s)")
    if not args.check:
      cache["entries"][key] = r.entry()
      tuning_cache.write(path, cache)
    if args.report:
      report["records"].append(r.record())
      with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
  if not args.check:
    log(f"wrote {path}")


if __name__ == "__main__":
  main()
