"""benchmarks/: interleaved timing, config A/B variants, profiler summaries, rooflines,
the MLP benchmark's shape selection and results file, hardware counter records."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import pytest

from benchmarks import (config_ab, grouped_mlp, hw_counters, profile_kernels, roofline,
                        shapes, timing)
from pallas_kernels import config as config_lib


def test_interleaved_ms_rotates_the_order_each_round(monkeypatch):
  visits = []

  def fake_time_ms(fn, *args, calls, repeats):
    visits.append(fn(*args))
    return {"a": 1.0, "b": 2.0, "c": 3.0}[visits[-1]]

  monkeypatch.setattr(timing, "time_ms", fake_time_ms)
  fns = {name: (lambda name=name: name, ()) for name in "abc"}
  ms = timing.interleaved_ms(fns, rounds=4)
  assert ms == {"a": 1.0, "b": 2.0, "c": 3.0}
  assert visits == list("abc" "bca" "cab" "abc")


def test_time_ms_runs_the_function():
  ms = timing.time_ms(lambda x: x + 1, jnp.ones(4), calls=3, repeats=2)
  assert ms > 0


def test_config_ab_parses_variants_and_skips_what_does_not_apply():
  assert config_ab.parse_variant("cl2:cluster_n=2,grid_block_n=4") == (
      "cl2", {"cluster_n": 2, "grid_block_n": 4})
  assert config_ab.parse_variant("rows:epilogue_rows=None") == ("rows", {"epilogue_rows": None})
  assert config_ab.parse_variant("same:") == ("same", {})  # the default again: the noise
  for bad in ("cluster_n=2", "x:cluster_n", "x:cluster_n=two"):
    with pytest.raises(ValueError, match="--variant"):
      config_ab.parse_variant(bad)
  skipped = []
  base = config_lib.GmmConfig(**config_lib._WS)
  variants = config_ab.variants_of(
      base, {"cl2": {"cluster_n": 2}, "bad": {"cluster_n": 3}, "tgmm_only": {"block_k": 7}},
      skipped.append)
  assert list(variants) == ["base", "cl2"] and variants["cl2"].cluster_n == 2
  assert config_ab.variants_of(base, {"same": {}}, skipped.append)["same"] == base
  assert len(skipped) == 2


def test_profile_summary_shares_regions_per_warpgroup():
  def trace_of(tid, regions):
    events = []
    for name, begin, end in regions:
      events += [dict(name=name, ph="B", ts=begin, tid=tid), dict(name=name, ph="E", ts=end, tid=tid)]
    return events

  events = (trace_of(1, [("mainloop", 0.0, 6.0), ("epilogue", 6.0, 8.0), ("mainloop", 8.0, 10.0)])
            + trace_of(4, [("mainloop", 0.0, 3.0), ("epilogue", 3.0, 5.0)])  # block 1, wg 0
            + trace_of(2, [("mainloop", 0.0, 4.0), ("epilogue", 4.0, 5.0)]))  # block 0, wg 1
  summary = profile_kernels.summarise({"traceEvents": events}, warpgroups=3)
  assert set(summary) == {"wg0", "wg1"}
  wg0 = summary["wg0"]
  assert abs(wg0["mainloop"]["share"] - (0.8 + 0.6) / 2) < 1e-9
  assert abs(wg0["epilogue"]["share"] - (0.2 + 0.4) / 2) < 1e-9
  assert abs(wg0["mainloop"]["mean_kcycles"] - (6 + 2 + 3) / 3) < 1e-9
  assert wg0["mainloop"]["count"] == 1.5
  assert abs(summary["wg1"]["epilogue"]["share"] - 0.2) < 1e-9


def test_roofline_floor_is_the_slower_of_compute_and_memory():
  m, k, n, g = 32768, 7168, 2048, 256
  weights = 2 * g * k * n
  assert roofline.min_bytes(m, k, n, g, "fwd") == weights + 2 * (m * k + m * n)
  assert roofline.min_bytes(m, k, n, g, "fwd+bwd") == 3 * roofline.min_bytes(m, k, n, g, "wgrad")
  # G=256 moves 7.6 GB per pass: at 3 TB/s and 700 TF/s it can reach 0.52x dense at best.
  ratio = roofline.attainable_ratio(m, k, n, g, "fwd", dense_tflops=700, hbm_gbps=3000)
  compute_s = 2 * m * k * n / 700e12
  assert ratio == pytest.approx(compute_s / (roofline.min_bytes(m, k, n, g, "fwd") / 3000e9))
  assert 0.50 < ratio < 0.53
  # Compute-bound shapes reach 1.
  assert roofline.attainable_ratio(16384, 4096, 2048, 8, "fwd", 700, 3000) == 1.0
  gemm = {"records": [
      {"M": m, "K": k, "N": n, "G": g, "pass": "wgrad", "impl": "jaxmoe", "tflops": 280.0},
      {"M": m, "K": k, "N": n, "G": g, "pass": "fwd", "impl": "dense", "tflops": 700.0},
      {"M": m, "K": k, "N": n, "G": g, "pass": "fwd", "impl": "ragged_dot", "tflops": None}]}
  (rec,) = roofline.records(gemm, hbm_gbps=3000)
  assert rec["pass_"] == "wgrad" and rec["measured_vs_dense"] == 0.4
  assert rec["attainable_vs_dense"] == round(ratio, 3) and rec["target_vs_dense"] is None
  # wgrad tiles: 64-row blocks of the G=256 groups (128 rows on average).
  assert 0.7 < rec["tile_efficiency"] < 0.85
  assert rec["attainable_with_tiles"] <= rec["attainable_vs_dense"]


def test_tile_efficiency_counts_the_rows_the_kernels_multiply():
  # gmm, 128-row tiles from each group's first row (rounded down to 8).
  assert roofline.gmm_tile_efficiency([64, 192], 256, 128) == 256 / (3 * 128)
  # Empty groups and padding rows past the sum cost no compute tiles.
  assert roofline.gmm_tile_efficiency([64, 0, 100], 256, 128) == 164 / (2 * 128)
  # tgmm, 64-row blocks: group 1 starts at row 60, its blocks at row 56.
  assert roofline.tgmm_tile_efficiency([64, 192], 256, 64) == 1.0
  assert roofline.tgmm_tile_efficiency([60, 196], 256, 64) == 256 / (5 * 64)
  # fwd+bwd: three GEMMs of equal FLOPs, each taking time in proportion to 1/efficiency.
  shape = (16384, 4096, 1024, 64)
  passes = [roofline.tile_efficiency(*shape, p) for p in ("fwd", "dgrad", "wgrad")]
  assert roofline.tile_efficiency(*shape, "fwd+bwd") == pytest.approx(
      3 / sum(1 / e for e in passes))
  assert 0.7 < passes[0] < 0.85  # 165 tiles of 128 rows for 16384 rows
  # An MMA-bound pass reaches at most its efficiency; a memory-bound one is unchanged.
  assert roofline.attainable_ratio(16384, 4096, 2048, 8, "fwd", 700, 3000, 0.8) == 0.8
  assert roofline.attainable_ratio(32768, 7168, 2048, 256, "fwd", 700, 3000, 0.9) == (
      roofline.attainable_ratio(32768, 7168, 2048, 256, "fwd", 700, 3000))


def test_grouped_mlp_parses_shapes():
  assert grouped_mlp.parse_shapes("2,0") == (grouped_mlp.SHAPES[2], grouped_mlp.SHAPES[0])
  for bad in ("3", "x", "0,,1"):
    with pytest.raises(ValueError, match="--shapes takes indices"):
      grouped_mlp.parse_shapes(bad)


def test_grouped_mlp_writes_results_after_each_shape(monkeypatch, tmp_path):
  """A run cut short in its second shape leaves the first shape's records, marked incomplete."""
  out = tmp_path / "mlp.json"

  def fake_bench_shape(m, h, f, g, log):
    if g == grouped_mlp.SHAPES[1][3]:
      raise KeyboardInterrupt  # what a time limit does to the run
    return [{"tokens": m, "H": h, "F": f, "G": g, "pass": "fwd", "impl": "fused", "ms": 1.0}]

  monkeypatch.setattr(grouped_mlp, "bench_shape", fake_bench_shape)
  monkeypatch.setattr(sys, "argv", ["grouped_mlp.py", "--shapes", "0,1", "--out", str(out)])
  with pytest.raises(KeyboardInterrupt):
    grouped_mlp.main()
  first = json.loads(out.read_text())
  assert not first["complete"]
  assert [r["G"] for r in first["records"]] == [grouped_mlp.SHAPES[0][3]]

  monkeypatch.setattr(sys, "argv", ["grouped_mlp.py", "--shapes", "2,0", "--out", str(out)])
  grouped_mlp.main()
  both = json.loads(out.read_text())
  assert both["complete"]
  assert [r["G"] for r in both["records"]] == [grouped_mlp.SHAPES[2][3], grouped_mlp.SHAPES[0][3]]


def _ncu_csv(kernels: list[tuple[str, dict]]) -> str:
  """Text shaped like `ncu --csv --page raw --print-units base --log-file` output."""
  metrics = list(hw_counters.METRICS.values())
  lines = ["==PROF== Connected to process 1 (python)",
           ",".join(f'"{c}"' for c in ["ID", "Process ID", "Kernel Name", *metrics]),
           ",".join(f'"{c}"' for c in ["", "", ""] + ["unit"] * len(metrics))]
  for i, (name, values) in enumerate(kernels):
    cells = [str(i), "7", name] + [f"{values[f]:,}" for f in hw_counters.METRICS]
    lines.append(",".join(f'"{c}"' for c in cells))
  return "\n".join(lines + ["==PROF== Disconnected from process 1"]) + "\n"


def test_hw_counters_parses_labels_and_records_ncu_results():
  jobs = hw_counters.job_list([2], ["fwd", "wgrad"])
  assert jobs == [(2, "fwd", "dense"), (2, "fwd", "jaxmoe"), (2, "wgrad", "jaxmoe")]
  counters = dict(duration_ns=250_000.0, dram_read_bytes=680_000_000.0,
                  dram_write_bytes=34_000_000.0, dram_pct_of_peak=81.5, sm_pct_of_peak=80.0,
                  l2_hit_pct=43.0, l2_bytes=1_900_000_000.0)
  text = _ncu_csv([("nvjet_hsh_256x128_2cta", counters),
                   ("anonymous_mosaic_gpu_kernel", counters),
                   ("anonymous_mosaic_gpu_kernel", dict(counters, duration_ns=500_000.0))])
  kernels = hw_counters.parse_ncu_csv(text)
  assert [k["kernel"] for k in kernels] == ["nvjet_hsh_256x128_2cta"] + [
      "anonymous_mosaic_gpu_kernel"] * 2
  assert kernels[0] == {"kernel": "nvjet_hsh_256x128_2cta", **counters}
  recs = [hw_counters.record(job, k) for job, k in hw_counters.label(kernels, jobs)]
  m, k, n, g = shapes.SHAPES[2]
  assert recs[1]["min_bytes"] == 2 * (m * k + g * k * n + m * n)
  assert recs[0]["min_bytes"] == 2 * (m * k + k * n + m * n), "dense reads one weight"
  assert recs[1]["dram_bytes_over_min"] == round(714e6 / recs[1]["min_bytes"], 3)
  assert recs[1]["dram_gbps"] == round(714e6 / 250e-6 / 1e9, 1)
  assert recs[2]["tflops"] == round(2 * m * k * n / 500e-6 / 1e12, 1)
  assert "| wgrad | jaxmoe | 500 |" in hw_counters.format_table(recs)
  # One kernel per job, ours exactly where the job is ours.
  with pytest.raises(ValueError, match="2 kernels for 3 jobs"):
    hw_counters.label(kernels[:2], jobs)
  with pytest.raises(ValueError, match="ran kernel"):
    hw_counters.label(kernels[::-1], jobs)
  with pytest.raises(ValueError, match="no ncu results"):
    hw_counters.parse_ncu_csv("==PROF== Connected\n==ERROR== no access\n")


def test_hw_counters_variants_follow_each_default_and_round_trip():
  variants = dict([config_ab.parse_variant("cl2:cluster_n=2,grid_block_n=4"),
                   config_ab.parse_variant("rows:epilogue_rows=None")])
  jobs = hw_counters.job_list([5], ["fwd", "wgrad"], variants)
  # tgmm's config has no cluster_n: that variant applies to the forward only.
  assert jobs == [(5, "fwd", "dense"), (5, "fwd", "jaxmoe"), (5, "fwd", "cl2"),
                  (5, "fwd", "rows"), (5, "wgrad", "jaxmoe"), (5, "wgrad", "rows")]
  assert hw_counters.pass_configs(5, "fwd", variants)["cl2"].cluster_n == 2
  ours = {"kernel": "anonymous_mosaic_gpu_kernel"}
  assert len(hw_counters.label([{"kernel": "nvjet_tst"}] + [ours] * 5, jobs)) == 6
  args = hw_counters.variant_args(variants)
  assert dict(config_ab.parse_variant(t) for t in args[1::2]) == variants
  assert args[::2] == ["--variant"] * 2


def test_hw_counters_rejects_bad_selections(monkeypatch, capsys):
  for argv in (["--shapes", "9", "--out", "x.json"], ["--passes", "bwd", "--out", "x.json"],
               ["--shapes", "0"]):
    monkeypatch.setattr(sys, "argv", ["hw_counters.py", *argv])
    with pytest.raises(SystemExit) as e:
      hw_counters.main()
    assert e.value.code == 2
  assert "--shapes '9'" in capsys.readouterr().err


def test_hw_counters_main_runs_ncu_and_writes_records(monkeypatch, tmp_path, capsys):
  """main() end to end on the CPU, with ncu stood in for by a fake that writes its log."""
  counters = dict(duration_ns=100_000.0, dram_read_bytes=1e8, dram_write_bytes=1e7,
                  dram_pct_of_peak=50.0, sm_pct_of_peak=60.0, l2_hit_pct=70.0, l2_bytes=1e9)
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append((cmd, kwargs))
    if cmd[:2] == ["ncu", "--version"]:
      return subprocess.CompletedProcess(cmd, 0, stdout="Version 2025.3.1.0\n")
    kernels = [("nvjet_tst", counters)] + [("anonymous_mosaic_gpu_kernel", counters)] * 2
    with open(cmd[cmd.index("--log-file") + 1], "w") as f:
      f.write(_ncu_csv(kernels))
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(hw_counters.shutil, "which", lambda name: "/usr/bin/ncu")
  monkeypatch.setattr(hw_counters.subprocess, "run", fake_run)
  out = tmp_path / "hw.json"
  monkeypatch.setattr(sys, "argv", ["hw_counters.py", "--shapes", "3", "--passes", "fwd",
                                    "--variant", "cl2:cluster_n=2", "--out", str(out)])
  hw_counters.main()
  cmd, kwargs = calls[0]
  assert cmd[0] == "ncu" and "--child" in cmd
  assert cmd[cmd.index("--variant") + 1] == "cl2:cluster_n=2"
  assert kwargs["env"]["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
  result = json.loads(out.read_text())
  assert result["ncu"] == "Version 2025.3.1.0"
  assert [(r["pass_"], r["impl"]) for r in result["records"]] == [
      ("fwd", "dense"), ("fwd", "jaxmoe"), ("fwd", "cl2")]
  assert "| fwd | cl2 |" in capsys.readouterr().out


def test_hw_counters_main_says_why_it_has_no_results(monkeypatch, tmp_path):
  monkeypatch.setattr(sys, "argv", ["hw_counters.py", "--out", str(tmp_path / "hw.json")])
  monkeypatch.setattr(hw_counters.shutil, "which", lambda name: None)
  with pytest.raises(SystemExit, match="ncu .* is not on PATH"):
    hw_counters.main()

  def no_counters(cmd, **kwargs):  # ncu ran the program but could read no counter
    with open(cmd[cmd.index("--log-file") + 1], "w") as f:
      f.write("==ERROR== ERR_NVGPUCTRPERM - no permission to access the counters\n")
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(hw_counters.shutil, "which", lambda name: "/usr/bin/ncu")
  monkeypatch.setattr(hw_counters.subprocess, "run", no_counters)
  with pytest.raises(SystemExit, match="(?s)no ncu results.*ERR_NVGPUCTRPERM"):
    hw_counters.main()
