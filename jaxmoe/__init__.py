"""jaxmoe: fast, memory-lean Mixture-of-Experts expert MLPs for JAX on Hopper GPUs."""

from jaxmoe import layer_scan
from jaxmoe.fp8 import BlockwiseRecipe
from jaxmoe.mlp import grouped_mlp
from jaxmoe.modules import GroupedMLP, MoELayer
from jaxmoe.offload import RESIDUAL_NAMES, offload_policy

__all__ = ["BlockwiseRecipe", "GroupedMLP", "MoELayer", "RESIDUAL_NAMES", "grouped_mlp",
           "layer_scan", "offload_policy"]
