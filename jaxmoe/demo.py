"""The main job: train a small MoE language model on synthetic arithmetic, offload on.

    python -m jaxmoe.demo                      # CPU-sized, about a minute
    python -m jaxmoe.demo --preset gpu         # H100-sized
    python -m jaxmoe.demo --offload-names none # everything on device, to compare
    python -m jaxmoe.demo --unrolled           # layers in a Python loop instead of a scan
    python -m jaxmoe.demo --nnx-scan           # nnx.scan instead of jaxmoe.layer_scan
    python -m jaxmoe.demo --fp8                # FP8 expert GEMMs, at the cpu128 preset
    python -m jaxmoe.demo --preset cpu128      # the same model in bf16/f32, to compare
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoe import corpus
from jaxmoe import hlo_report
from jaxmoe import offload
from jaxmoe import profile_report
from jaxmoe.lm import LMConfig, MoETransformerLM, next_token_loss, param_count
from jaxmoe.progress import ProgressBar

PRESETS = {
    "cpu": dict(steps=500, batch_size=16, seq_len=64, num_layers=2, model_dim=64,
                num_heads=4, ffn_size=128, num_experts=4, top_k=2, dtype="float32",
                learning_rate=3e-3),
    # The cpu preset with widths that are multiples of 128, as FP8's scale tiles need.
    "cpu128": dict(steps=500, batch_size=16, seq_len=64, num_layers=2, model_dim=128,
                   num_heads=4, ffn_size=256, num_experts=4, top_k=2, dtype="float32",
                   learning_rate=3e-3),
    "gpu": dict(steps=300, batch_size=32, seq_len=512, num_layers=4, model_dim=1024,
                num_heads=16, ffn_size=4096, num_experts=8, top_k=2, dtype="bfloat16",
                learning_rate=1e-3),
}
PROFILED_STEPS = (3, 4)  # After compilation (step 1) and warm-up.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS),
                 help="model and batch sizes (default: cpu, or cpu128 with --fp8)")
  p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
  p.add_argument("--batch-size", type=int)
  p.add_argument("--backend", default="auto",
                 choices=("auto", "mosaic_gpu", "interpret", "xla"))
  p.add_argument("--offload-names", default=",".join(offload.DEFAULT_OFFLOAD_NAMES),
                 help=f"comma-separated residuals to offload to pinned host memory, "
                      f"or 'none'; from {offload.RESIDUAL_NAMES}")
  p.add_argument("--recompute-names", default="none",
                 help="comma-separated residuals to recompute in backward, or 'none'")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--fp8", action="store_true",
                 help="run the expert GEMMs in blockwise-scaled FP8 "
                      "(jaxmoe.BlockwiseRecipe: e4m3, 1x128 activation tiles, 128x128 "
                      "weight blocks); model_dim and ffn_size must be multiples of 128")
  p.add_argument("--unfused", action="store_true",
                 help="run the activation as its own kernel instead of in the GEMM epilogues")
  p.add_argument("--unrolled", action="store_true",
                 help="run the layers in a Python loop instead of nnx.scan (faster without "
                      "offload; with it, XLA keeps the offloaded residuals on device too)")
  p.add_argument("--nnx-scan", action="store_true",
                 help="scan the layers with nnx.scan, which leaves the offload copies' "
                      "timing to XLA, instead of jaxmoe.layer_scan's pipelined copies")
  p.add_argument("--profile", metavar="DIR",
                 help="trace steps 3 and 4 with jax.profiler into DIR and print the "
                      "busiest ops of each stream")
  p.add_argument("--hlo-out", metavar="PATH",
                 help="write the compiled training step's HLO here and print what it "
                      "says about host offload (copies, host buffers)")
  args = p.parse_args(argv)
  if args.preset is None:
    args.preset = "cpu128" if args.fp8 else "cpu"
  return args


def names(arg: str) -> tuple[str, ...]:
  return () if arg.strip().lower() in ("", "none") else tuple(
      n.strip() for n in arg.split(","))


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on the first device, where the backend reports it."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def commit_to_device(*modules: nnx.Module) -> None:
  """Commits the modules' arrays to the first device's memory.

  A step that offloads to pinned host memory returns committed arrays; left
  uncommitted, the first call's arguments would differ from the second's and
  the second call would compile the step again (tens of seconds on a GPU).
  """
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
  nnx.update(modules, jax.device_put(nnx.state(modules), device))


def train(args: argparse.Namespace) -> dict:
  """Trains and returns a summary: first/last loss, tokens/s, peak memory."""
  preset = dict(PRESETS[args.preset])
  steps = args.steps or preset.pop("steps")
  preset.pop("steps", None)
  batch_size = args.batch_size or preset.pop("batch_size")
  preset.pop("batch_size", None)
  learning_rate = preset.pop("learning_rate")
  cfg = LMConfig(vocab_size=corpus.VOCAB_SIZE, backend=args.backend,
                 offload_names=names(args.offload_names),
                 recompute_names=names(args.recompute_names), fused=not args.unfused,
                 fp8=args.fp8, scan_layers=not args.unrolled,
                 pipelined_offload=False if args.nnx_scan else None,
                 **preset)
  offload.offload_policy(cfg.offload_names, cfg.recompute_names)  # Fail fast.
  model = MoETransformerLM(cfg, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(
      model, optax.adamw(optax.warmup_cosine_decay_schedule(
          0.0, learning_rate, max(steps // 10, 1), steps)), wrt=nnx.Param)
  commit_to_device(model, optimizer)
  batches = corpus.ArithmeticBatches(batch_size, cfg.seq_len, seed=args.seed)

  @nnx.jit
  def train_step(model, optimizer, batch):
    (_, xent), grads = nnx.value_and_grad(next_token_loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return xent

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"{param_count(model) / 1e6:.2f}M parameters; "
        f"{dataclasses.asdict(cfg)}", flush=True)
  if args.hlo_out:
    example = next(corpus.ArithmeticBatches(batch_size, cfg.seq_len, seed=args.seed))
    text = hlo_report.compile_step(  # A batch of its own: training sees the same data.
        train_step, model, optimizer, jnp.asarray(example)).as_text()
    with open(args.hlo_out, "w") as f:
      f.write(text)
    print(f"compiled step HLO -> {args.hlo_out}: {hlo_report.offload_summary(text)}")
  bar = ProgressBar(steps)
  tokens_per_step = batch_size * cfg.seq_len
  losses, timed_start = [], None
  first_traced, last_traced = PROFILED_STEPS
  for step in range(1, steps + 1):
    if args.profile and step == first_traced:
      jax.profiler.start_trace(args.profile)
    xent = float(train_step(model, optimizer, jnp.asarray(next(batches))))
    if args.profile and step == last_traced:
      jax.profiler.stop_trace()
      print(f"profile of steps {first_traced}-{last_traced} -> {args.profile}:\n"
            f"{profile_report.summary(args.profile)}", flush=True)
    losses.append(xent)
    if step == 1:  # Compilation is in step 1: time the rest.
      timed_start = time.perf_counter()
    elapsed = time.perf_counter() - timed_start
    rate = tokens_per_step * (step - 1) / elapsed if step > 1 else 0.0
    bar.update(step, loss=xent, tokens_per_s=rate)
  bar.close()
  summary = {
      "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
      "tokens_per_s": rate, "peak_bytes": peak_memory_bytes(),
      "offload_names": cfg.offload_names, "steps": steps, "fp8": cfg.fp8,
      "preset": args.preset,
  }
  peak = summary["peak_bytes"]
  print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; "
        f"{rate:,.0f} tokens/s; peak device memory "
        f"{'n/a on this backend' if peak is None else f'{peak / 2**30:.2f} GiB'}; "
        f"offloaded: {', '.join(cfg.offload_names) or 'nothing'}"
        f"{'; FP8 expert GEMMs' if cfg.fp8 else ''}")
  return summary


def main(argv=None) -> None:
  train(parse_args(argv))


if __name__ == "__main__":
  main()
