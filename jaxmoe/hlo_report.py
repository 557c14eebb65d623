"""What the compiled HLO of a training step says about host offload.

Check the compiled HLO, not only the code, before believing anything is
offloaded (DESIGN.md): XLA may drop a host round trip or serialise the copies.
"""

from __future__ import annotations

import re

from flax import nnx
import jax


def compile_step(step, model, optimizer, *args, donate_state: bool = False
                 ) -> jax.stages.Compiled:
  """`step(model, optimizer, *args)`, an nnx training step, compiled as
  `(state, *args) -> (out, new state)` with state = `nnx.state((model, optimizer))`
  (`.as_text()` gives its HLO, `.memory_analysis()` its buffer sizes, host ones
  included). With `donate_state`, calling it consumes the state passed in."""
  graphdef, state = nnx.split((model, optimizer))

  def pure(state, *args):
    model, optimizer = nnx.merge(graphdef, state)
    out = step(model, optimizer, *args)
    return out, nnx.state((model, optimizer))

  donate = (0,) if donate_state else ()
  return jax.jit(pure, donate_argnums=donate).lower(state, *args).compile()


def offload_summary(hlo_text: str) -> dict[str, int]:
  """Counts of the instructions that move data between device and pinned host.

  host_shapes: instructions whose result lives in host memory (layout `S(5)`);
  copy_start / copy_done: asynchronous copies (overlappable); the rest are
  synchronous moves or host-memory dynamic slices in loops.
  """
  lines = hlo_text.splitlines()
  count = lambda pattern: sum(bool(re.search(pattern, line)) for line in lines)  # noqa: E731
  return {
      "host_shapes": count(r"S\(5\)"),
      "copy_start": count(r"= .*copy-start\("),
      "copy_done": count(r"= .*copy-done\("),
      "host_dynamic_update_slice": count(r"S\(5\).*dynamic-update-slice"),
      "host_dynamic_slice": count(r"dynamic-slice.*S\(5\)"),
      "custom_calls": count(r"custom-call\("),
  }
