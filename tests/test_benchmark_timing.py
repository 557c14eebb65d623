"""benchmarks/timing.py: interleaved rounds time every function and rotate their order."""

from __future__ import annotations

import jax.numpy as jnp

from benchmarks import timing


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
