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
- "auto": ragged on TPU, padded elsewhere. On 2 H100s (with the earlier worst-case
  buffers; benchmarks/results/experiments.json) XLA's ragged-all-to-all made the
  training step 7.7x slower than the padded exchange (56.5 vs 7.4 ms), so GPUs get
  "padded" until that changes.

Bounded buffers, still dropless. A device holds R = t*k sorted rows. Counts go
first: an all_gather of every device's [E] row counts (X*E int32) tells each device
how many rows it sends to and receives from each peer. Rows then move in rounds of
at most C = ceil(capacity_factor * R / X) rows per (source, owner) pair (row j of a
pair's block goes in round j // C), so a receive buffer -- the grouped MLP's M -- is
X*C ~ capacity_factor * R rows whatever X is:

| buffer (per device) | ragged | padded |
|---|---|---|
| send | R x H (the sorted rows themselves) | X*C x H |
| receive (= grouped MLP input, its rows M) | X*C x H | X*C x H |
| bytes on the wire per round | routed rows only | X*C x H |

Round 0 is the normal path (its residuals placed by the layer's offload policy).
Rows past a pair's first C take the overflow path: rounds 1 .. ceil(R/C)-1 in a
`lax.scan`, each the same exchange, grouped MLP and exchange back on the next C rows
of every pair, skipped (`lax.cond`) when no pair of the mesh has rows left, and
rematerialised in the backward pass, so they keep no residuals: memory stays that of
one round. All tokens to one expert is the worst case: ceil(X/capacity_factor)
rounds, run one after another. With `drop_overflow=True` only round 0 runs and the
rows past C are dropped (their outputs are zeros), Switch-style. aux counts them:
"overflow_rows" (rows computed in rounds >= 1) and "dropped_rows".

Memory: at a Mixtral-like and a DeepSeek-like layer (BENCHMARKS.md), the activations
a device keeps for the backward are 1.19-1.20x one device's at every X from 2 to 8
with the default capacity factor, against 6.3-6.6x at X=8 for the worst-case sizing
(capacity_factor = X, one round); tests/test_expert_parallel.py checks that the
compiled temporaries grow with the factor, not with X. When
overflow rounds run, round 0's residuals and one overflow round's recomputation are
live together in the backward pass, and each overflow round repeats its exchanges
there (remat): rows past C cost time, not memory.

Why the ragged transport was slow on GPUs (read from the lowering and XLA's issue
tracker, not yet measured here): a training step issues one ragged-all-to-all per
exchanged tensor and direction -- rows, scales, results, and their transposes, 7 per
round (15 with one overflow round, whose remat repeats the forward ones) -- each
with its own [X*C] zeros output buffer. XLA:GPU's ragged-all-to-all has a one-shot
peer-pointer kernel only for replica groups of <= 8 devices; otherwise (and where
that kernel is not selected) it copies the offsets to the host, waits for the
stream (`BlockHostUntilDone`) and issues a send/recv pair per peer, including peers
with nothing to send (openxla/xla#46982; marin-community/marin#7891 reads this from
the thunk). A fixed cost per call, paid 7+ times a step and serialising the
stream, is the likely cause of 56 ms against 7 ms (the padded exchange sends more
bytes); a profile on the GPUs should confirm it. What our code
controls: the number of calls (the scales, [R] f32, take a call of their own; they
could ride in the rows' payload, or not travel: y is linear in p, so the source
could scale after the combine) and which flags the benchmark sets
(`--xla_gpu_experimental_ragged_all_to_all_use_device_kernel` needs symmetric
buffers, `--xla_gpu_ragged_all_to_all_mode`); to measure on the GPUs.

Chunks (`chunks`, default 1): each device's tokens split into independent pieces,
each with its own exchange rounds (C computed from its t*k/chunks rows), so that
XLA's scheduler may run the exchange of chunk i+1 under the GEMMs of chunk i. Not
yet shown: that XLA:GPU does overlap them (async collective start/done around the
GEMMs in the compiled schedule needs a GPU compile), nor a default from measurement.

Receive layout of a round: the block from source s starts at row s*C, sorted by
expert (the sender's order); a local stable sort by (local expert, source) gives the grouped
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

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmoe import offload
from jaxmoe import permutation
from jaxmoe import routing

Collective = Literal["auto", "ragged", "padded"]
COLLECTIVES: tuple[str, ...] = ("auto", "ragged", "padded")

# Chosen by reasoning, not yet measured on GPUs: with balanced routing a pair's rows
# are Binomial(R, 1/X), R/X +- sqrt(R/X) (4096 +- 64 at 4096 tokens, top-8, X=8), so
# 1.25 leaves routers that balance experts to within 25% on round 0 alone, and it
# keeps the grouped MLP at <= 1.3x the rows of one device (the target);
# heavier skew is still exact, through the overflow rounds.
DEFAULT_CAPACITY_FACTOR = 1.25

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


def check_buffers(capacity_factor, drop_overflow, chunks) -> None:
  """Raises ValueError unless capacity_factor is a positive finite number,
  drop_overflow a bool and chunks a positive int."""
  if (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))
      or not math.isfinite(capacity_factor) or capacity_factor <= 0):
    raise ValueError(
        f"Expected a positive finite number for 'capacity_factor', got {capacity_factor!r}.")
  if not isinstance(drop_overflow, bool):
    raise ValueError(f"Expected a bool for 'drop_overflow', got {drop_overflow!r}.")
  if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
    raise ValueError(f"Expected a positive int for 'chunks', got {chunks!r}.")


def pair_capacity(num_rows: int, num_peers: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * R / X), in [1, R]: rows per (source, owner) pair and
  round; a device's receive buffer (the grouped MLP's M) is X*C rows."""
  return max(1, min(num_rows, math.ceil(capacity_factor * num_rows / num_peers)))


class _Plan(NamedTuple):
  """Who sends what to whom, on one device of the expert axis (all int32).

  For the whole blocks (`_plan`) or one round's window of them (`_window`).
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
  """counts [E]: this device's rows per expert -> the exchange plan (counts first:
  an all_gather of X*E int32 before any row moves)."""
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


def _window(plan: _Plan, start: jax.Array, capacity: int) -> _Plan:
  """One round: rows [start, start + C) of every pair's block (int32 start)."""
  window = lambda sizes: jnp.clip(sizes - start, 0, capacity)
  ends = window(jnp.cumsum(plan.local_counts, axis=1))  # [X, El], inside the window
  return _Plan(
      send_sizes=window(plan.send_sizes),
      input_offsets=plan.input_offsets + start,
      recv_sizes=window(plan.recv_sizes),
      return_offsets=plan.return_offsets + start,
      local_counts=jnp.diff(ends, axis=1, prepend=0),
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
  """The dispatch backwards: out [X*C, ...] in receive layout -> [R, ...] sorted rows,
  zeros where a row is not in this round's window."""
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
  # Windows lie in owner order, so sorted row r is in the first one ending past it,
  # if it starts at or before r.
  r = jnp.arange(num_rows, dtype=jnp.int32)
  ends = plan.input_offsets + plan.send_sizes
  owner = jnp.searchsorted(ends, r, side="right").astype(jnp.int32)
  owner = jnp.minimum(owner, num_peers - 1)
  local = r - plan.input_offsets[owner]
  valid = (local >= 0) & (local < plan.send_sizes[owner])
  picked = back[owner * capacity + jnp.clip(local, 0, capacity - 1)]
  mask = valid.reshape((-1,) + (1,) * (out.ndim - 1))
  return jnp.where(mask, picked, jnp.zeros_like(picked))


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
# A function -> the same function under a `jax.checkpoint` policy (or unchanged).
Wrapper = Callable[[Callable], Callable]


def _identity(fn):
  return fn


def nothing_saved(fn):
  """`fn` rematerialised whole in the backward pass: the overflow rounds' wrapper."""
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


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
  capacity_factor: float = DEFAULT_CAPACITY_FACTOR
  drop_overflow: bool = False
  chunks: int = 1


AUX_KEYS = ("load_balancing_loss", "router_z_loss", "tokens_per_expert",
            "overflow_rows", "dropped_rows")


def moe_forward(config: Config, tokens: jax.Array, router_kernel: jax.Array,
                weights: dict[str, jax.Array | None], mlp: ExpertFn, *,
                checkpoint: Wrapper = _identity, remat: Wrapper = nothing_saved
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MoE layer on `config.mesh`: tokens [T, H] -> (y [T, H], aux).

  Args:
    config: the mesh, its axes, the routing and buffer settings, the resolved
      collective.
    tokens: [T, H]; T must be divisible by the number of devices on the data and
      expert axes.
    router_kernel: [H, E], replicated.
    weights: {"w1": [E, H, F], "w2": [E, F, H], "b1": [E, F] or None, "b2": [E, H]
      or None}, split over the expert axis.
    mlp: `(x [M, H], local weights, group_sizes [El], scales [M]) -> [M, H]`, the
      grouped MLP (not checkpointed), run on each device's experts.
    checkpoint: wraps round 0 (the gather of the tokens, tagged "moe_input", the
      exchanges and the MLP): the layer's residual placement.
    remat: wraps each overflow round; the default saves nothing.

  Returns:
    y [T, H] in config.dtype, and aux with the single-device layer's values,
    "load_balancing_loss", "router_z_loss", "tokens_per_expert" (global counts),
    and "overflow_rows" / "dropped_rows" (int32 scalars, global).
  """
  mesh, token_axes = config.mesh, _token_axes(config)
  num_shards = 1
  for axis in token_axes:
    num_shards *= mesh.shape[axis]
  if tokens.shape[0] % num_shards:
    raise ValueError(
        f"Expected the number of tokens divisible by the {num_shards} devices of the "
        f"mesh axes {token_axes}, got {tokens.shape[0]} tokens.")
  if tokens.shape[0] % (num_shards * config.chunks):
    raise ValueError(
        f"Expected each device's {tokens.shape[0] // num_shards} tokens divisible by "
        f"chunks={config.chunks}.")
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
    rounds = _Rounds(mlp, checkpoint, remat)
    return _local_forward(config, t, r, local, rounds, tokens.shape[0])

  y, aux = jax.shard_map(
      body, mesh=mesh, in_specs=(token_spec, P(), expert_specs),
      out_specs=(token_spec, {k: P() for k in AUX_KEYS}))(tokens, router_kernel, present)
  if _explicit(mesh):  # Back to the caller's layout, which its reshape expects.
    y = jax.sharding.reshard(y, tokens_sharding)
  return y, aux


class _Rounds(NamedTuple):
  """The grouped MLP and the wrappers of round 0 and of the overflow rounds."""
  mlp: ExpertFn
  checkpoint: Wrapper
  remat: Wrapper


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


def _local_forward(config: Config, tokens, router_kernel, weights, rounds: _Rounds,
                   total_tokens: int):
  """Per device: route, sort, exchange, expert MLP, exchange back, combine."""
  axes = _token_axes(config)
  logits = tokens.astype(jnp.float32) @ router_kernel.astype(jnp.float32)
  route = routing.route(logits, config.top_k, config.router)
  counts = routing.tokens_per_expert(route.expert_ids, config.num_experts)
  # Chunks are independent layers on t/chunks tokens each, so that XLA may run the
  # exchanges of one under the GEMMs of another (not yet checked on GPUs).
  size = tokens.shape[0] // config.chunks
  parts, overflow = [], jnp.zeros((), jnp.int32)
  for i in range(config.chunks):
    part = slice(i * size, (i + 1) * size)
    ids = route.expert_ids[part]
    dispatch = permutation.plan_dispatch(
        ids, route.weights[part], routing.tokens_per_expert(ids, config.num_experts))
    y_sorted, rows = _exchange_and_compute(
        config, tokens[part].astype(config.dtype), dispatch, weights, rounds)
    parts.append(permutation.unpermute_and_combine(y_sorted, dispatch, config.top_k))
    overflow = overflow + rows
  y = jnp.concatenate(parts) if config.chunks > 1 else parts[0]

  global_counts = jax.lax.psum(counts, axes)
  fraction = global_counts.astype(jnp.float32) / (total_tokens * config.top_k)
  mean_prob = jax.lax.psum(jnp.sum(route.probs, axis=0), axes) / total_tokens
  z = jax.lax.psum(jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2), axes)
  overflow = jax.lax.psum(overflow, axes)
  none = jnp.zeros((), jnp.int32)
  aux = {
      "load_balancing_loss": config.num_experts * jnp.sum(fraction * mean_prob),
      "router_z_loss": z / total_tokens,
      "tokens_per_expert": global_counts,
      "overflow_rows": none if config.drop_overflow else overflow,
      "dropped_rows": overflow if config.drop_overflow else none,
  }
  return y, aux


def _exchange_and_compute(config: Config, tokens, dispatch: permutation.Dispatch,
                          weights, rounds: _Rounds) -> tuple[jax.Array, jax.Array]:
  """tokens [t, H] -> (the expert outputs of its sorted rows [t*k, H], the number
  of them past their pair's capacity C, int32), computed where the experts live."""
  num_rows = dispatch.order.shape[0]
  num_peers = config.mesh.shape[config.expert_axis]
  capacity = pair_capacity(num_rows, num_peers, config.capacity_factor)
  plan = _plan(dispatch.group_sizes, config.expert_axis)
  overflow = jnp.sum(jnp.maximum(plan.send_sizes - capacity, 0))

  def one_round(tokens, weights, dispatch, plan, start):
    tokens = checkpoint_name(tokens, offload.MOE_INPUT)
    x_sorted = permutation.permute(tokens, dispatch, config.top_k)
    return _round(config, x_sorted, dispatch.scales, weights, rounds.mlp,
                  _window(plan, start, capacity), capacity)

  first = jnp.zeros((), jnp.int32)
  y_sorted = rounds.checkpoint(one_round)(tokens, weights, dispatch, plan, first)
  num_rounds = -(-num_rows // capacity)
  if config.drop_overflow or num_rounds == 1:
    return y_sorted, overflow
  # Same on every device, so that all take the same branch of the cond.
  most = jax.lax.pmax(jnp.max(plan.send_sizes), _token_axes(config))

  # The cond inside the remat: its residuals would be loop-variant outputs of the
  # cond (stacked over the rounds); the remat's are its loop-invariant inputs.
  @rounds.remat
  def overflow_round(tokens, weights, dispatch, plan, start):
    return jax.lax.cond(
        most > start, one_round,
        lambda *_: _zeros_like_varying(tokens, (num_rows, tokens.shape[1])),
        tokens, weights, dispatch, plan, start)

  def step(y_sorted, start):
    return y_sorted + overflow_round(tokens, weights, dispatch, plan, start), None

  starts = jnp.arange(1, num_rounds, dtype=jnp.int32) * capacity
  y_sorted, _ = jax.lax.scan(step, y_sorted, starts)
  return y_sorted, overflow


def _round(config: Config, x_sorted, scales, weights, mlp: ExpertFn, window: _Plan,
           capacity: int) -> jax.Array:
  """One round: the window's rows of x_sorted [R, H] out and back through the
  experts -> [R, H], zeros for rows outside the window."""
  axis, collective = config.expert_axis, config.collective
  x_recv = _dispatch(x_sorted, window, capacity, axis, collective)
  s_recv = _dispatch(scales, window, capacity, axis, collective)
  order, group_sizes = _local_order(window, capacity)
  y_local = mlp(x_recv[order], weights, group_sizes, s_recv[order])
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(order.shape[0], dtype=order.dtype))
  return _combine(y_local[inverse], window, x_sorted.shape[0], capacity, axis,
                  collective)


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
