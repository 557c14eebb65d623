"""Hardware counters of the grouped GEMM kernels at the benchmark shapes (Nsight Compute).

The timed benchmarks say how fast a pass runs; this says what the GPU did while it
ran. Per kernel: its duration, the DRAM bytes it read and wrote against the fewest
its pass must move (`roofline.min_bytes`: each operand read once, the result
written once), the DRAM bandwidth that makes, DRAM and SM throughput as shares of
their peaks, the L2 hit rate and the bytes the SMs asked of L2. A kernel that
moves about its minimum at close to the DRAM peak is bandwidth-bound; no schedule
makes it much faster. One that moves well over its minimum re-reads an operand.

    PYTHONPATH=. python benchmarks/hw_counters.py --passes fwd,dgrad,wgrad \
        --shapes 0,2,3,5 --out hw_counters.json [--variant cl2:cluster_n=2 ...]

A --variant (as in config_ab.py) adds, after each pass's default kernel ("jaxmoe"),
the default config with those fields replaced, where it applies.

The script runs itself under `ncu` (which must be on PATH and allowed to read the
counters). The child runs, per shape, a dense matmul x @ w[0] and each selected
pass's default kernel once, on the benchmark's random group sizes; ncu profiles
the matmul kernels (names matching KERNEL_REGEX), one per job, in job order.
Durations are of one kernel with a cold L2 at the clocks of the moment (ncu's
--clock-control none), so they run shorter than in the timed benchmarks'
sustained back-to-back calls; compare bytes and shares, not times, with those.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from benchmarks import config_ab, roofline, shapes
from benchmarks.config_ab import PASSES

# Record field -> ncu metric.
METRICS = {
    "duration_ns": "gpu__time_duration.sum",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "dram_pct_of_peak": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm_pct_of_peak": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_hit_pct": "lts__t_sector_hit_rate.pct",
    "l2_bytes": "lts__t_bytes.sum",
}
# Our kernels (Mosaic GPU) and cuBLAS's matmul kernels, not the small XLA fusions
# around them (group metadata, random inputs).
KERNEL_REGEX = "mosaic_gpu|gemm|nvjet|xmma"
# Without autotuning (whose trial kernels ncu would also profile) and with cuBLAS
# rather than Triton for the dense matmul; the platform allocator, because ncu
# saves and restores the memory a kernel may write around each replay, which for
# JAX's preallocated pool is most of the GPU's memory.
CHILD_ENV = {
    "XLA_FLAGS": "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false",
    "XLA_PYTHON_CLIENT_ALLOCATOR": "platform",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}


def pass_configs(i: int, pass_: str, variants: dict[str, dict]) -> dict:
  """{impl: config} of a pass on shape i: "jaxmoe" (the default), then the variants
  that apply to it."""
  base = config_ab.default_config(pass_, *shapes.SHAPES[i])
  configs = config_ab.variants_of(base, variants, log=lambda _: None)
  return {("jaxmoe" if name == "base" else name): cfg for name, cfg in configs.items()}


def job_list(shape_indices: list[int], passes: list[str],
             variants: dict[str, dict] | None = None) -> list[tuple[int, str, str]]:
  """(shape index, pass, impl) in the order the child runs them: per shape the dense
  matmul ("dense", counted as a fwd), then each pass's kernels (`pass_configs`)."""
  jobs = []
  for i in shape_indices:
    jobs.append((i, "fwd", "dense"))
    for pass_ in passes:
      jobs.extend((i, pass_, impl) for impl in pass_configs(i, pass_, variants or {}))
  return jobs


def run_child(shape_indices: list[int], passes: list[str], variants: dict[str, dict]) -> None:
  """Runs each job once, after compiling it, so that ncu sees one kernel per job."""
  import jax
  import jax.numpy as jnp

  for i in shape_indices:
    m, k, n, g = shapes.SHAPES[i]
    keys = jax.random.split(jax.random.key(i), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (g, k, n), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    gs = jnp.asarray(shapes.random_group_sizes(m, g))
    calls = [(jax.jit(lambda a, b: a @ b[0]), (x, w))]
    for pass_ in passes:
      _, make, args = config_ab.pass_setup(pass_, x, w, dy, gs)
      calls.extend((make(cfg), args) for cfg in pass_configs(i, pass_, variants).values())
    for fn, args in calls:
      compiled = fn.lower(*args).compile()
      jax.block_until_ready(args)
      jax.block_until_ready(compiled(*args))
    del x, w, dy


def ncu_command(log_file: str, child_args: list[str]) -> list[str]:
  return ["ncu", "--clock-control", "none", "--kernel-name", f"regex:{KERNEL_REGEX}",
          "--metrics", ",".join(METRICS.values()), "--csv", "--page", "raw",
          "--print-units", "base", "--log-file", log_file,
          sys.executable, os.path.abspath(__file__), "--child", *child_args]


def parse_ncu_csv(text: str) -> list[dict]:
  """[{"kernel": name, field: value for METRICS}] from ncu's --csv --page raw output."""
  rows = [r for r in csv.reader(io.StringIO(text)) if r]
  try:
    start = next(i for i, r in enumerate(rows) if r[0] == "ID")
  except StopIteration:
    raise ValueError("no ncu results (no 'ID' header row) in the ncu log") from None
  header = rows[start]
  missing = [m for m in ("Kernel Name", *METRICS.values()) if m not in header]
  if missing:
    raise ValueError(f"ncu log lacks the columns {missing}")
  kernels = []
  for row in rows[start + 1:]:
    if not row[0].isdigit():  # the units row
      continue
    rec = {"kernel": row[header.index("Kernel Name")]}
    for field, metric in METRICS.items():
      rec[field] = float(row[header.index(metric)].replace(",", ""))
    kernels.append(rec)
  return kernels


def label(kernels: list[dict], jobs: list[tuple[int, str, str]]) -> list[tuple[tuple, dict]]:
  """Pairs each job with its kernel; raises ValueError unless there is one kernel per
  job, a Mosaic GPU kernel exactly where the job is ours (not "dense")."""
  if len(kernels) != len(jobs):
    raise ValueError(f"{len(kernels)} kernels for {len(jobs)} jobs: "
                     f"{[k['kernel'][:40] for k in kernels]}")
  for job, kernel in zip(jobs, kernels):
    if ("mosaic_gpu" in kernel["kernel"]) != (job[2] != "dense"):
      raise ValueError(f"job {job} ran kernel {kernel['kernel'][:60]!r}")
  return list(zip(jobs, kernels))


def record(job: tuple[int, str, str], kernel: dict) -> dict:
  """One job's counters with its pass's minimum bytes and the bandwidth it drew."""
  i, pass_, impl = job
  m, k, n, g = shapes.SHAPES[i]
  # The dense matmul reads one weight matrix, not G.
  least = roofline.min_bytes(m, k, n, 1 if impl == "dense" else g, pass_)
  moved = kernel["dram_read_bytes"] + kernel["dram_write_bytes"]
  seconds = kernel["duration_ns"] * 1e-9
  return dict(shape=[m, k, n, g], pass_=pass_, impl=impl, **kernel,
              min_bytes=least, dram_bytes_over_min=round(moved / least, 3),
              dram_gbps=round(moved / seconds / 1e9, 1),
              l2_gbps=round(kernel["l2_bytes"] / seconds / 1e9, 1),
              tflops=round(shapes.flops(m, k, n) / seconds / 1e12, 1))


def format_table(recs: list[dict]) -> str:
  lines = ["| shape (M,K,N,G) | pass | impl | µs | TF/s | DRAM GB (× min) | DRAM GB/s "
           "| DRAM % peak | SM % peak | L2 hit % | L2 GB/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in recs:
    gb = (r["dram_read_bytes"] + r["dram_write_bytes"]) / 1e9
    lines.append(
        f"| {tuple(r['shape'])} | {r['pass_']} | {r['impl']} | {r['duration_ns'] / 1e3:.0f} "
        f"| {r['tflops']:.0f} | {gb:.3f} ({r['dram_bytes_over_min']:.2f}) | {r['dram_gbps']:.0f} "
        f"| {r['dram_pct_of_peak']:.1f} | {r['sm_pct_of_peak']:.1f} | {r['l2_hit_pct']:.1f} "
        f"| {r['l2_gbps']:.0f} |")
  return "\n".join(lines)


def variant_args(variants: dict[str, dict]) -> list[str]:
  """The command-line arguments that give `variants` again (config_ab.parse_variant)."""
  return [arg for name, overrides in variants.items()
          for arg in ("--variant", name + ":" + ",".join(f"{f}={v!r}" for f, v in overrides.items()))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--passes", default=",".join(PASSES), help=f"some of {','.join(PASSES)}")
  parser.add_argument("--shapes", default="0,2,3,5", help="indices into shapes.SHAPES")
  parser.add_argument("--out", help="results JSON (required unless --child)")
  parser.add_argument("--variant", action="append", default=[],
                      type=config_ab.parse_variant,
                      help="NAME:FIELD=VALUE[,FIELD=VALUE...] (repeatable; config_ab.py)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  passes = args.passes.split(",")
  if bad := set(passes) - set(PASSES):
    parser.error(f"unknown passes {sorted(bad)}; expected some of {PASSES}")
  try:
    indices = [int(i) for i in args.shapes.split(",")]
    [shapes.SHAPES[i] for i in indices]
  except (ValueError, IndexError):
    parser.error(f"--shapes {args.shapes!r}: expected indices into the "
                 f"{len(shapes.SHAPES)} shapes, e.g. 0,2")
  variants = dict(args.variant)
  if args.child:
    run_child(indices, passes, variants)
    return
  if not args.out:
    parser.error("--out is required")
  if shutil.which("ncu") is None:
    sys.exit("ncu (Nsight Compute) is not on PATH.")
  with tempfile.TemporaryDirectory() as tmp:
    log_file = os.path.join(tmp, "ncu.csv")
    cmd = ncu_command(log_file, ["--passes", args.passes, "--shapes", args.shapes,
                                 *variant_args(variants)])
    child = subprocess.run(cmd, env={**os.environ, **CHILD_ENV}, check=False)
    text = open(log_file).read() if os.path.exists(log_file) else ""
  if child.returncode:
    sys.exit(f"ncu exited with {child.returncode}; its log:\n{text[-3000:]}")
  try:
    pairs = label(parse_ncu_csv(text), job_list(indices, passes, variants))
  except ValueError as e:  # e.g. no counter access: ncu ran the program, profiled nothing
    sys.exit(f"{e}; the end of the ncu log:\n{text[-3000:]}")
  recs = [record(job, kernel) for job, kernel in pairs]
  import jax
  result = {"card": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(),
            "command": " ".join(["python"] + sys.argv), "ncu": re.sub(r"\s+", " ", subprocess.run(
                ["ncu", "--version"], capture_output=True, text=True).stdout.strip()),
            "records": recs}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(format_table(recs))


if __name__ == "__main__":
  main()
