"""Expert parallelism on a `jax.sharding.Mesh`: dispatch and combine under `jax.shard_map`.

Layout on a mesh with a data axis of size D and an expert axis of size X (D may be 1,
or the data axis absent):

- tokens [T, H] are split over both axes: device (d, x) routes its own T / (D*X)
  tokens (`t` below), so the router and the sort run on every device in parallel;
- expert weights [E, ...] are split over the expert axis (device x owns experts
  [x*E/X, (x+1)*E/X), `El` of them) and replicated over the data axis, so the
  data axis only adds a psum of their gradients (done by shard_map's transpose);
- within each row of the expert axis, every device sends each of its (token, slot)
  rows to the device that owns the row's expert, runs the grouped MLP on the rows
  it received for its local experts, and sends the results back.

One exchange, two transports (`collective`):

- "ragged": `jax.lax.ragged_all_to_all` moves exactly the routed rows (GPU, TPU);
- "padded": `jax.lax.all_to_all` of a [X, C, ...] buffer, C rows per peer (any
  backend; XLA:CPU has no ragged-all-to-all in jax 0.11.2);
- "auto": ragged on TPU, padded elsewhere. On 2 H100s (BENCHMARKS.md) XLA's
  ragged-all-to-all made the training step 7.7x slower than the padded exchange
  (56.5 vs 7.4 ms), so GPUs get "padded" until that changes.

Dropless buffer sizing: a device holds R = t*k rows. In the worst case all of them
go to one peer (so a send slot has C = R rows) and all X peers send all their rows to
one device (so a receive buffer has X*R rows). Static shapes must cover that case:

| buffer (per device) | ragged | padded |
|---|---|---|
| send | R x H (the sorted rows themselves) | X*R x H |
| receive (= grouped MLP input, its rows M) | X*R x H | X*R x H |
| bytes on the wire per exchange | routed rows only | X*R x H |

So the expert MLP's activations (h and a, [M, F]) and its offloaded residuals are X
times the size of a perfectly balanced layer's; rows past the received ones are
padding (grouped_mlp gives them zeros). This is the price of being dropless with
static shapes; a capacity factor would cap M at the cost of dropping tokens.

Receive layout: the block from source s starts at row s*C, sorted by expert (the
sender's order); a local stable sort by (local expert, source) gives the grouped
MLP its rows, and its inverse puts the results back before the return exchange,
which is the dispatch run backwards.

Meshes with Auto or Explicit axes both work (Explicit: the tokens are resharded in
and the output back to the caller's layout). Multi-host: call
`jax.distributed.initialize()` and build the mesh over the global `jax.devices()`;
nothing here is host-local (not yet run on more than one host).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmoe import permutation
from jaxmoe import routing

Collective = Literal["auto", "ragged", "padded"]
COLLECTIVES: tuple[str, ...] = ("auto", "ragged", "padded")

# Looked up at call time so tests can swap in `ragged_all_to_all_reference` on CPU.
ragged_all_to_all = jax.lax.ragged_all_to_all


def check_mesh(mesh: jax.sharding.Mesh, expert_axis: str, data_axis: str | None,
               num_experts: int) -> None:
  """Raises ValueError unless `mesh` has the named axes and they split the experts."""
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"Expected a jax.sharding.Mesh for 'mesh', got {type(mesh).__name__}.")
  names = tuple(mesh.axis_names)
  wanted = {"expert_axis": expert_axis, "data_axis": data_axis}
  for arg, name in wanted.items():
    if name is not None and name not in names:
      raise ValueError(
          f"Expected the mesh to have an axis {name!r} ({arg}={name!r}), but its "
          f"axes are {names}; pass {arg}= one of them"
          + (" (or data_axis=None for no data axis)." if arg == "data_axis" else "."))
  if data_axis == expert_axis:
    raise ValueError(f"Expected different expert and data axes, got {expert_axis!r} twice.")
  size = mesh.shape[expert_axis]
  if num_experts % size:
    raise ValueError(
        f"Expected num_experts divisible by the size of the expert axis "
        f"{expert_axis!r} = {size}, got num_experts={num_experts}.")


def resolve_collective(collective: str, mesh: jax.sharding.Mesh) -> str:
  """"auto" -> "ragged" on TPU, else "padded" (the faster one on H100s, see above)."""
  if collective not in COLLECTIVES:
    raise ValueError(f"Unknown collective {collective!r}; expected one of {COLLECTIVES}.")
  if collective != "auto":
    return collective
  platform = mesh.devices.flat[0].platform
  return "ragged" if platform == "tpu" else "padded"


def shard_expert_params(params: dict, mesh: jax.sharding.Mesh, expert_axis: str) -> None:
  """Places expert Params ({name: nnx.Param}, expert dim first) on the expert axis.

  Each Param gets `out_sharding`/`mesh` metadata (so `nnx.get_partition_spec` and
  optimizer states follow it) and its value is `device_put` there.
  """
  for var in params.values():
    spec = (expert_axis,) + (None,) * (var[...].ndim - 1)
    _place(var, mesh, spec)


def replicate_params(params: dict, mesh: jax.sharding.Mesh) -> None:
  """Places Params ({name: nnx.Param}) replicated on every device of `mesh`."""
  for var in params.values():
    _place(var, mesh, (None,) * var[...].ndim)


def _place(var, mesh, spec: tuple) -> None:
  var.set_metadata(out_sharding=spec, mesh=mesh)
  var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, P(*spec))))


class _Plan(NamedTuple):
  """Who sends what to whom, on one device of the expert axis (all int32).

  send_sizes [X]: rows this device sends to each peer; input_offsets [X]: where
  they start in its sorted rows. recv_sizes [X]: rows each peer sends here;
  return_offsets [X]: where this device's results go in each peer's sorted rows.
  local_counts [X, El]: rows from each source per local expert.
  """
  send_sizes: jax.Array
  input_offsets: jax.Array
  recv_sizes: jax.Array
  return_offsets: jax.Array
  local_counts: jax.Array


def _plan(counts: jax.Array, expert_axis: str) -> _Plan:
  """counts [E]: this device's rows per expert -> the exchange plan."""
  num_peers = jax.lax.axis_size(expert_axis)
  me = jax.lax.axis_index(expert_axis)
  # matrix[s, e]: rows device s of this expert-axis row sends to expert e.
  matrix = jax.lax.all_gather(counts, expert_axis)
  per_peer = matrix.reshape(num_peers, num_peers, -1)  # [source, owner, local expert]
  sent = per_peer.sum(-1)                              # [source, owner]
  exclusive = jnp.cumsum(sent, axis=1) - sent
  return _Plan(
      send_sizes=sent[me],
      input_offsets=exclusive[me],
      recv_sizes=sent[:, me],
      return_offsets=exclusive[:, me],
      local_counts=per_peer[:, me, :],
  )


def _dispatch(rows: jax.Array, plan: _Plan, capacity: int, expert_axis: str,
              collective: str) -> jax.Array:
  """rows [R, ...] sorted by expert -> [X*C, ...]: source s's rows from s*C on."""
  num_peers = jax.lax.axis_size(expert_axis)
  me = jax.lax.axis_index(expert_axis)
  if collective == "ragged":
    out = _zeros_like_varying(rows, (num_peers * capacity,) + rows.shape[1:])
    out_offsets = jnp.full((num_peers,), me * capacity, jnp.int32)
    return ragged_all_to_all(rows, out, plan.input_offsets, plan.send_sizes,
                             out_offsets, plan.recv_sizes, axis_name=expert_axis)
  slot = jnp.arange(capacity, dtype=jnp.int32)
  index = plan.input_offsets[:, None] + slot[None, :]               # [X, C]
  valid = slot[None, :] < plan.send_sizes[:, None]
  send = _masked_rows(rows, index, valid)                           # [X, C, ...]
  received = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)
  return received.reshape((num_peers * capacity,) + rows.shape[1:])


def _combine(out: jax.Array, plan: _Plan, num_rows: int, capacity: int,
             expert_axis: str, collective: str) -> jax.Array:
  """The dispatch backwards: out [X*C, ...] in receive layout -> [R, ...] sorted rows."""
  num_peers = jax.lax.axis_size(expert_axis)
  if collective == "ragged":
    back = _zeros_like_varying(out, (num_rows,) + out.shape[1:])
    starts = jnp.arange(num_peers, dtype=jnp.int32) * capacity
    return ragged_all_to_all(out, back, starts, plan.recv_sizes,
                             plan.return_offsets, plan.send_sizes,
                             axis_name=expert_axis)
  blocks = out.reshape((num_peers, capacity) + out.shape[1:])
  back = jax.lax.all_to_all(blocks, expert_axis, 0, 0, tiled=True)  # [X, C, ...]
  back = back.reshape((num_peers * capacity,) + out.shape[1:])
  # Sorted row r went to the peer whose block [offset, offset + size) holds it.
  r = jnp.arange(num_rows, dtype=jnp.int32)
  ends = plan.input_offsets + plan.send_sizes
  owner = jnp.searchsorted(ends, r, side="right").astype(jnp.int32)
  return back[owner * capacity + r - plan.input_offsets[owner]]


def _zeros_like_varying(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zeros of `shape` varying over the mesh axes x varies over: ragged_all_to_all's
  result takes its `output` operand's type, and the kernels' custom_vjp checks it."""
  zeros = jnp.zeros(shape, x.dtype)
  axes = tuple(sorted(jax.typeof(x).manual_axis_type.varying))
  return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def _masked_rows(rows: jax.Array, index: jax.Array, valid: jax.Array) -> jax.Array:
  """rows[index] where valid, else zeros; index/valid [X, C] -> [X, C, ...]."""
  picked = rows[jnp.clip(index, 0, rows.shape[0] - 1)]
  mask = valid.reshape(valid.shape + (1,) * (rows.ndim - 1))
  return jnp.where(mask, picked, jnp.zeros_like(picked))


def _local_order(plan: _Plan, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Receive-layout rows -> order [X*C] sorting them by (local expert, source), and
  group_sizes [El]; rows that hold nothing sort last (padding)."""
  num_peers, num_local = plan.local_counts.shape
  slot = jnp.arange(capacity, dtype=jnp.int32)
  ends = jnp.cumsum(plan.local_counts, axis=1)                       # [X, El]
  expert = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)
  source = jnp.arange(num_peers, dtype=jnp.int32)[:, None]
  key = jnp.where(slot[None, :] < plan.recv_sizes[:, None],
                  expert * num_peers + source, num_local * num_peers)
  order = jnp.argsort(key.reshape(-1), stable=True).astype(jnp.int32)
  return order, plan.local_counts.sum(0).astype(jnp.int32)


# (x [M, H], weights {"w1", "w2", "b1", "b2"}, group_sizes [El], scales [M]) -> [M, H]
ExpertFn = Callable[..., jax.Array]


class Config(NamedTuple):
  """Static settings of `moe_forward` (hashable, so it can close over shard_map)."""
  mesh: jax.sharding.Mesh
  expert_axis: str
  data_axis: str | None
  num_experts: int
  top_k: int
  router: str
  dtype: object
  collective: str


def moe_forward(config: Config, tokens: jax.Array, router_kernel: jax.Array,
                weights: dict[str, jax.Array | None], expert_fn: ExpertFn
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MoE layer on `config.mesh`: tokens [T, H] -> (y [T, H], aux).

  Args:
    config: the mesh, its axes, the routing settings and the resolved collective.
    tokens: [T, H]; T must be divisible by the number of devices on the data and
      expert axes.
    router_kernel: [H, E], replicated.
    weights: {"w1": [E, H, F], "w2": [E, F, H], "b1": [E, F] or None, "b2": [E, H]
      or None}, split over the expert axis.
    expert_fn: `(x [M, H], local weights, group_sizes [El], scales [M]) -> [M, H]`,
      the grouped MLP (with its checkpoint policy), run on each device's experts.

  Returns:
    y [T, H] in config.dtype, and aux with the single-device layer's values:
    "load_balancing_loss", "router_z_loss", "tokens_per_expert" (global counts).
  """
  mesh, token_axes = config.mesh, _token_axes(config)
  num_shards = 1
  for axis in token_axes:
    num_shards *= mesh.shape[axis]
  if tokens.shape[0] % num_shards:
    raise ValueError(
        f"Expected the number of tokens divisible by the {num_shards} devices of the "
        f"mesh axes {token_axes}, got {tokens.shape[0]} tokens.")
  token_spec = P(token_axes, None)
  present = {k: v for k, v in weights.items() if v is not None}
  expert_specs = {k: P(config.expert_axis) for k in present}
  tokens_sharding = _caller_sharding(tokens, mesh)
  tokens = _reshard(tokens, mesh, token_spec)

  def body(t, r, local):
    if config.data_axis is not None:
      # The expert kernels' custom_vjp gives weight gradients varying over the
      # data axis; the transpose of this cast is their psum over it.
      local = {k: jax.lax.pcast(v, config.data_axis, to="varying")
               for k, v in local.items()}
    local = {k: local.get(k) for k in weights}  # Absent biases back as None.
    return _local_forward(config, t, r, local, expert_fn, tokens.shape[0])

  aux_specs = {"load_balancing_loss": P(), "router_z_loss": P(),
               "tokens_per_expert": P()}
  y, aux = jax.shard_map(
      body, mesh=mesh, in_specs=(token_spec, P(), expert_specs),
      out_specs=(token_spec, aux_specs))(tokens, router_kernel, present)
  if _explicit(mesh):  # Back to the caller's layout, which its reshape expects.
    y = jax.sharding.reshard(y, tokens_sharding)
  return y, aux


def _token_axes(config: Config) -> tuple[str, ...]:
  if config.data_axis is None:
    return (config.expert_axis,)
  return (config.data_axis, config.expert_axis)


def _reshard(x: jax.Array, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
  """Explicit-axis meshes need the input already in shard_map's layout."""
  return jax.sharding.reshard(x, NamedSharding(mesh, spec)) if _explicit(mesh) else x


def _caller_sharding(x: jax.Array, mesh: jax.sharding.Mesh) -> NamedSharding:
  """x's sharding, or replicated on `mesh` where x carries none (used for Explicit
  meshes only)."""
  sharding = jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
    return sharding
  return NamedSharding(mesh, P())


def _explicit(mesh: jax.sharding.Mesh) -> bool:
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _local_forward(config: Config, tokens, router_kernel, weights, expert_fn,
                   total_tokens: int):
  """Per device: route, sort, exchange, expert MLP, exchange back, combine."""
  axes = _token_axes(config)
  logits = tokens.astype(jnp.float32) @ router_kernel.astype(jnp.float32)
  route = routing.route(logits, config.top_k, config.router)
  counts = routing.tokens_per_expert(route.expert_ids, config.num_experts)
  dispatch = permutation.plan_dispatch(route.expert_ids, route.weights, counts)
  x_sorted = permutation.permute(tokens.astype(config.dtype), dispatch, config.top_k)
  y_sorted = _exchange_and_compute(config, x_sorted, dispatch.scales, counts,
                                   weights, expert_fn)
  y = permutation.unpermute_and_combine(y_sorted, dispatch, config.top_k)

  global_counts = jax.lax.psum(counts, axes)
  fraction = global_counts.astype(jnp.float32) / (total_tokens * config.top_k)
  mean_prob = jax.lax.psum(jnp.sum(route.probs, axis=0), axes) / total_tokens
  z = jax.lax.psum(jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2), axes)
  aux = {
      "load_balancing_loss": config.num_experts * jnp.sum(fraction * mean_prob),
      "router_z_loss": z / total_tokens,
      "tokens_per_expert": global_counts,
  }
  return y, aux


def _exchange_and_compute(config: Config, x_sorted, scales, counts, weights,
                          expert_fn):
  """Sorted rows [R, H] -> their expert outputs [R, H], computed where the experts live."""
  num_rows = x_sorted.shape[0]
  capacity = num_rows  # Dropless: every row of this device may go to one peer.
  axis, collective = config.expert_axis, config.collective
  plan = _plan(counts, axis)
  x_recv = _dispatch(x_sorted, plan, capacity, axis, collective)
  s_recv = _dispatch(scales, plan, capacity, axis, collective)
  order, group_sizes = _local_order(plan, capacity)
  y_local = expert_fn(x_recv[order], weights, group_sizes, s_recv[order])
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(order.shape[0], dtype=order.dtype))
  return _combine(y_local[inverse], plan, num_rows, capacity, axis, collective)


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes,
                                output_offsets, recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` (one slice per peer) from all_gather: slow, any backend.

  For tests of the ragged path's offsets where XLA has no ragged-all-to-all (CPU).
  """
  del recv_sizes  # Implied by the senders' send_sizes.
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)          # [X, N, ...]
  starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]
  sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
  targets = jax.lax.all_gather(output_offsets, axis_name)[:, me]
  row = jnp.arange(output.shape[0], dtype=jnp.int32)
  mask_shape = (-1,) + (1,) * (output.ndim - 1)
  for source in range(operands.shape[0]):
    inside = (row >= targets[source]) & (row < targets[source] + sizes[source])
    index = jnp.clip(starts[source] + row - targets[source], 0, operand.shape[0] - 1)
    output = jnp.where(inside.reshape(mask_shape), operands[source][index], output)
  return output
