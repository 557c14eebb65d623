"""Grouped GEMM kernels for Mixture-of-Experts on NVIDIA Hopper, with an XLA reference."""

from pallas_kernels.ops import gmm, gmm_fp8, tgmm

__all__ = ["gmm", "gmm_fp8", "tgmm"]
