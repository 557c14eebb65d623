"""Expert parallelism benchmark: MoELayer training step on 1 device vs N devices.

The same global batch (tokens) and the same layer run (a) on one device without a
mesh and (b) on N devices with `mesh = (expert=N)`: the experts split N ways, the
tokens split N ways, rows exchanged with the "ragged" and the "padded" collective.
A step is `jax.value_and_grad` of a nonlinear loss over all parameters and the
input (the default offload policy on), timed with back-to-back calls (timing.py).

Each configuration runs in its own subprocess, so that the peak memory reported by
the allocator (`peak_bytes_in_use` per device) belongs to that configuration alone
and a failure (out of memory, a collective the backend lacks) only costs its row.
XLA's own figure per device (arguments + outputs + temporaries of the compiled
step, from `memory_analysis()`) is reported beside it; it is the one available on CPU.

    PYTHONPATH=. python benchmarks/expert_parallel.py            # all GPUs (N >= 2)
    PYTHONPATH=. python benchmarks/expert_parallel.py --small    # CPU, 2 forced devices

Writes benchmarks/results/expert_parallel.json (with --small: expert_parallel_small.json
in the temp folder, to keep CPU figures out of the results) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# Default: the (M = tokens * top_k = 16384, H 4096, F 1024, G 64) shape of
# benchmarks/shapes.py as a layer: 2 GiB of f32 expert weights, so that splitting
# the experts shows in memory, and a single-GPU baseline that fits an 80 GB H100
# even if the grouped GEMMs fall back to XLA's ragged_dot.
FULL = dict(tokens=8192, hidden=4096, ffn=1024, experts=64, top_k=2, steps=10)
SMALL = dict(tokens=256, hidden=64, ffn=128, experts=8, top_k=2, steps=3)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true",
                 help="tiny sizes on CPU with forced host devices (a smoke run)")
  p.add_argument("--devices", type=int, default=None,
                 help="N for the parallel runs (default: all GPUs; 2 with --small)")
  for name in FULL:
    p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
  p.add_argument("--collectives", default=None,
                 help="comma-separated collectives for the N-device runs (default: "
                      "ragged,padded; padded with --small: XLA:CPU has no ragged)")
  p.add_argument("--offload", choices=("default", "none"), default="default",
                 help="residual placement: the default offload policy or all on device")
  p.add_argument("--backend", default="auto", help="grouped GEMM backend")
  p.add_argument("--out", default=None, help="results JSON path")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one config
  args = p.parse_args(argv)
  if args.collectives is None:
    args.collectives = "padded" if args.small else "ragged,padded"
  sizes = SMALL if args.small else FULL
  for name, default in sizes.items():
    if getattr(args, name) is None:
      setattr(args, name, default)
  return args


def child_env(args) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  if args.small:
    env["JAX_PLATFORMS"] = "cpu"
    n = args.devices or 2
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
  return env


def run_one(args, devices: int, collective: str) -> dict:
  """In the child: build, compile and time one configuration; returns its record."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxmoe
  sys.path.insert(0, HERE)
  from timing import time_ms

  if jax.device_count() < devices:
    raise RuntimeError(f"need {devices} devices, have {jax.device_count()}")
  mesh = None
  if devices > 1:
    mesh = jax.make_mesh((devices,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
  offload = {} if args.offload == "default" else dict(offload_names=())
  layer = jaxmoe.MoELayer(
      args.hidden, args.ffn, args.experts, args.top_k, backend=args.backend,
      mesh=mesh, data_axis=None, collective=collective if mesh else "auto",
      rngs=nnx.Rngs(0), **offload)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (args.tokens, args.hidden), jnp.bfloat16)
  if mesh is not None:
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    # Nonlinear in y: a linear loss would let XLA drop the forward (DESIGN.md).
    return jnp.mean(y.astype(jnp.float32) ** 2) + 0.01 * aux["load_balancing_loss"]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(state, x).compile()
  analysis = compiled.memory_analysis()
  xla_bytes = None
  if analysis is not None:
    xla_bytes = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                    + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  calls = max(1, args.steps)
  ms = time_ms(compiled, state, x, calls=calls, repeats=3)
  peaks = []
  for d in jax.devices()[:devices]:
    stats = d.memory_stats() or {}
    peaks.append(stats.get("peak_bytes_in_use"))
  return dict(devices=devices, mesh=f"expert={devices}" if mesh else "none",
              collective=collective if mesh else "none", tokens=args.tokens,
              H=args.hidden, F=args.ffn, E=args.experts, top_k=args.top_k,
              offload=args.offload, backend=args.backend, step_ms=round(ms, 3),
              tokens_per_s=round(args.tokens / ms * 1e3, 1),
              peak_bytes_per_device=peaks, xla_bytes_per_device=xla_bytes,
              card=jax.devices()[0].device_kind, jax=jax.__version__)


def spawn(args, devices: int, collective: str, log) -> dict:
  """Runs one configuration in a subprocess; a failure becomes a record with "error"."""
  argv = [a for a in sys.argv[1:]]
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one",
         f"{devices}:{collective}"]
  if args.small and "--small" not in argv:
    cmd.append("--small")
  log(f"  running devices={devices} collective={collective} ...")
  proc = subprocess.run(cmd, env=child_env(args), capture_output=True, text=True,
                        cwd=REPO)
  for line in proc.stdout.splitlines():
    if line.startswith("RECORD "):
      return json.loads(line[len("RECORD "):])
  tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
  log(f"  failed (rc={proc.returncode}):\n{tail}")
  return dict(devices=devices, collective=collective, error=tail[-600:])


def gib(x) -> str:
  return "-" if x is None else f"{x / 2**30:.2f}"


def table(records) -> str:
  base = next((r for r in records if r.get("devices") == 1 and "error" not in r), None)
  head = ("| devices | collective | step ms | tokens/s | vs 1 device | peak GiB/device "
          "(max) | XLA GiB/device |")
  lines = [head, "|---|---|---|---|---|---|---|"]
  for r in records:
    if "error" in r:
      lines.append(f"| {r['devices']} | {r['collective']} | failed | | | | |")
      continue
    peaks = [p for p in r["peak_bytes_per_device"] if p is not None]
    speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
    lines.append(
        f"| {r['devices']} | {r['collective']} | {r['step_ms']:.2f} | "
        f"{r['tokens_per_s']:.0f} | {speed} | {gib(max(peaks) if peaks else None)} | "
        f"{gib(r['xla_bytes_per_device'])} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.one:
    devices, collective = args.one.split(":")
    try:
      record = run_one(args, int(devices), collective)
    except Exception:  # noqa: BLE001 -- reported by the parent
      traceback.print_exc()
      sys.exit(1)
    print("RECORD " + json.dumps(record), flush=True)
    return

  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  n = args.devices
  if n is None:
    if args.small:
      n = 2
    else:
      import jax  # Only to count GPUs; the runs are in subprocesses.
      n = len([d for d in jax.devices() if d.platform == "gpu"])
  if n < 2:
    sys.exit(f"expert parallelism needs at least 2 devices, found {n} "
             "(use --small for a CPU run with forced host devices)")
  log(f"tokens={args.tokens} H={args.hidden} F={args.ffn} E={args.experts} "
      f"top_k={args.top_k} offload={args.offload}; 1 device vs {n}")
  records = [spawn(args, 1, "none", log)]
  for collective in args.collectives.split(","):
    records.append(spawn(args, n, collective.strip(), log))
  ok = next((r for r in records if "error" not in r), {})
  out = args.out or (os.path.join(tempfile.gettempdir(), "expert_parallel_small.json")
                     if args.small else os.path.join(RESULTS, "expert_parallel.json"))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(card=ok.get("card"), jax=ok.get("jax"),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"),
                   command="python benchmarks/expert_parallel.py " + " ".join(
                       sys.argv[1:] if argv is None else argv),
                   records=records), f, indent=1)
  print(table(records))
  log(f"wrote {out}")


if __name__ == "__main__":
  main()
