"""Residual placement for a stack of MoE layers: step time, peak memory, bytes moved.

For each shape and placement, a fresh process builds an L-layer `nnx.scan` stack of
`MoELayer`s, runs a full training step (forward, backward, SGD update), and reports
the median step time, the peak device memory, the bytes offloaded per step (predicted
from the shapes and read from the compiled executable) and how much of the copy time
was hidden under compute. Writes `benchmarks/results/offload.json`.

    PYTHONPATH=. python benchmarks/offload.py                 # both shapes, all placements
    PYTHONPATH=. python benchmarks/offload.py --shape compute_bound --placement device
    PYTHONPATH=. python benchmarks/offload.py --small         # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results", "offload.json")


@dataclasses.dataclass(frozen=True)
class Shape:
  hidden: int
  ffn: int
  experts: int
  top_k: int
  tokens: int  # per layer
  layers: int


SHAPES = {
    # Mixtral-like experts: a lot of compute per byte of residual.
    "compute_bound": Shape(hidden=4096, ffn=14336, experts=8, top_k=2, tokens=8192, layers=8),
    # DeepSeek-like experts: top-8 makes fc1_input 8x the layer input. 4 layers: at 8,
    # the bf16 weights and their gradients alone (60 GB) would not leave room.
    "link_bound": Shape(hidden=7168, ffn=2048, experts=64, top_k=8, tokens=4096, layers=4),
    # A wide model: H above the ~11,500 FLOPs per byte at which an H100 hides a copy, so
    # by the rule (docs/offload.md, "When offload pays") activation_input's copy hides under FC2.
    "wide_hidden": Shape(hidden=16384, ffn=4096, experts=8, top_k=2, tokens=4096, layers=4),
}
SMALL = Shape(hidden=64, ffn=128, experts=4, top_k=2, tokens=64, layers=2)

PLACEMENTS = {
    "device": dict(offload_names=(), recompute_names=()),
    "offload_default": dict(offload_names=("fc1_input", "activation_input"), recompute_names=()),
    "offload_fc1": dict(offload_names=("fc1_input",), recompute_names=()),
    "offload_act": dict(offload_names=("activation_input",), recompute_names=()),
    "offload_moe_input": dict(offload_names=("moe_input",), recompute_names=("fc1_input",)),
    "offload_all": dict(offload_names=("fc1_input", "activation_input", "fc2_input"),
                        recompute_names=()),
    "offload_unpermuted": dict(offload_names=("moe_input", "activation_input"),
                               recompute_names=("fc1_input",)),
    "recompute_act": dict(offload_names=(), recompute_names=("activation_input", "fc2_input")),
    "recompute_all": dict(offload_names=(),
                          recompute_names=("fc1_input", "activation_input", "fc2_input")),
}


def predicted_offload_bytes(shape: Shape, offload_names, itemsize: int = 2,
                            pipelined: bool = False) -> int:
  """Bytes of the named residuals that are on host after the forward pass, from the
  shapes: every layer's, or with the pipelined scan all but the last layer's (which
  stays on device)."""
  from jaxmoe import offload
  layers = shape.layers - 1 if pipelined else shape.layers
  return layers * offload.offloaded_bytes(
      offload_names, shape.hidden, shape.ffn, shape.top_k, shape.tokens, itemsize)


def cover_flops_per_byte(shape: Shape, offload_names) -> float | None:
  """`jaxmoe.offload.cover_flops_per_byte` for a shape: forward FLOPs covering the copies."""
  from jaxmoe import offload
  return offload.cover_flops_per_byte(offload_names, shape.hidden, shape.ffn, shape.top_k)


def measure_link_gb_s(nbytes: int = 512 * 2**20) -> tuple[float, float]:
  """Device->pinned_host and pinned_host->device GB/s of one `device_put`."""
  import jax
  import jax.numpy as jnp
  device = jax.devices()[0]
  x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
  host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
  dev = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
  def timed(fn):
    fn().block_until_ready()
    times = []
    for _ in range(5):
      t0 = time.perf_counter(); fn().block_until_ready(); times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9
  on_host = jax.device_put(x, host)
  return timed(lambda: jax.device_put(x, host)), timed(lambda: jax.device_put(on_host, dev))


def build_step(shape: Shape, names: dict, backend: str, unrolled: bool = False,
               scan_unroll: int = 1, remat_layer: bool = False, pipelined: bool = False):
  """An L-layer MoELayer stack and its training step (forward, backward, SGD update).

  `scan_unroll` layers go into one iteration of the scan's loop body (`nnx.scan(unroll=)`).
  `remat_layer` checkpoints each whole block with the placement's policy, so that only the
  named residuals (and the block's input) are saved: the norm and routing are recomputed.
  `pipelined` runs the layers through `jaxmoe.layer_scan.scan_layers` instead of `nnx.scan`.

  Returns (train_step, stack, optimizer) for `hlo_report.compile_step`.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  import jaxmoe
  from jaxmoe import layer_scan
  from jaxmoe.lm import stacked_layer

  @nnx.split_rngs(splits=shape.layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_stack(rngs):
    return jaxmoe.MoELayer(shape.hidden, shape.ffn, shape.experts, shape.top_k,
                           backend=backend, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           rngs=rngs, **names)

  stack = make_stack(nnx.Rngs(0))
  optimizer = nnx.Optimizer(stack, optax.sgd(1e-3), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (shape.tokens, shape.hidden), jnp.bfloat16)
  target = jax.random.normal(jax.random.key(2), x.shape, jnp.bfloat16)

  def layer_step(h, layer):
    # Pre-norm residual block: without the norm, relu(h)**2 makes the residual
    # stream grow doubly exponentially with depth (inf by layer 6 at these sizes).
    h32 = h.astype(jnp.float32)
    normed = h32 * jax.lax.rsqrt(jnp.mean(h32 ** 2, axis=-1, keepdims=True) + 1e-6)
    y, aux = layer(normed.astype(h.dtype))
    return h + y, aux["load_balancing_loss"]

  if remat_layer:
    layer_step = nnx.remat(layer_step, policy=jaxmoe.offload_policy(**names))

  def loss_fn(stack):
    if unrolled:  # A Python loop: XLA sees every layer, as in jaxmoe.lm.
      h, lbs = x, []
      for i in range(shape.layers):
        h, lb = layer_step(h, stacked_layer(stack, i))
        lbs.append(lb)
      y, lb = h, jnp.stack(lbs)
    elif pipelined:
      y, lb = layer_scan.scan_layers(layer_step, x, stack)
    else:
      y, lb = nnx.scan(layer_step, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                       unroll=scan_unroll)(x, stack)
    return jnp.mean((y.astype(jnp.float32) - target) ** 2) + 0.01 * jnp.mean(lb)

  def train_step(stack, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(stack)
    optimizer.update(stack, grads)
    return loss

  return train_step, stack, optimizer


def time_steps(compiled, state, steps: int, warmup: int = 2):
  """Runs a donated `(state) -> (loss, state)` executable; returns (times s, losses, state)."""
  import jax
  losses, times = [], []
  for _ in range(warmup):
    loss, state = compiled(state)
    losses.append(float(loss))
  for _ in range(steps):
    t0 = time.perf_counter()
    loss, state = compiled(state)
    jax.block_until_ready((loss, state))
    times.append(time.perf_counter() - t0)
    losses.append(float(loss))
  return times, losses, state


def compiled_sizes(compiled) -> dict:
  """XLA's compile-time buffer sizes (the memory figures a CPU run has too)."""
  stats = compiled.memory_analysis()
  get = lambda name: getattr(stats, name, None)  # noqa: E731
  return {"hlo_host_temp_bytes": get("host_temp_size_in_bytes"),
          "hlo_temp_bytes": get("temp_size_in_bytes"),
          "hlo_argument_bytes": get("argument_size_in_bytes"),
          "hlo_output_bytes": get("output_size_in_bytes")}


def run_one(shape: Shape, shape_name: str, placement: str, steps: int, backend: str,
            unrolled: bool = False, hlo_dir: str | None = None, scan_unroll: int = 1,
            remat_layer: bool = False, pipelined: bool = False) -> dict:
  """Builds the stack, compiles the training step once, times it, returns one record.

  With `hlo_dir`, the compiled HLO (its schedule) is written there as SHAPE.PLACEMENT.hlo.
  """
  import jax
  from flax import nnx
  from jaxmoe import hlo_report

  names = PLACEMENTS[placement]
  train_step, stack, optimizer = build_step(shape, names, backend, unrolled, scan_unroll,
                                            remat_layer, pipelined)
  # One compile: the executable that the HLO summary describes is the one timed.
  compiled = hlo_report.compile_step(train_step, stack, optimizer, donate_state=True)
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    scan = ".pipelined" if pipelined else ""
    with open(os.path.join(hlo_dir, f"{shape_name}.{placement}{scan}.hlo"), "w") as f:
      f.write(compiled.as_text())
  state = nnx.state((stack, optimizer))
  del stack, optimizer  # Their arrays are the state, donated to the first step.
  times, losses, state = time_steps(compiled, state, steps)
  stats = jax.devices()[0].memory_stats() or {}
  return {
      "shape": shape_name, "placement": placement, "unrolled": unrolled,
      "scan_unroll": scan_unroll, "remat_layer": remat_layer,
      "layer_scan": "offload_scan" if pipelined else ("python" if unrolled else "nnx.scan"),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "step_ms": 1e3 * statistics.median(times),
      "peak_bytes": stats.get("peak_bytes_in_use"),
      "offloaded_bytes": predicted_offload_bytes(shape, names["offload_names"],
                                                 pipelined=pipelined),
      "cover_flops_per_byte": cover_flops_per_byte(shape, names["offload_names"]),
      **compiled_sizes(compiled),
      "hlo_offload": hlo_report.offload_summary(compiled.as_text()), "losses": losses,
      "tokens": shape.tokens, "layers": shape.layers, "H": shape.hidden, "F": shape.ffn,
      "G": shape.experts, "top_k": shape.top_k, "backend": backend,
  }


def device_step_ms(records: list[dict]) -> dict[str, float]:
  """Per shape, the step time with everything on device in nnx.scan (where measured)."""
  return {r["shape"]: r["step_ms"] for r in records
          if r["placement"] == "device" and r.get("layer_scan", "nnx.scan") == "nnx.scan"}


def add_bounds(records: list[dict], d2h_gb_s: float, h2d_gb_s: float) -> None:
  """bound_ms = max(compute, copy time); hidden share = 1 - overhead / copy time."""
  device_ms = device_step_ms(records)
  for r in records:
    copy_ms = 1e3 * (r["offloaded_bytes"] / (d2h_gb_s * 1e9) + r["offloaded_bytes"] / (h2d_gb_s * 1e9))
    compute_ms = device_ms.get(r["shape"], float("nan"))
    r["copy_ms"] = copy_ms
    r["bound_ms"] = max(compute_ms, copy_ms)
    overhead = r["step_ms"] - compute_ms
    r["hidden_share"] = min(max(1 - overhead / copy_ms, 0.0), 1.0) if copy_ms > 0 else None


def print_table(records: list[dict]) -> None:
  print(f"{'shape':14} {'placement':19} {'scan':12} {'step ms':>8} {'x device':>8} "
        f"{'peak GiB':>8} {'offl GiB':>8} {'HLO host GiB':>12} {'bound ms':>8} {'hidden':>6} "
        f"{'FLOP/B':>7}")
  device_ms = device_step_ms(records)
  for r in records:
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"
    hidden = "" if r.get("hidden_share") is None else f"{100 * r['hidden_share']:.0f}%"
    ratio = r["step_ms"] / device_ms[r["shape"]] if r["shape"] in device_ms else float("nan")
    print(f"{r['shape']:14} {r['placement']:19} {r.get('layer_scan', ''):12} "
          f"{r['step_ms']:8.1f} {ratio:8.2f} "
          f"{gib(r['peak_bytes']):>8} {gib(r['offloaded_bytes']):>8} "
          f"{gib(r['hlo_host_temp_bytes']):>12} {r.get('bound_ms', float('nan')):8.1f} {hidden:>6} "
          f"{'' if r.get('cover_flops_per_byte') is None else round(r['cover_flops_per_byte']):>7}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", choices=sorted(SHAPES), action="append")
  p.add_argument("--placement", choices=list(PLACEMENTS), action="append")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--backend", default="auto")
  p.add_argument("--layers", type=int, help="override the shapes' layer count")
  p.add_argument("--tokens", type=int, help="override the shapes' tokens per layer")
  p.add_argument("--unrolled", action="store_true",
                 help="layers in a Python loop instead of nnx.scan")
  p.add_argument("--scan-unroll", type=int, default=1,
                 help="layers per iteration of the scan's loop body")
  p.add_argument("--pipelined", action="store_true",
                 help="layers through jaxmoe.layer_scan (copies pipelined across layers)")
  p.add_argument("--both-scans", action="store_true",
                 help="each setting with nnx.scan and with jaxmoe.layer_scan")
  p.add_argument("--remat-layer", action="store_true",
                 help="checkpoint each whole block with the placement's policy")
  p.add_argument("--xla-flags", default="",
                 help="appended to XLA_FLAGS of each run (e.g. scheduler experiments)")
  p.add_argument("--hlo-dir", help="write each run's compiled HLO there")
  p.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke run")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default=RESULTS)
  args = p.parse_args()
  shapes = args.shape or list(SHAPES)
  placements = args.placement or list(PLACEMENTS)
  if args.worker:  # One setting in this process: its peak memory is its own.
    shape = SMALL if args.small else SHAPES[shapes[0]]
    shape = dataclasses.replace(shape, **{k: v for k, v in (
        ("layers", args.layers), ("tokens", args.tokens)) if v})
    print(json.dumps(run_one(shape, shapes[0], placements[0], args.steps, args.backend,
                             args.unrolled, args.hlo_dir, args.scan_unroll,
                             args.remat_layer, args.pipelined)))
    return
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  records = []
  scans = [False, True] if args.both_scans else [args.pipelined]
  for shape, placement, pipelined in itertools.product(shapes, placements, scans):
    cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--placement", placement,
           "--steps", str(args.steps), "--backend", args.backend]
    cmd += ["--small"] if args.small else []
    cmd += ["--unrolled"] if args.unrolled else []
    cmd += [f"--scan-unroll={args.scan_unroll}"]
    cmd += ["--remat-layer"] if args.remat_layer else []
    cmd += ["--pipelined"] if pipelined else []
    cmd += [f"--hlo-dir={args.hlo_dir}"] if args.hlo_dir else []
    cmd += [f"--{k}={v}" for k, v in (("layers", args.layers), ("tokens", args.tokens)) if v]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
      print(f"{shape}/{placement} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
      continue
    records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{shape}/{placement}/{records[-1]['layer_scan']}: "
          f"{records[-1]['step_ms']:.1f} ms", file=sys.stderr, flush=True)
  import jax
  d2h, h2d = measure_link_gb_s() if jax.default_backend() == "gpu" else (52.0, 52.0)
  add_bounds(records, d2h, h2d)
  device = jax.devices()[0]
  result = {"card": device.device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "link_gb_s": {"d2h": d2h, "h2d": h2d}, "records": records}
  if not args.small:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  print(f"{device.device_kind}, jax {jax.__version__}, link d2h {d2h:.1f} GB/s h2d {h2d:.1f} GB/s")
  print_table(records)


if __name__ == "__main__":
  main()
