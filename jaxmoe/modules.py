"""Flax NNX modules: the expert MLP and a dropless top-k MoE layer around it."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxmoe import expert_parallel
from jaxmoe import fp8 as fp8_lib
from jaxmoe import offload
from jaxmoe import permutation
from jaxmoe import routing
from jaxmoe.mlp import grouped_mlp
from pallas_kernels import common

# Expert weights [G, in, out]: fan-in is the middle axis, experts are a batch axis.
default_expert_init = nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


class GroupedMLP(nnx.Module):
  """The expert MLP of `grouped_mlp`, with its residuals placed by a checkpoint policy.

  With `fp8=jaxmoe.fp8.BlockwiseRecipe()` its GEMMs run in blockwise-scaled FP8: the
  master weights keep `param_dtype` and are quantised inside each call, and
  `fc1_input` / `fc2_input` are saved (and offloaded) as FP8 values plus scales.

  Example:
    >>> mlp = GroupedMLP(4, 16, 32, rngs=nnx.Rngs(0))
    >>> mlp.w1.shape, mlp.w2.shape
    ((4, 16, 32), (4, 32, 16))
  """

  def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *,
               use_bias: bool = False,
               offload_names: str | Iterable[str] = offload.DEFAULT_OFFLOAD_NAMES,
               recompute_names: str | Iterable[str] = (),
               backend: common.Backend = "auto", fused: bool = True,
               fp8: fp8_lib.BlockwiseRecipe | None = None,
               dtype=jnp.bfloat16, param_dtype=jnp.float32,
               kernel_init=default_expert_init, rngs: nnx.Rngs):
    offload.offload_policy(offload_names, recompute_names)  # Validates the names.
    common.check_backend(backend)
    fp8_lib.check_recipe(fp8)
    if fp8 is not None:
      fp8_lib.check_sizes(hidden_size, ffn_size)
    self.offload_names = offload.as_names(offload_names, "offload_names")
    self.recompute_names = offload.as_names(recompute_names, "recompute_names")
    self.backend = backend
    self.fused = fused
    self.fp8 = fp8
    self.dtype = dtype
    g, h, f = num_experts, hidden_size, ffn_size
    self.w1 = nnx.Param(kernel_init(rngs.params(), (g, h, f), param_dtype))
    self.w2 = nnx.Param(kernel_init(rngs.params(), (g, f, h), param_dtype))
    if use_bias:
      self.b1 = nnx.Param(jnp.zeros((g, f), param_dtype))
      self.b2 = nnx.Param(jnp.zeros((g, h), param_dtype))
    else:
      self.b1 = nnx.data(None)
      self.b2 = nnx.data(None)

  def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array,
               scales: jax.Array) -> jax.Array:
    """x_sorted [M, H] (rows sorted by expert), group_sizes [G] int32, scales [M] -> [M, H]."""
    mlp = self.checkpointed(self.pure_fn())
    return mlp(x_sorted.astype(self.dtype), self.weights(), group_sizes, scales)

  def checkpointed(self, fn):
    """`fn` under `jax.checkpoint` with this module's residual placement.

    Not on the "interpret" backend: the Pallas interpreter's callbacks cannot be
    checkpointed, and residual placement never changes results.
    """
    if self.backend == "interpret":
      return fn
    return jax.checkpoint(
        fn, policy=offload.offload_policy(self.offload_names, self.recompute_names))

  def weights(self) -> dict[str, jax.Array | None]:
    """w1, w2, b1, b2 cast to the compute dtype (None where absent); with fp8, w1
    and w2 in the parameter dtype (they are quantised from the master weights)."""
    cast = lambda p: None if p is None else p[...].astype(self.dtype)
    w = (lambda p: p[...]) if self.fp8 is not None else cast
    return dict(w1=w(self.w1), w2=w(self.w2), b1=cast(self.b1), b2=cast(self.b2))

  def pure_fn(self):
    """(x_sorted, weights, group_sizes, scales) -> y: `grouped_mlp`, not checkpointed."""
    def mlp(x_sorted, weights, group_sizes, scales):
      return grouped_mlp(x_sorted, weights["w1"], weights["w2"], group_sizes, scales,
                         b1=weights["b1"], b2=weights["b2"], backend=self.backend,
                         fused=self.fused, fp8=self.fp8)
    return mlp


class MoELayer(nnx.Module):
  """Dropless top-k Mixture-of-Experts layer: router, sort by expert, expert MLP, combine.

  The router's top-k weights are the expert MLP's `scales`, so the combine is a
  plain sum of each token's k expert outputs. `fp8` is the expert MLP's
  (`GroupedMLP`); the router stays in float32.

  Example:
    >>> layer = MoELayer(16, 32, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
    >>> y, aux = layer(jnp.ones((2, 8, 16)))
    >>> y.shape, sorted(aux), int(aux["tokens_per_expert"].sum())
    ((2, 8, 16), ['load_balancing_loss', 'router_z_loss', 'tokens_per_expert'], 32)
  """

  def __init__(self, hidden_size: int, ffn_size: int, num_experts: int,
               top_k: int, *,
               offload_names: str | Iterable[str] = offload.DEFAULT_OFFLOAD_NAMES,
               recompute_names: str | Iterable[str] = (),
               router: routing.Router = "softmax", use_bias: bool = False,
               backend: common.Backend = "auto", fused: bool = True,
               fp8: fp8_lib.BlockwiseRecipe | None = None,
               dtype=jnp.bfloat16, param_dtype=jnp.float32,
               mesh: jax.sharding.Mesh | None = None, expert_axis: str = "expert",
               data_axis: str | None = "data",
               collective: expert_parallel.Collective = "auto",
               capacity_factor: float | None = None, drop_overflow: bool = False,
               chunks: int = 1, rngs: nnx.Rngs):
    if router not in routing.ROUTERS:
      raise ValueError(f"Unknown router {router!r}; expected one of {routing.ROUTERS}.")
    if not 1 <= top_k <= num_experts:
      raise ValueError(
          f"Expected 1 <= top_k <= num_experts={num_experts}, got top_k={top_k}.")
    self.hidden_size = hidden_size
    self.num_experts = num_experts
    self.top_k = top_k
    self.router = router
    self.dtype = dtype
    self.router_kernel = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (hidden_size, num_experts), param_dtype))
    self.experts = GroupedMLP(
        num_experts, hidden_size, ffn_size, use_bias=use_bias,
        offload_names=offload_names, recompute_names=recompute_names,
        backend=backend, fused=fused, fp8=fp8, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)
    # Expert parallelism (jaxmoe/expert_parallel.py): experts split over
    # `expert_axis`, tokens over `data_axis` x `expert_axis`.
    # Receive buffers of capacity_factor x tokens*top_k rows per device, dropless
    # through overflow rounds unless drop_overflow.
    self.mesh = mesh
    if mesh is None and (capacity_factor is not None or drop_overflow or chunks != 1):
      raise ValueError(
          "'capacity_factor', 'drop_overflow' and 'chunks' need a mesh (mesh=...).")
    if mesh is not None:
      expert_parallel.check_mesh(mesh, expert_axis, data_axis, num_experts)
      if capacity_factor is None:
        capacity_factor = expert_parallel.DEFAULT_CAPACITY_FACTOR
      expert_parallel.check_buffers(capacity_factor, drop_overflow, chunks)
      self.capacity_factor = capacity_factor
      self.drop_overflow = drop_overflow
      self.chunks = chunks
      self.expert_axis = expert_axis
      self.data_axis = data_axis
      self.collective = expert_parallel.resolve_collective(collective, mesh)
      expert_parallel.replicate_params({"router": self.router_kernel}, mesh)
      expert_parallel.shard_expert_params(
          {k: v for k, v in vars(self.experts).items() if isinstance(v, nnx.Param)},
          mesh, expert_axis)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [..., H] -> (y [..., H] in the layer's dtype, aux).

    aux: "load_balancing_loss" (scalar, 1.0 when balanced), "router_z_loss"
    (scalar), "tokens_per_expert" ([E] int32, sums to tokens * top_k); with a
    mesh also "overflow_rows" (int32, rows computed in overflow rounds) and
    "dropped_rows" (int32, rows dropped with drop_overflow=True).
    """
    if x.shape[-1] != self.hidden_size:
      raise ValueError(
          f"Expected x of shape [..., {self.hidden_size}], got {tuple(x.shape)}.")
    tokens = x.reshape(-1, self.hidden_size)
    if self.mesh is not None:
      y, aux = self._expert_parallel(tokens)
      return y.reshape(*x.shape[:-1], self.hidden_size), aux
    logits = tokens.astype(jnp.float32) @ self.router_kernel[...].astype(jnp.float32)
    route = routing.route(logits, self.top_k, self.router)
    counts = routing.tokens_per_expert(route.expert_ids, self.num_experts)
    dispatch = permutation.plan_dispatch(route.expert_ids, route.weights, counts)
    y_sorted = self._permuted_experts(tokens.astype(self.dtype), dispatch)
    y = permutation.unpermute_and_combine(y_sorted, dispatch, self.top_k)
    aux = {
        "load_balancing_loss": routing.load_balancing_loss(route, counts),
        "router_z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
        "tokens_per_expert": counts,
    }
    return y.reshape(*x.shape[:-1], self.hidden_size), aux

  def _expert_parallel(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """tokens [T, H] -> (y [T, H], aux) on self.mesh, same values as one device."""
    config = expert_parallel.Config(
        self.mesh, self.expert_axis, self.data_axis, self.num_experts, self.top_k,
        self.router, self.dtype, self.collective, self.capacity_factor,
        self.drop_overflow, self.chunks)
    # The interpreter's callbacks cannot be checkpointed (GroupedMLP.checkpointed).
    interpret = self.experts.backend == "interpret"
    return expert_parallel.moe_forward(
        config, tokens, self.router_kernel[...], self.experts.weights(),
        self.experts.pure_fn(), checkpoint=self.experts.checkpointed,
        remat=(lambda fn: fn) if interpret else expert_parallel.nothing_saved)

  def _permuted_experts(self, tokens: jax.Array,
                        dispatch: permutation.Dispatch) -> jax.Array:
    """tokens [T, H] -> y_sorted [T*k, H]: the gather and the expert MLP, checkpointed
    together so that the gather can be redone from "moe_input" in backward."""
    mlp = self.experts.pure_fn()
    top_k = self.top_k

    def permuted_mlp(tokens, weights, dispatch):
      tokens = checkpoint_name(tokens, offload.MOE_INPUT)
      x_sorted = permutation.permute(tokens, dispatch, top_k)
      return mlp(x_sorted, weights, dispatch.group_sizes, dispatch.scales)

    return self.experts.checkpointed(permuted_mlp)(tokens, self.experts.weights(), dispatch)
