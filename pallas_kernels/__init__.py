"""Grouped GEMM kernels for Mixture-of-Experts on NVIDIA Hopper, with an XLA reference."""

from pallas_kernels.ops import gmm, tgmm

__all__ = ["gmm", "tgmm"]
