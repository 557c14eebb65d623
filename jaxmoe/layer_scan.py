"""A layer scan whose offloaded residuals reach host one layer late and return one layer early.

Under `jax.lax.scan` with `offload_policy`, XLA has to finish each residual's copy to
host inside the loop iteration of the layer that made it, so a copy can only hide
under the rest of its own layer (FC2 alone for `activation_input`), and in backward
each copy back starts just before its first use. `offload_scan` software-pipelines
the copies across layers instead:

    forward, layer i:   copy layer i-1's residuals to host  |  layer i's forward
    backward, layer i:  copy layer i-1's residuals to device |  layer i's backward

Each copy hides under a whole layer, at the cost of a second layer's offloaded
residuals on device while it is in flight. A layer's moved residuals travel as one
flat buffer (`_Packing`). The last layer's residuals never leave the device: its
backward runs first. Layer 0 runs outside the loops (it has no predecessor to copy).
As `jax.lax.scan` does, a residual that depends on none of a layer's inputs (an
attention mask) is kept once, not once per layer, and one that the layer's backward
never reads (`jax.vjp` keeps the masked attention logits) is not kept. (Compiling the
step, XLA dropped most of those itself: the GPU demo step's device memory fell only
from 14.28 to 14.13 GiB, while `saved_residuals` counted 2.4 GiB of them.)

The layers decide which residuals are offloaded (their `offload_names`); the scan
only decides when they move. The values are those of `jax.lax.scan` (bitwise, on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe import offload

_KEPT = "kept"    # a residual stacked on device, as lax.scan does
_MOVED = "moved"  # an offloaded residual: to host one layer late, back one layer early
_SHARED = "shared"  # a residual of no layer input: layer 0's serves every layer
_UNUSED = "unused"  # a residual that the layer's backward never reads: not kept
# Unary ops between a `checkpoint_name` and the residual it tags (JAX passes custom_vjp
# residuals through a reduce_precision to their own precision).
_VALUE_PRESERVING = ("reduce_precision", "copy")


def offload_scan(layer_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
                 carry: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
  """`jax.lax.scan(lambda c, x: layer_fn(x, c), carry, xs)`, differentiable in the
  float leaves of `xs` and in `carry`, with pipelined copies of offloaded residuals.

  Args:
    layer_fn: (x_i, carry) -> (carry, out_i), one layer. Residuals that it tags with
      a name its `offload_policy` offloads are moved by this scan. It must not close
      over values being differentiated (pass them in `xs` or `carry`).
    carry: the layer input, a float array (e.g. the residual stream [T, H]).
    xs: a pytree with a leading [L] axis on every leaf (a layer's parameters);
      non-float leaves are not differentiated.

  Returns:
    (carry after L layers, outs stacked along a leading [L] axis); outs must be float.

  Raises:
    ValueError: xs has no leaves or leaves with different leading sizes, or carry or
      an out is not a float array.
  """
  leaves = jax.tree.leaves(xs)
  lengths = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(
        "Expected xs with a leading layer axis of one size on every leaf, got leaf "
        f"shapes {[tuple(leaf.shape) for leaf in leaves]}.")
  _check_float("carry", carry)
  diff, nondiff = _partition(leaves, [_is_float(leaf) for leaf in leaves])
  treedef = jax.tree.structure(xs)

  def layer(diff, carry, nondiff):
    return layer_fn(jax.tree.unflatten(treedef, _interleave(leaves, diff, nondiff)), carry)

  return _pipelined_scan(layer)(diff, carry, nondiff)


def scan_layers(step: Callable[[jax.Array, nnx.Module], tuple[jax.Array, Any]],
                carry: jax.Array, layers: nnx.Module) -> tuple[jax.Array, Any]:
  """`nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(carry, layers)`
  through `offload_scan`.

  Args:
    step: (carry, layer) -> (carry, out) for one layer module; it must not change the
      layer's state.
    carry: a float array.
    layers: modules made with `nnx.vmap` (a leading [L] axis on every array).
  """
  graphdef, state = nnx.split(layers)
  return offload_scan(lambda s, c: step(c, nnx.merge(graphdef, s)), carry, state)


def _pipelined_scan(layer):
  """The custom_vjp scan of layer(diff_i, carry, nondiff_i) -> (carry, out_i).

  Layer 0 runs outside the loops, so that no iteration copies a layer that does not
  exist: the forward loop runs layers 1..L-1 and copies layers 0..L-2; the backward
  loop runs layers L-1..1 and copies back layers L-2..0.
  """
  residuals = {}  # The layer's residual layout, found while tracing the forward pass.

  @jax.custom_vjp
  def scan(diff, carry, nondiff):
    return jax.lax.scan(lambda c, x: layer(*x[:1], c, *x[1:]), carry, (diff, nondiff))

  def layer_forward(i, diff, nondiff, carry):
    """Layer i: (carry, out, its moved residuals packed, its kept residuals, its
    shared residuals)."""
    d, nd = _layer(diff, i), _layer(nondiff, i)
    (carry, out), vjp_fn = jax.vjp(lambda d, c: layer(d, c, nd), d, carry)
    for leaf in jax.tree.leaves(out):
      _check_float("every out of layer_fn", leaf)
    leaves, residuals["treedef"] = jax.tree.flatten(vjp_fn)
    kinds = residuals["kinds"]
    if len(leaves) != len(kinds):  # Guards the positional match of leaves and kinds.
      raise AssertionError(f"layer {i} has {len(leaves)} residuals, {len(kinds)} expected")
    moved, kept, shared = ([r for r, k in zip(leaves, kinds) if k == kind]
                           for kind in (_MOVED, _KEPT, _SHARED))
    return carry, out, residuals["packing"].pack(moved), kept, shared

  def layer_backward(i, diff, nondiff, moved, kept, shared, d_carry, d_out):
    """Layer i's cotangents (of its diff slice, of its input carry)."""
    d = _layer(diff, i)
    vjp_fn = jax.tree.unflatten(
        residuals["treedef"],
        _assemble(residuals["kinds"], residuals["packing"].unpack(moved), kept, shared,
                  residuals["unused"], d))
    return vjp_fn((d_carry, d_out))

  def forward(diff, carry, nondiff):
    num_layers = jax.tree.leaves((diff, nondiff))[0].shape[0]
    one_layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                             (diff, nondiff))
    with offload.deferred_offloads() as names:
      kinds, moved_avals, residuals["unused"] = _residual_kinds(
          layer, one_layer, carry, names)
      residuals["kinds"] = kinds
      residuals["packing"] = _Packing(moved_avals)
      # Layer 0 traced as the loop's layers are (jit: even when the caller's trace is
      # eager), so that its jax.vjp saves the same residuals in the same order.
      carry, out0, moved0, kept0, shared = jax.jit(layer_forward)(
          jnp.int32(0), diff, nondiff, carry)

      def body(state, i):
        carry, previous = state
        on_host = _to(jax.memory.Space.Host, previous)
        carry, out, moved, kept, _ = layer_forward(i, diff, nondiff, carry)
        return (carry, moved), (out, on_host, kept)

      # The last layer's residuals stay on device: its backward runs first.
      (carry, last), (outs, on_host, kept) = jax.lax.scan(
          body, (carry, moved0), jnp.arange(1, num_layers))
    outs = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), out0, outs)
    return (carry, outs), (diff, nondiff, on_host, kept0, kept, last, shared)

  def backward(res, cotangents):
    diff, nondiff, on_host, kept0, kept, last, shared = res
    d_carry, d_outs = cotangents
    num_layers = jax.tree.leaves((diff, nondiff))[0].shape[0]

    # The gradients are written in place into one [L, ...] buffer per leaf (stacking
    # the loop's and layer 0's would copy them all once more).
    def body(state, x):
      d_carry, moved, d_diff = state
      i, previous_on_host, kept, d_out = x
      previous = _to(jax.memory.Space.Device, previous_on_host)
      d_d, d_carry = layer_backward(i, diff, nondiff, moved, kept, shared, d_carry, d_out)
      return (d_carry, previous, _write_layer(d_diff, d_d, i)), None

    d_outs_rest = jax.tree.map(lambda a: a[1:], d_outs)
    (d_carry, moved0, d_diff), _ = jax.lax.scan(
        body, (d_carry, last, jax.tree.map(jnp.zeros_like, diff)),
        (jnp.arange(1, num_layers), on_host, kept, d_outs_rest), reverse=True)
    d_d0, d_carry = layer_backward(0, diff, nondiff, moved0, kept0, shared, d_carry,
                                   jax.tree.map(lambda a: a[0], d_outs))
    return _write_layer(d_diff, d_d0, 0), d_carry, None

  scan.defvjp(forward, backward)
  return scan


def _layer(stacked, i):
  """Layer i's slice of every leaf of a stacked pytree."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                      stacked)


def _write_layer(stacked, layer, i):
  """`stacked` with layer i's slice of every leaf replaced by `layer`'s."""
  return jax.tree.map(
      lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), i, 0),
      stacked, layer)


class _Packing:
  """The moved residuals as one flat buffer per dtype.

  Packed, a layer's copy to host is one transfer that starts with the loop iteration,
  and the next layer's residuals are written into the carried buffer at its end.
  Carried separately, XLA finished the copy of fc1_input before the gather that
  writes its successor and ran the two copies one after the other: 303.5 ms a step
  against 270 ms packed at benchmarks/offload.py's compute-bound shape on an H100
  (BENCHMARKS.md "Pipelined layer scan"). Unpacking costs a copy of the layer's
  residuals on device in backward.
  """

  def __init__(self, avals):
    self.avals = avals
    self.dtypes = sorted({jnp.dtype(a.dtype) for a in avals}, key=str)

  def pack(self, arrays):
    return [jnp.concatenate([a.reshape(-1) for a in arrays if a.dtype == dtype])
            for dtype in self.dtypes]

  def unpack(self, flats):
    """The residuals, sliced out of one layer's flat buffers."""
    return [flats[t][start:start + size].reshape(aval.shape)
            for t, start, size, aval in self._pieces()]

  def _pieces(self):
    """(flat buffer index, offset, size, aval) of each residual."""
    offsets = [0] * len(self.dtypes)
    for aval in self.avals:
      t = self.dtypes.index(jnp.dtype(aval.dtype))
      size = int(np.prod(aval.shape))
      yield t, offsets[t], size, aval
      offsets[t] += size


def _residual_kinds(layer, one_layer, carry, names):
  """Classifies each leaf of one layer's `jax.vjp` function: _UNUSED (its backward
  never reads it: jax.vjp keeps some values that lax.scan's partial evaluation
  drops, such as the masked attention logits), the index of the float input it
  forwards (not stacked: sliced from xs again in backward), _MOVED (tagged with a
  name in `names`, which tracing fills), _SHARED (computed from none of the layer's
  inputs, so the same in every layer) or _KEPT. Also returns the moved avals and
  the unused avals.

  The leaves are matched to names the way `jax.ad_checkpoint.print_saved_residuals`
  does: through the equations of the traced forward pass.
  """
  (diff, nondiff) = one_layer
  vjp_treedef = []

  def vjp_leaves(d, c, nd):
    outs, vjp_fn = jax.vjp(lambda d, c: layer(d, c, nd), d, c)
    leaves, treedef = jax.tree.flatten(vjp_fn)
    vjp_treedef.append(treedef)
    return leaves, outs

  closed, (leaf_shapes, out_shapes) = jax.make_jaxpr(vjp_leaves, return_shape=True)(
      diff, carry, nondiff)
  backward = jax.make_jaxpr(
      lambda leaves, cts: jax.tree.unflatten(vjp_treedef[0], leaves)(cts))(
          leaf_shapes, out_shapes)
  used = _needed_inputs(backward.jaxpr, [True] * len(backward.jaxpr.outvars))
  jaxpr = closed.jaxpr
  diff_inputs = {v: i for i, v in enumerate(jaxpr.invars[:len(jax.tree.leaves(diff))])}
  tagged = {}  # var -> residual name, through ops that keep the value
  # Vars computed from the layer's inputs (an equation's outputs from all its inputs).
  from_inputs = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(not _is_literal(v) and v in from_inputs for v in eqn.invars):
      from_inputs.update(eqn.outvars)
    if eqn.primitive.name == "name":
      tagged[eqn.outvars[0]] = eqn.params["name"]
    elif (eqn.primitive.name in _VALUE_PRESERVING and
          not _is_literal(eqn.invars[0]) and eqn.invars[0] in tagged):
      tagged[eqn.outvars[0]] = tagged[eqn.invars[0]]
  kinds, moved_avals, unused_avals = [], [], []
  for v, aval, is_used in zip(jaxpr.outvars, leaf_shapes, used):
    if not is_used:
      kinds.append(_UNUSED)
      unused_avals.append(aval)
    elif _is_literal(v) or v not in from_inputs:
      kinds.append(_SHARED)
    elif v in diff_inputs:
      kinds.append(diff_inputs[v])
    elif tagged.get(v) in names:
      kinds.append(_MOVED)
      moved_avals.append(aval)
    else:
      kinds.append(_KEPT)
  return kinds, moved_avals, unused_avals


def _needed_inputs(jaxpr, outs_needed) -> list[bool]:
  """Which inputs of `jaxpr` the needed outputs (or its effects) read, looking
  inside nested jit calls (where JAX's transpose rules pass values they ignore)."""
  needed = {v for v, n in zip(jaxpr.outvars, outs_needed) if n and not _is_literal(v)}
  for eqn in reversed(jaxpr.eqns):
    outs = [v in needed for v in eqn.outvars]
    if not (any(outs) or eqn.effects):
      continue
    inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
    ins = (_needed_inputs(inner.jaxpr, outs) if inner is not None and not eqn.effects
           else [True] * len(eqn.invars))
    needed.update(v for v, n in zip(eqn.invars, ins) if n and not _is_literal(v))
  return [v in needed for v in jaxpr.invars]


def _is_literal(v) -> bool:
  return isinstance(v, jax.extend.core.Literal)


def _to(space, arrays):
  return [jax.device_put(a, space) for a in arrays]


def _assemble(kinds, moved, kept, shared, unused_avals, diff):
  """The vjp function's leaves, in order, from the moved, kept, shared and input
  leaves, with zeros (which XLA drops) for the unused ones."""
  unused = (jnp.zeros(a.shape, a.dtype) for a in unused_avals)
  rest = {_MOVED: iter(moved), _KEPT: iter(kept), _SHARED: iter(shared), _UNUSED: unused}
  return [diff[k] if isinstance(k, int) else next(rest[k]) for k in kinds]


def _partition(leaves, mask):
  """(leaves where mask, leaves where not mask)."""
  return ([leaf for leaf, m in zip(leaves, mask) if m],
          [leaf for leaf, m in zip(leaves, mask) if not m])


def _interleave(leaves, diff, nondiff):
  """Inverse of `_partition(leaves, float mask)`."""
  diff, nondiff = iter(diff), iter(nondiff)
  return [next(diff if _is_float(leaf) else nondiff) for leaf in leaves]


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _check_float(what: str, x) -> None:
  if not _is_float(x):
    raise ValueError(f"Expected {what} to be a float array, got {x.dtype}.")
