"""Grouped GEMM kernels for Mixture-of-Experts on NVIDIA Hopper, with an XLA reference."""

from pallas_kernels.ops import (gmm, gmm_fp8, quantize_blocks, quantize_columns, quantize_rows,
                                quantize_rows_and_columns, tgmm, tgmm_fp8)

__all__ = ["gmm", "gmm_fp8", "quantize_blocks", "quantize_columns", "quantize_rows",
           "quantize_rows_and_columns", "tgmm", "tgmm_fp8"]
