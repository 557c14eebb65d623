"""A small decoder-only MoE transformer language model built on `MoELayer`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import layer_scan
from jaxmoe import offload
from jaxmoe.fp8 import BlockwiseRecipe
from jaxmoe.modules import MoELayer


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  seq_len: int
  num_layers: int = 2
  model_dim: int = 64
  num_heads: int = 4
  ffn_size: int = 128
  num_experts: int = 4
  top_k: int = 2
  offload_names: tuple[str, ...] = offload.DEFAULT_OFFLOAD_NAMES
  recompute_names: tuple[str, ...] = ()
  backend: str = "auto"
  fused: bool = True
  # The experts' GEMMs in blockwise-scaled FP8 (`jaxmoe.fp8.BlockwiseRecipe`); needs
  # model_dim and ffn_size multiples of 128.
  fp8: bool = False
  dtype: str = "bfloat16"
  # nnx.scan over layers (True) or a Python loop (False). Under scan, XLA writes each
  # layer's offloaded residuals into a host buffer as the layer runs, freeing their
  # device memory; in a Python loop it keeps most of them on device until backward,
  # so offload saves little there. Without offload the loop is faster and leaner
  # (BENCHMARKS.md "Demo").
  scan_layers: bool = True
  # When scanning with residuals offloaded: `jaxmoe.layer_scan.scan_layers` (True),
  # which copies each layer's offloaded residuals to host under the next layer and
  # back under the previous one, or nnx.scan (False), where each copy has to hide in
  # its own layer; None picks by `uses_layer_scan`. Same results either way.
  pipelined_offload: bool | None = None

  def uses_layer_scan(self) -> bool:
    """Whether the layers run through `jaxmoe.layer_scan`: scanned with something
    offloaded, and `pipelined_offload` True, or None and the copies would not hide
    inside their own layer (`offload.copies_hide`). On the H100 that choice was the
    faster one, or within 1 %, at all four shapes and placements measured
    (BENCHMARKS.md "Pipelined layer scan")."""
    if not (self.scan_layers and self.offload_names):
      return False
    if self.pipelined_offload is not None:
      return self.pipelined_offload
    return not offload.copies_hide(self.offload_names, self.model_dim, self.ffn_size,
                                   self.top_k)


class Block(nnx.Module):
  """Pre-norm attention + pre-norm MoE, both residual."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.attn_norm = nnx.RMSNorm(cfg.model_dim, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        cfg.num_heads, cfg.model_dim, dtype=dtype, decode=False, rngs=rngs)
    self.moe_norm = nnx.RMSNorm(cfg.model_dim, dtype=dtype, rngs=rngs)
    self.moe = MoELayer(
        cfg.model_dim, cfg.ffn_size, cfg.num_experts, cfg.top_k,
        offload_names=cfg.offload_names, recompute_names=cfg.recompute_names,
        backend=cfg.backend, fused=cfg.fused,
        fp8=BlockwiseRecipe() if cfg.fp8 else None, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array):
    x = x + self.attn(self.attn_norm(x), mask=mask)
    y, aux = self.moe(self.moe_norm(x))
    return x + y.astype(x.dtype), aux


class MoETransformerLM(nnx.Module):
  """tokens [B, S] int32 -> (logits [B, S, V] float32, aux of the summed MoE losses)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.model_dim, rngs=rngs)
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.seq_len, cfg.model_dim)))
    # One Block with a leading [num_layers] axis on every parameter.
    make_blocks = nnx.split_rngs(splits=cfg.num_layers)(
        nnx.vmap(lambda rngs: Block(cfg, rngs=rngs), in_axes=(0,), out_axes=0))
    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.RMSNorm(cfg.model_dim, rngs=rngs)

  def __call__(self, tokens: jax.Array):
    seq_len = tokens.shape[1]
    x = (self.embed(tokens) + self.pos_embed[:seq_len]).astype(jnp.dtype(self.cfg.dtype))
    mask = nnx.make_causal_mask(tokens)

    def block_step(x, block):
      x, aux = block(x, mask)
      return x, (aux["load_balancing_loss"], aux["router_z_loss"])

    if self.cfg.uses_layer_scan():
      x, (lb_losses, z_losses) = layer_scan.scan_layers(block_step, x, self.blocks)
    elif self.cfg.scan_layers:
      x, (lb_losses, z_losses) = nnx.scan(
          block_step, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, self.blocks)
    else:
      losses = []
      for i in range(self.cfg.num_layers):
        x, layer_losses = block_step(x, stacked_layer(self.blocks, i))
        losses.append(layer_losses)
      lb_losses, z_losses = map(jnp.stack, zip(*losses))
    logits = self.embed.attend(self.final_norm(x.astype(jnp.float32)))
    return logits, {"load_balancing_loss": jnp.mean(lb_losses),
                    "router_z_loss": jnp.mean(z_losses)}


def stacked_layer(stack: nnx.Module, i: int) -> nnx.Module:
  """Layer i of modules made with `nnx.vmap` (a leading layer axis on every array)."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def next_token_loss(model: MoETransformerLM, batch: jax.Array,
                    lb_weight: float = 0.01, z_weight: float = 1e-3):
  """Mean next-token cross-entropy of batch [B, S + 1] plus the router losses."""
  logits, aux = model(batch[:, :-1])
  xent = jnp.mean(
      -jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], axis=-1))
  total = xent + lb_weight * aux["load_balancing_loss"] + z_weight * aux["router_z_loss"]
  return total, xent


def param_count(model: nnx.Module) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
