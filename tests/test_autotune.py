"""The autotuner's problems, candidates and cache, and the config lookups that read it (CPU)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import autotune
from pallas_kernels import config as config_lib
from pallas_kernels import tuning_cache

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
  """An empty user cache folder; lookups forget what they read before and after."""
  monkeypatch.setenv("JAXMOE_TUNING_DIR", str(tmp_path))
  tuning_cache.clear()
  yield tmp_path
  tuning_cache.clear()


def test_mlp_problems_are_the_six_gemms_of_forward_and_backward():
  h, f, g, k = 64, 192, 4, 2
  problems = autotune.mlp_problems(h, f, g, k, tokens=40)
  assert set(problems) == {
      autotune.Problem("gmm", 80, h, f, g), autotune.Problem("gmm", 80, f, h, g),
      autotune.Problem("gmm_t", 80, f, h, g), autotune.Problem("gmm_t", 80, h, f, g),
      autotune.Problem("tgmm", 80, h, f, g), autotune.Problem("tgmm", 80, f, h, g)}


def test_m_bucket_is_the_next_power_of_two():
  assert [tuning_cache.m_bucket(m) for m in (1, 8, 9, 16384, 16385, 24576)] == [
      1, 8, 16, 16384, 32768, 32768]


@pytest.mark.parametrize("name", sorted(autotune.MODELS))
def test_candidates_fit_every_model_problem(name):
  for tokens in autotune.TOKENS:
    for p in autotune.mlp_problems(*autotune.MODELS[name], tokens):
      cands = autotune.candidates(p)
      assert len(cands) >= 3 and len(set(cands)) == len(cands)
      heuristic = (config_lib.heuristic_tgmm_config if p.op == "tgmm"
                   else config_lib.heuristic_gmm_config)(p.m, p.k, p.n, p.g)
      assert cands[0] == heuristic
      for cfg in cands:
        cfg.validate_for(p.k, p.n)


def test_group_sizes_sum_to_m():
  for m, g in ((40, 4), (16384, 256), (8, 8)):
    gs = autotune.group_sizes(m, g)
    assert gs.dtype == np.int32 and gs.shape == (g,) and gs.sum() == m and (gs >= 0).all()


def _write_entry(folder, op, m, k, n, g, cfg, device_kind=H100):
  key = tuning_cache.key(op, m, k, n, g, dtype=jnp.bfloat16, out_itemsize=2)
  tuning_cache.write(folder / tuning_cache.file_name(device_kind),
                     {"entries": {key: {"config": dataclasses.asdict(cfg)}}})


def test_lookups_use_the_cache_for_the_device_kind_and_m_bucket(user_cache):
  m, k, n, g = 24000, 1024, 2048, 16
  tuned = config_lib.GmmConfig(128, 128, 64, 3, 2)
  assert tuned != config_lib.heuristic_gmm_config(m, k, n, g)
  _write_entry(user_cache, "gmm_t", 32768, k, n, g, tuned)
  assert config_lib.gmm_config(m, k, n, g, transpose_rhs=True, device_kind=H100) == tuned
  # Another op, M bucket, device kind or dtype: the heuristic.
  heuristic = config_lib.heuristic_gmm_config(m, k, n, g)
  assert config_lib.gmm_config(m, k, n, g, device_kind=H100) == heuristic
  assert config_lib.gmm_config(16384, k, n, g, transpose_rhs=True, device_kind=H100) == (
      config_lib.heuristic_gmm_config(16384, k, n, g))
  assert config_lib.gmm_config(m, k, n, g, transpose_rhs=True,
                               device_kind="NVIDIA H200") == heuristic
  assert config_lib.gmm_config(m, k, n, g, transpose_rhs=True, dtype=jnp.float16,
                               device_kind=H100) == heuristic
  # Off a GPU there is no device kind: the interpreter never reads the cache.
  assert config_lib.gmm_config(m, k, n, g, transpose_rhs=True) == heuristic


def test_tgmm_lookup_and_abstract_mesh_device_kind(user_cache):
  m, k, n, g = 4096, 1024, 1024, 8
  tuned = config_lib.TgmmConfig(128, 128, 128, 3, 4, warp_specialized=True)
  _write_entry(user_cache, "tgmm", m, k, n, g, tuned)
  device = jax.sharding.AbstractDevice(device_kind=H100, num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    assert config_lib.current_device_kind() == H100
    assert config_lib.tgmm_config(m, k, n, g) == tuned
  assert config_lib.tgmm_config(m, k, n, g) == config_lib.heuristic_tgmm_config(m, k, n, g)


def test_user_cache_overrides_the_shipped_one(user_cache, tmp_path_factory, monkeypatch):
  shipped = tmp_path_factory.mktemp("shipped")
  monkeypatch.setattr(tuning_cache, "SHIPPED_DIR", shipped)
  m, k, n, g = 8192, 512, 512, 8
  _write_entry(shipped, "gmm", m, k, n, g, config_lib.GmmConfig(128, 128, 64, 2, 1))
  assert config_lib.gmm_config(m, k, n, g, device_kind=H100).grid_block_n == 1
  _write_entry(user_cache, "gmm", m, k, n, g, config_lib.GmmConfig(128, 128, 64, 2, 3))
  assert config_lib.gmm_config(m, k, n, g, device_kind=H100).grid_block_n == 3


def test_shipped_entries_build_and_fit_their_problems():
  files = sorted(tuning_cache.SHIPPED_DIR.glob("*.json"))
  for path in files:
    data = tuning_cache.read(path)
    assert {"card", "jax", "date", "command"} <= set(data)
    assert tuning_cache.file_name(data["card"]) == path.name
    for key, entry in data["entries"].items():
      op, dtype, out_bytes, m, k, n, g = key.split("|")
      make = config_lib.TgmmConfig if op == "tgmm" else config_lib.GmmConfig
      cfg = make(**entry["config"])
      cfg.validate_for(int(k), int(n), np.dtype(dtype).itemsize, int(out_bytes))
      assert tuning_cache.m_bucket(int(m)) == int(m)
  assert files, "no tuning cache is shipped"


def test_bad_cache_and_op_are_value_errors(tmp_path):
  path = tmp_path / "x.json"
  path.write_text(json.dumps({"records": []}))
  with pytest.raises(ValueError, match="entries"):
    tuning_cache.read(path)
  with pytest.raises(ValueError, match="gmm_t"):
    tuning_cache.key("dgrad", 8, 64, 64, 1, dtype=jnp.bfloat16, out_itemsize=2)


def test_sweep_picks_the_fastest_config_that_computes_the_right_thing(monkeypatch):
  """The sweep's bookkeeping with stand-in kernels: a slow one, a wrong one, a fast one."""
  p = autotune.Problem("gmm", 64, 64, 64, 2)
  configs = [config_lib.heuristic_gmm_config(p.m, p.k, p.n, p.g),
             config_lib.GmmConfig(64, 64, 64, 2, 1), config_lib.GmmConfig(64, 64, 64, 3, 1)]
  monkeypatch.setattr(autotune, "candidates", lambda p: configs)
  delays = {configs[0]: 4, configs[1]: 0, configs[2]: 1}

  def kernel(p, cfg):
    def f(lhs, rhs, gs):
      out = jax.lax.ragged_dot(lhs, rhs, gs)
      for _ in range(delays[cfg]):  # slower configs do more (unused) work
        out = out + 0 * jnp.sin(lhs @ lhs.T).sum()
      return out + (1.0 if cfg is configs[1] else 0.0)  # configs[1] is wrong
    return jax.jit(f)

  monkeypatch.setattr(autotune, "_kernel", kernel)
  monkeypatch.setattr(autotune, "time_ms", lambda fn, args, **kw: 1.0 + delays[
      next(c for c, f in compiled.items() if f is fn)])
  compiled = {}
  real_compile = autotune._compile

  def compile_and_remember(p, cfg, args):
    compiled[cfg] = real_compile(p, cfg, args)
    return compiled[cfg]

  monkeypatch.setattr(autotune, "_compile", compile_and_remember)
  r = autotune.sweep(p, log=lambda *a: None)
  assert r.best == configs[2]
  assert [c for c, _ in r.dropped] == [configs[1]]
  assert r.ratio(r.heuristic) == pytest.approx(5.0 / 2.0)
  assert r.record()["heuristic_x"] == 2.5 and r.entry()["config"]["max_concurrent_steps"] == 3


def test_main_refuses_to_time_off_a_gpu(capsys):
  with pytest.raises(SystemExit):
    autotune.main(["--models", "olmoe-1b-7b", "--tokens", "8"])
  assert "GPU" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    autotune.main(["--models", "gpt-5"])
  with pytest.raises(SystemExit):
    autotune.main(["--gemms", "16x16"])
