"""The example notebooks run end to end at CPU size (JAXMOE_NOTEBOOK_SIZE=cpu).

Each is executed with nbclient in a kernel of this Python (tools/run_notebooks.py)
into a temporary file; the committed notebooks are left as they are.
"""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _runner():
  spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _outputs(nb, kind):
  """Text of every stream output, or the count of image outputs, over all code cells."""
  outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  if kind == "text":
    return "".join(o.get("text", "") for o in outs if o.output_type == "stream")
  return sum("image/png" in o.get("data", {}) for o in outs)


def test_there_are_three_notebooks():
  assert [p.name for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_offload.ipynb", "03_kernels.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_cpu_size(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXMOE_NOTEBOOK_SIZE", "cpu")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb, _ = _runner().execute(path, tmp_path / path.name, timeout=300)
  first = nb.cells[[c.cell_type for c in nb.cells].index("code")]
  assert "card: cpu | jax " in first.outputs[0]["text"] and "size: cpu" in first.outputs[0]["text"]
  assert _outputs(nb, "images") >= 1
  assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  text = _outputs(nb, "text")
  expected = {
      "01_quickstart": ["bfloat16<host>", "tokens/s after step 1", "residuals on host"],
      "02_offload": ["offload_default", "recompute_all", "cheapest memory here"],
      "03_kernels": ["jaxmoe gmm (xla)", "NVIDIA H100", "x dense"],
  }[path.stem]
  for line in expected:
    assert line in text, (line, text[-2000:])
