"""Executes the example notebooks with nbclient, in a kernel of this very Python.

    python tools/run_notebooks.py                    # all of notebooks/, in place, size by backend
    python tools/run_notebooks.py --size cpu 01 03   # notebooks whose names start 01, 03
    python tools/run_notebooks.py --size gpu --out DIR

The size reaches the notebooks as JAXMOE_NOTEBOOK_SIZE. The kernel is started from
`sys.executable` through a kernelspec of its own, so no Jupyter install or
kernelspec on the machine is needed or consulted (only ipykernel importable here).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "python3"


def _kernel_manager(spec_dir: str) -> KernelManager:
  """A kernel manager whose only kernelspec runs ipykernel on sys.executable."""
  spec = pathlib.Path(spec_dir, "kernels", KERNEL)
  spec.mkdir(parents=True, exist_ok=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (ipykernel)", "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
  return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def execute(path: pathlib.Path, out: pathlib.Path | None = None, *,
            timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
  """Runs every cell of `path` (cwd: its folder), writes it to `out` (default: in place).

  Raises nbclient's CellExecutionError on the first failing cell; the notebook
  executed so far is still written, so its outputs show what went wrong.
  """
  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as spec_dir:
    client = NotebookClient(
        nb, km=_kernel_manager(spec_dir), timeout=timeout, record_timing=False,
        resources={"metadata": {"path": str(path.parent)}})
    try:
      client.execute()
    finally:
      nbformat.write(nb, out or path)
  return nb, time.perf_counter() - start


def select(prefixes: list[str]) -> list[pathlib.Path]:
  paths = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
  chosen = [p for p in paths if not prefixes or any(p.name.startswith(x) for x in prefixes)]
  if not chosen:
    raise SystemExit(f"No notebook in {NOTEBOOKS} matches {prefixes}.")
  return chosen


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("names", nargs="*", help="name prefixes (default: all notebooks)")
  p.add_argument("--size", choices=("cpu", "gpu"),
                 help="JAXMOE_NOTEBOOK_SIZE (default: the notebooks choose by backend)")
  p.add_argument("--out", type=pathlib.Path, help="folder for the executed notebooks")
  p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
  args = p.parse_args()
  if args.size:
    os.environ["JAXMOE_NOTEBOOK_SIZE"] = args.size
  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
  failed = 0
  for path in select(args.names):
    out = args.out / path.name if args.out else path
    try:
      _, seconds = execute(path, out, timeout=args.timeout)
      print(f"{path.name}: ok in {seconds:.0f} s -> {out}", flush=True)
    except Exception as e:  # noqa: BLE001 -- report every notebook, fail at the end
      failed += 1
      print(f"{path.name}: FAILED ({type(e).__name__}) -> {out}\n{str(e)[-3000:]}", flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
