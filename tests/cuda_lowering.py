"""Lowering a jitted function for an H100 on a CPU-only host."""

import jax

H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def as_if_on_h100():
  """Context in which the Mosaic GPU kernels trace and lower for an H100."""
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H100))


def lower_for_h100(fn, *args, **kwargs) -> str:
  """StableHLO text of `jax.jit(fn)` lowered for cuda, with the Mosaic GPU kernels
  compiled to their custom calls (layout rules are checked; shared-memory limits
  and some TMA rules only at GPU compile time)."""
  with as_if_on_h100():
    return jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()
