"""Expert parallelism benchmark: weak scaling of a MoELayer training step over X devices.

Same tokens per device for X = 1, 2, 4, 8 (`mesh = (expert=X)`, experts and tokens
split X ways; X = 1 is the layer without a mesh), at a Mixtral-like and a
DeepSeek-like layer, with the capacity factor swept (receive buffers of
capacity_factor x tokens*top_k rows per device; see jaxmoe/expert_parallel.py).
A step is `jax.value_and_grad` of a nonlinear loss over all parameters and the
input, timed with back-to-back calls (timing.py). "capacity_factor = X" is the
worst-case sizing (one round of X*t*k rows), the reference the bounded buffers beat.

Per device, each record carries the activations the forward saves for the
backward (`saved_activation_bytes`), XLA's compiled figures (`memory_analysis()`:
arguments, outputs, temporaries; available on CPU too) and, on GPUs, the
allocator's `peak_bytes_in_use`; and the step's `overflow_rows`.

`--compile-only` builds each configuration abstractly on 8 forced CPU host devices
and compiles it without running: the full-size layers' memory on a CPU.

`--share` instead measures, on one device, the per-device work of an X-way layer:
the grouped MLP (fwd+bwd) on one device's El = E/X experts with the bounded
buffer (X*C ~ capacity_factor*t*k rows) against the worst-case one (X*t*k
rows), the rows routed being t*k either way.

Each configuration runs in its own subprocess (its own peak memory; a failure costs
only its row).

    PYTHONPATH=. python benchmarks/expert_parallel.py                 # the GPUs there are
    PYTHONPATH=. python benchmarks/expert_parallel.py --share         # one GPU
    PYTHONPATH=. python benchmarks/expert_parallel.py --small         # CPU, 8 forced devices
    PYTHONPATH=. python benchmarks/expert_parallel.py --compile-only  # CPU, memory only

Writes benchmarks/results/expert_parallel.json (with --small: a file in the temp
folder, to keep CPU figures out of the results) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# Per device: `tokens` tokens (weak scaling). Mixtral-like: 8 large experts, top-2;
# DeepSeek-like: 64 fine-grained experts, top-8 (the 64-256).
LAYERS = {
    "mixtral": dict(tokens=4096, hidden=4096, ffn=14336, experts=8, top_k=2),
    "deepseek": dict(tokens=4096, hidden=7168, ffn=2048, experts=64, top_k=8),
    "small": dict(tokens=64, hidden=64, ffn=128, experts=8, top_k=2),
}
SMALL_DEVICES = 8


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true",
                 help=f"the 'small' layer on CPU with {SMALL_DEVICES} forced host "
                      "devices (a smoke run; compiled memory is still meaningful)")
  p.add_argument("--layers", default=None,
                 help=f"comma-separated, of {sorted(LAYERS)} (default: mixtral,deepseek; "
                      "small with --small)")
  p.add_argument("--devices", default="1,2,4,8",
                 help="comma-separated expert-axis sizes X (those above the device "
                      "count are skipped)")
  p.add_argument("--capacity-factors", default="1.25,2.0,worst",
                 help="comma-separated; 'worst' is capacity_factor = X (the worst-case "
                      "buffers: every row could go to one device)")
  p.add_argument("--chunks", default="1",
                 help="comma-separated chunk counts (MoELayer(chunks=...)) for X > 1")
  p.add_argument("--collectives", default="padded",
                 help="comma-separated, of ragged,padded (XLA:CPU has no ragged)")
  p.add_argument("--routing", choices=("random", "one_expert"), default="random",
                 help="the router as initialised, or every token to expert 0 (the "
                      "overflow path's worst case)")
  p.add_argument("--offload", choices=("default", "none"), default="none",
                 help="residual placement: the default offload policy or all on device")
  p.add_argument("--share", action="store_true",
                 help="one device: the grouped MLP of one device's share of an X-way "
                      "layer, bounded vs worst-case buffers")
  p.add_argument("--compile-only", action="store_true",
                 help=f"compile each step on {SMALL_DEVICES} forced CPU host devices from "
                      "abstract parameters and inputs, and report XLA's per-device memory "
                      "(no step time, no overflow count): the full-size layers on a CPU")
  p.add_argument("--steps", type=int, default=None, help="calls per timing")
  p.add_argument("--backend", default="auto", help="grouped GEMM backend")
  p.add_argument("--out", default=None, help="results JSON path")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one config
  args = p.parse_args(argv)
  if args.layers is None:
    args.layers = "small" if args.small else "mixtral,deepseek"
  if args.steps is None:
    args.steps = 2 if args.small else 10
  if args.compile_only and (args.share or args.routing != "random"):
    p.error("--compile-only measures the layer's memory: it takes neither --share nor "
            "--routing (nothing runs)")
  for name in args.layers.split(","):
    if name not in LAYERS:
      p.error(f"unknown layer {name!r}; expected one of {sorted(LAYERS)}")
  return args


def capacity_for(factor: str, devices: int) -> float:
  return float(devices) if factor == "worst" else float(factor)


def child_env(args) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  if args.small or args.compile_only:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={SMALL_DEVICES}").strip()
  return env


def memory_record(compiled, devices) -> dict:
  """XLA's compiled figures and the allocator's peaks, per device, in bytes."""
  analysis = compiled.memory_analysis()
  record = {}
  if analysis is not None:
    record = dict(argument_bytes=int(analysis.argument_size_in_bytes),
                  output_bytes=int(analysis.output_size_in_bytes),
                  temp_bytes=int(analysis.temp_size_in_bytes),
                  xla_bytes_per_device=int(
                      analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes))
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  record["peak_bytes_per_device"] = peaks
  return record


def saved_activation_bytes(loss, devices: int, *args) -> int:
  """Bytes per device that the step's forward keeps for its backward: the saved
  residuals of `loss(*args)` that are neither arguments nor the bf16 copies of
  the expert weights, each split over the `devices` of the mesh (what offload
  moves; the transient buffers of either pass are not counted)."""
  import numpy as np
  from jax._src.ad_checkpoint import saved_residuals  # private: lists what backward keeps

  total = 0
  for aval, origin in saved_residuals(loss, *args):
    if "from the argument" in origin or "GroupedMLP.weights" in origin:
      continue
    total += int(np.prod(aval.shape)) * aval.dtype.itemsize
  return total // devices


def run_layer(args, layer_name: str, devices: int, collective: str,
              capacity_factor: float, chunks: int) -> dict:
  """In the child: build, compile and time one weak-scaling configuration (with
  --compile-only, build abstractly and compile only)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxmoe
  sys.path.insert(0, HERE)
  from timing import time_ms

  shape = LAYERS[layer_name]
  if jax.device_count() < devices:
    raise RuntimeError(f"need {devices} devices, have {jax.device_count()}")
  mesh, ep = None, {}
  if devices > 1:
    mesh = jax.make_mesh((devices,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    ep = dict(mesh=mesh, data_axis=None, collective=collective,
              capacity_factor=capacity_factor, chunks=chunks)
  offload = {} if args.offload == "default" else dict(offload_names=())
  make = lambda: jaxmoe.MoELayer(shape["hidden"], shape["ffn"], shape["experts"],
                                 shape["top_k"], backend=args.backend, rngs=nnx.Rngs(0),
                                 **ep, **offload)
  tokens = shape["tokens"] * devices
  x_sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
                if mesh is not None else None)
  if args.compile_only:  # Abstract (sharded) parameters and input: nothing allocated.
    graphdef, state = nnx.split(nnx.eval_shape(make))
    x = jax.ShapeDtypeStruct((tokens, shape["hidden"]), jnp.bfloat16, sharding=x_sharding)
  else:
    graphdef, state, x = _concrete_layer_and_input(args, make, shape, tokens, x_sharding)

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    # Nonlinear in y: a linear loss would let XLA drop the forward (DESIGN.md).
    value = jnp.mean(y.astype(jnp.float32) ** 2) + 0.01 * aux["load_balancing_loss"]
    return value, aux.get("overflow_rows", jnp.zeros((), jnp.int32))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  compiled = step.lower(state, x).compile()
  activations = saved_activation_bytes(lambda *a: loss(*a)[0], devices, state, x)
  timed = {}
  if not args.compile_only:
    (_, overflow), _ = compiled(state, x)
    ms = time_ms(compiled, state, x, calls=max(1, args.steps), repeats=3)
    timed = dict(step_ms=round(ms, 3), tokens_per_s=round(tokens / ms * 1e3, 1),
                 overflow_rows=int(overflow))
  return dict(kind="layer", layer=layer_name, devices=devices,
              collective=collective if mesh else "none",
              capacity_factor=capacity_factor if mesh else None,
              chunks=chunks if mesh else None,
              tokens_per_device=shape["tokens"], H=shape["hidden"], F=shape["ffn"],
              E=shape["experts"], top_k=shape["top_k"], routing=args.routing,
              offload=args.offload, backend=args.backend, **timed,
              saved_activation_bytes_per_device=activations,
              **memory_record(compiled, jax.devices()[:devices]),
              card=jax.devices()[0].device_kind, jax=jax.__version__)


def _concrete_layer_and_input(args, make, shape, tokens, x_sharding):
  """The layer's (graphdef, state) and a random input [tokens, H] bf16 placed on
  x_sharding; with --routing one_expert, a router that sends every token to expert 0."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  layer = make()
  if args.routing == "one_expert":
    router = np.zeros((shape["hidden"], shape["experts"]), np.float32)
    router[:, 0] = 1.0
    layer.router_kernel.set_value(jax.device_put(
        jnp.asarray(router), layer.router_kernel.get_value().sharding))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (tokens, shape["hidden"]), jnp.bfloat16)
  if args.routing == "one_expert":
    x = jnp.abs(x)
  if x_sharding is not None:
    x = jax.device_put(x, x_sharding)
  return graphdef, state, x


def run_share(args, layer_name: str, devices: int, capacity_factor: float) -> dict:
  """In the child, one device: fwd+bwd of the grouped MLP on one device's share of
  an X-way layer, M = X*C rows (C = jaxmoe.expert_parallel.pair_capacity), t*k of
  them routed (balanced over the El local experts), the rest padding."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxmoe
  from jaxmoe import expert_parallel
  sys.path.insert(0, HERE)
  from timing import time_ms

  shape = LAYERS[layer_name]
  local = max(1, shape["experts"] // devices)
  routed = shape["tokens"] * shape["top_k"]
  rows = devices * expert_parallel.pair_capacity(routed, devices, capacity_factor)
  mlp = jaxmoe.GroupedMLP(local, shape["hidden"], shape["ffn"], backend=args.backend,
                          offload_names=() if args.offload == "none" else
                          jaxmoe.offload.DEFAULT_OFFLOAD_NAMES, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(mlp)
  sizes = jnp.full((local,), routed // local, jnp.int32)
  x = jax.random.normal(jax.random.key(1), (rows, shape["hidden"]), jnp.bfloat16)
  scales = jnp.ones((rows,), jnp.float32)

  def loss(state, x):
    y = nnx.merge(graphdef, state)(x, sizes, scales)
    return jnp.mean(y.astype(jnp.float32) ** 2)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x).compile()
  ms = time_ms(compiled, state, x, calls=max(1, args.steps), repeats=3)
  return dict(kind="share", layer=layer_name, devices=devices,
              capacity_factor=capacity_factor, rows=rows, routed_rows=routed,
              local_experts=local, H=shape["hidden"], F=shape["ffn"],
              offload=args.offload, backend=args.backend, step_ms=round(ms, 3),
              saved_activation_bytes_per_device=saved_activation_bytes(loss, 1, state, x),
              **memory_record(compiled, jax.devices()[:1]),
              card=jax.devices()[0].device_kind, jax=jax.__version__)


def spawn(args, one: str, log) -> dict:
  """Runs one configuration ("kind:layer:devices:collective:factor:chunks") in a
  subprocess;
  a failure becomes a record with "error"."""
  argv = [a for a in sys.argv[1:]]
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", one]
  if args.small and "--small" not in argv:
    cmd.append("--small")
  log(f"  running {one} ...")
  proc = subprocess.run(cmd, env=child_env(args), capture_output=True, text=True,
                        cwd=REPO)
  for line in proc.stdout.splitlines():
    if line.startswith("RECORD "):
      return json.loads(line[len("RECORD "):])
  tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
  log(f"  failed (rc={proc.returncode}):\n{tail}")
  kind, layer, devices, collective, factor, chunks = one.split(":")
  return dict(kind=kind, layer=layer, devices=int(devices), collective=collective,
              capacity_factor=float(factor), chunks=int(chunks), error=tail[-600:])


def configurations(args, available: int) -> list[str]:
  """The child configurations to run, in table order."""
  sizes = [int(n) for n in args.devices.split(",")]
  factors = args.capacity_factors.split(",")
  out = []
  for layer in args.layers.split(","):
    for devices in sizes:
      if args.share:
        out += [f"share:{layer}:{devices}:none:{capacity_for(f, devices)}:1"
                for f in factors]
      elif devices == 1:
        out.append(f"layer:{layer}:1:none:1.0:1")
      elif devices <= available:
        out += [f"layer:{layer}:{devices}:{c}:{capacity_for(f, devices)}:{n}"
                for c in args.collectives.split(",") for f in factors
                for n in args.chunks.split(",")]
  return list(dict.fromkeys(out))  # 'worst' may repeat a factor given (X = 2 and 2.0)


def mib(x) -> str:
  return "-" if x is None else f"{x / 2**20:.1f}"


def table(records) -> str:
  """Markdown; memory and speed as ratios to X = 1 (layer) or to 'worst' (share)."""
  head = ("| layer | X | collective | capacity factor | chunks | step ms | tokens/s per device "
          "× X=1 | overflow rows (share: MLP rows) | saved activations MiB/device | × X=1 "
          "| XLA temp MiB/device | × X=1 | peak MiB/device (max) |")
  lines = [head, "|" + "---|" * 13]
  base = {r["layer"]: r for r in records if r.get("devices") == 1 and "error" not in r
          and r.get("kind") == "layer"}
  for r in records:
    if "error" in r:
      lines.append(f"| {r['layer']} | {r['devices']} | {r['collective']} | "
                   f"{r['capacity_factor']} | {r.get('chunks')} | failed | | | | | | | |")
      continue
    b = base.get(r["layer"])
    peaks = [p for p in r.get("peak_bytes_per_device", []) if p is not None]
    per_device = (r["tokens_per_s"] / r["devices"]
                  if r["kind"] == "layer" and "tokens_per_s" in r else None)
    speed = (f"{per_device / b['tokens_per_s']:.2f}" if b and per_device else "-")
    step = f"{r['step_ms']:.2f}" if "step_ms" in r else "-"
    ratio = lambda key: (f"{r[key] / b[key]:.2f}" if b and r.get(key) and b.get(key)
                         else "-")
    temp = r.get("temp_bytes")
    saved = r.get("saved_activation_bytes_per_device")
    lines.append(
        f"| {r['layer']} | {r['devices']} | {r.get('collective', '-')} | "
        f"{r.get('capacity_factor') or '-'} | {r.get('chunks') or '-'} | "
        f"{step} | {speed} | "
        f"{r.get('overflow_rows', r.get('rows', '-'))} | {mib(saved)} | "
        f"{ratio('saved_activation_bytes_per_device')} | {mib(temp)} | {ratio('temp_bytes')} | "
        f"{mib(max(peaks) if peaks else None)} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.one:
    kind, layer, devices, collective, factor, chunks = args.one.split(":")
    try:
      if kind == "share":
        record = run_share(args, layer, int(devices), float(factor))
      else:
        record = run_layer(args, layer, int(devices), collective, float(factor),
                           int(chunks))
    except Exception:  # noqa: BLE001 -- reported by the parent
      traceback.print_exc()
      sys.exit(1)
    print("RECORD " + json.dumps(record), flush=True)
    return

  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  if args.small or args.compile_only:
    available = SMALL_DEVICES
  else:
    import jax  # Only to count devices; the runs are in subprocesses.
    available = len(jax.devices())
  log(f"layers={args.layers} devices={args.devices} (have {available}) "
      f"capacity factors={args.capacity_factors} routing={args.routing} "
      f"offload={args.offload}{' share' if args.share else ''}")
  records = [spawn(args, one, log) for one in configurations(args, available)]
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
