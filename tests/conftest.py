import jax
import pytest


def _has_hopper_gpu() -> bool:
  try:
    return any(d.platform == "gpu" and float(getattr(d, "compute_capability", 0)) >= 9.0
               for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_hopper_gpu():
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA Hopper GPU (run with -m gpu on the device)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
