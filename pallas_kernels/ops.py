"""Public grouped GEMMs: validation, backend dispatch and the custom_vjp wiring.

The kernels live beside this file (`gmm_mgpu.py`, `tgmm_mgpu.py`, XLA reference in
`reference.py`); this module only decides which one runs and how the gradients are
expressed in terms of the same two ops:

    out  = gmm(lhs, rhs)            lhs [M, K], rhs [G, K, N]   -> [M, N]
    dlhs = gmm(dout, rhs, transpose_rhs=True)                   -> [M, K]
    drhs = tgmm(lhs, dout)                                      -> [G, K, N]

`gmm_fp8` and `tgmm_fp8` dispatch the blockwise-scaled FP8 grouped GEMMs
(`gmm_fp8_mgpu.py`, `tgmm_fp8_mgpu.py`; XLA references `reference.gmm_fp8_xla`,
`reference.tgmm_fp8_xla`), and `quantize_rows` / `quantize_columns` /
`quantize_blocks` the one-pass FP8 quantisations of activations, of the weight
gradient's operands and of weights (`quantize_rows_triton.py`,
`quantize_columns_triton.py`, `quantize_blocks_triton.py`; XLA: the functions of the
same names in `quantize.py`). None has a VJP of its own: the FP8 expert MLP
(`jaxmoe/fp8_mlp.py`) is one custom_vjp over its six GEMMs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import quantize
from pallas_kernels import reference


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        transpose_rhs: bool = False, preferred_element_type=None,
        backend: common.Backend = "auto") -> jax.Array:
  """Grouped matmul: rows of group g of `lhs` times `rhs[g]`.

  Args:
    lhs: [M, K] float (bf16, fp16 or f32), rows sorted by group.
    rhs: [G, K, N], or [G, N, K] with `transpose_rhs=True` (used transposed,
      without a transposed copy), same dtype as `lhs`.
    group_sizes: [G] int32; rows past `sum(group_sizes)` are padding.
    transpose_rhs: whether `rhs` is stored [G, N, K].
    preferred_element_type: output dtype (default: `lhs.dtype`); accumulation is f32.
    backend: "auto" (Mosaic GPU on Hopper when the shape is supported, else XLA),
      "mosaic_gpu", "interpret" (the Mosaic GPU kernel in the Pallas interpreter),
      or "xla" (`jax.lax.ragged_dot`).

  Returns:
    [M, N]; padding rows are zero. Differentiable in `lhs` and `rhs`.
  """
  lhs, rhs, group_sizes = map(jnp.asarray, (lhs, rhs, group_sizes))
  common.check_backend(backend)
  common.validate_gmm(lhs, rhs, group_sizes, transpose_rhs)
  out_dtype = common.out_dtype(lhs, preferred_element_type)
  return _gmm_vjp(transpose_rhs, out_dtype, backend)(lhs, rhs, group_sizes)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
         preferred_element_type=None,
         backend: common.Backend = "auto") -> jax.Array:
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ rhs[rows of g].

  Args:
    lhs: [M, K] float, rows sorted by group.
    rhs: [M, N], same dtype as `lhs`.
    group_sizes: [G] int32; rows past `sum(group_sizes)` are ignored.
    preferred_element_type: output dtype (default: `lhs.dtype`); accumulation is f32.
    backend: as for `gmm`.

  Returns:
    [G, K, N]; zero for empty groups. Differentiable in `lhs` and `rhs`.
  """
  lhs, rhs, group_sizes = map(jnp.asarray, (lhs, rhs, group_sizes))
  common.check_backend(backend)
  common.validate_tgmm(lhs, rhs, group_sizes)
  out_dtype = common.out_dtype(lhs, preferred_element_type)
  return _tgmm_vjp(out_dtype, backend)(lhs, rhs, group_sizes)


def gmm_fp8(lhs: quantize.RowQuantized, rhs: quantize.BlockQuantized,
            group_sizes: jax.Array, *, transpose_rhs: bool = False,
            out_dtype=jnp.bfloat16, backend: common.Backend = "auto") -> jax.Array:
  """Blockwise-scaled FP8 grouped matmul (not differentiable).

  out[rows of g] = dequant(lhs)[rows of g] @ dequant(rhs)[g] (or its transpose), with
  float32 accumulation. Each pass reads the K-major layout that FP8 wgmma needs:
  `rhs.values_t` and `rhs.scales` for x @ w, `rhs.values` and the transposed block
  scales for dy @ w.T (no transposed copy of the weight).

  Args:
    lhs: `quantize.quantize_rows` of [M, K]: values [M, K] e4m3, scales [K // 128, M].
    rhs: `quantize.quantize_blocks` of w [G, K, N] (with `transpose_rhs`, of w
      [G, N, K], used transposed; then `values_t` may be None).
    group_sizes: [G] int32; rows past sum(group_sizes) are padding (zeros out).
    transpose_rhs: contract lhs with w's last axis (the input gradient dy @ w.T).
    out_dtype: bf16 or f32.
    backend: "mosaic_gpu" / "interpret" (`gmm_fp8_mgpu`), "xla" (ragged_dot of the
      dequantised operands in float32), "auto" (the kernel on Hopper when it takes
      the input, else XLA: still FP8 numerics, never a bf16 GEMM).

  Returns:
    [M, N] in out_dtype.
  """
  common.check_backend(backend)
  if transpose_rhs:  # w [G, N, K] as stored is already K-major for dy @ w.T.
    values, scales = rhs.values, jnp.swapaxes(rhs.scales, 1, 2)
  else:
    values, scales = rhs.values_t, rhs.scales
  common.check_group_sizes(group_sizes, values.shape[0])
  if lhs.values.shape[1] != values.shape[2]:
    raise ValueError(
        f"Contracting sizes differ: lhs is [M, K] = {tuple(lhs.values.shape)} but rhs "
        f"is {'[G, N, K]' if transpose_rhs else '[G, K, N]'} = {tuple(rhs.values.shape)}.")
  return dispatch(backend, _gmm_fp8_kernel, reference.gmm_fp8_xla, lhs.values,
                  lhs.scales, values, scales, group_sizes, out_dtype=jnp.dtype(out_dtype))


def tgmm_fp8(lhs: quantize.RowQuantized, rhs: quantize.RowQuantized,
             group_sizes: jax.Array, *, num_rows: int, out_dtype=jnp.float32,
             backend: common.Backend = "auto") -> jax.Array:
  """Blockwise-scaled FP8 transposed grouped matmul, the weight gradient (not
  differentiable): out[g] = dequant(lhs)[rows of g].T @ dequant(rhs)[rows of g].

  Args:
    lhs: `quantize.quantize_columns(x, group_sizes)` of x [num_rows, K]: values
      [K, P] e4m3, scales [P // 128, K].
    rhs: `quantize.quantize_columns(dy, group_sizes)` of dy [num_rows, N].
    group_sizes: [G] int32, those both were quantised with.
    num_rows: M, the rows of x and dy.
    out_dtype: bf16 or f32.
    backend: as `gmm_fp8`'s.

  Returns:
    [G, K, N] in out_dtype; zeros for empty groups.
  """
  common.check_backend(backend)
  common.check_group_sizes(group_sizes)
  p = quantize.aligned_rows(num_rows, group_sizes.shape[0])
  for name, q in (("lhs", lhs), ("rhs", rhs)):
    if q.values.ndim != 2 or q.values.shape[1] != p:
      raise ValueError(
          f"Expected '{name}' values of shape [*, {p}] (quantize_columns of {num_rows} "
          f"rows in {group_sizes.shape[0]} groups), got {tuple(q.values.shape)}.")
  return dispatch(backend, _tgmm_fp8_kernel, reference.tgmm_fp8_xla, lhs.values,
                  lhs.scales, rhs.values, rhs.scales, group_sizes, num_rows=num_rows,
                  out_dtype=jnp.dtype(out_dtype))


def quantize_rows(x: jax.Array, *, srelu_scales: jax.Array | None = None,
                  backend: common.Backend = "auto") -> quantize.RowQuantized:
  """`quantize.quantize_rows` of x [M, K] (K a multiple of 128): values [M, K] e4m3,
  scales [K // 128, M] f32; with srelu_scales p [M], of relu(x)**2 * p (FC1's
  activation, never stored unquantised).

  backend: "mosaic_gpu" / "interpret" run the one-pass Pallas kernel
  (`quantize_rows_triton.py`, a Triton kernel; M % 8 == 0), "xla" the XLA fusions,
  "auto" the kernel on a Hopper GPU where it takes the input. The numbers are the
  same either way.
  """
  _check_rows_input(x, srelu_scales, backend)
  return dispatch(backend, _quantize_rows_kernel, quantize.quantize_rows, x, srelu_scales)


def _check_rows_input(x, srelu_scales, backend) -> None:
  common.check_backend(backend)
  common.check_rank("x", x, 2, "[M, K]")
  common.check_float("x", x)
  if srelu_scales is not None and srelu_scales.shape != x.shape[:1]:
    raise ValueError(f"Expected 'srelu_scales' of shape [{x.shape[0]}] (one per row of "
                     f"x), got {tuple(srelu_scales.shape)}.")


def quantize_rows_and_columns(x: jax.Array, group_sizes: jax.Array, *,
                              srelu_scales: jax.Array | None = None,
                              backend: common.Backend = "auto"
                              ) -> tuple[quantize.RowQuantized, quantize.RowQuantized]:
  """(`quantize_rows(x, srelu_scales=...)`, `quantize_columns` of the same float
  tensor) from one read of x [M, K] (K a multiple of 128), rows sorted by group:
  an activation's or gradient's FP8 operands for gmm (values [M, K], scales
  [K // 128, M]) and for `tgmm_fp8` (values [K, P], scales [P // 128, K]), both
  quantised from x itself, or from relu(x)**2 * p with srelu_scales p [M].

  backend: "mosaic_gpu" / "interpret" run the one-pass Pallas kernel
  (`quantize_columns_triton.py`, a Triton kernel), "xla" the XLA fusions
  (`quantize.quantize_rows_and_columns`), "auto" the kernel on a Hopper GPU. The
  numbers are the same either way.
  """
  _check_rows_input(x, srelu_scales, backend)
  common.check_group_sizes(group_sizes)
  quantize.check_blocks("x", x, (1,))
  return dispatch(backend, _quantize_rows_and_columns_kernel,
                  quantize.quantize_rows_and_columns, x, group_sizes, srelu_scales)


def quantize_columns(x: jax.Array | quantize.RowQuantized, group_sizes: jax.Array, *,
                     backend: common.Backend = "auto") -> quantize.RowQuantized:
  """`quantize.quantize_columns` of x [M, K] (K a multiple of 128), rows sorted by
  group: the 1x128 quantisation of its group-aligned transpose, values [K, P] e4m3,
  scales [P // 128, K] f32 (P = `quantize.aligned_rows(M, G)`), `tgmm_fp8`'s operand
  layout. A `quantize.RowQuantized` x (values [M, K] e4m3, scales [K // 128, M]) is
  requantised from its dequantised values.

  backend: "mosaic_gpu" / "interpret" run the one-pass Pallas kernel
  (`quantize_columns_triton.py`, a Triton kernel), "xla" the XLA gather and fusions,
  "auto" the kernel on a Hopper GPU. The numbers are the same either way.
  """
  common.check_backend(backend)
  common.check_group_sizes(group_sizes)
  values = x.values if isinstance(x, quantize.RowQuantized) else x
  common.check_rank("x", values, 2, "[M, K]")
  common.check_float("x", values)
  quantize.check_blocks("x", values, (1,))
  if isinstance(x, quantize.RowQuantized):
    m, k = values.shape
    if values.dtype != quantize.FP8 or x.scales.shape != (k // quantize.BLOCK, m):
      raise ValueError(f"Expected a RowQuantized x of e4m3 values [M, K] = {(m, k)} and "
                       f"scales {(k // quantize.BLOCK, m)}, got {values.dtype} values and "
                       f"scales {tuple(x.scales.shape)}.")
  return dispatch(backend, _quantize_columns_kernel, quantize.quantize_columns, x,
                  group_sizes)


def quantize_blocks(w: jax.Array, *, backend: common.Backend = "auto"
                    ) -> quantize.BlockQuantized:
  """`quantize.quantize_blocks` of a weight w [G, K, N] (K, N multiples of 128):
  values [G, K, N] and values_t [G, N, K] e4m3, scales [G, K // 128, N // 128] f32.

  backend: "mosaic_gpu" / "interpret" run the one-pass Pallas kernel
  (`quantize_blocks_triton.py`, a Triton kernel, or the Pallas interpreter), "xla" the
  XLA fusions of `quantize.quantize_blocks`, "auto" the kernel on a Hopper GPU. The
  numbers are the same either way.
  """
  common.check_backend(backend)
  common.check_rank("w", w, 3, "[G, K, N]")
  common.check_float("w", w)
  return dispatch(backend, _quantize_blocks_kernel, quantize.quantize_blocks, w)


def _run_gmm(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, backend):
  return dispatch(backend, _gmm_kernel, reference.gmm_xla, lhs, rhs, group_sizes,
                  transpose_rhs=transpose_rhs, out_dtype=out_dtype)


def _run_tgmm(lhs, rhs, group_sizes, *, out_dtype, backend):
  return dispatch(backend, _tgmm_kernel, reference.tgmm_xla, lhs, rhs, group_sizes,
                  out_dtype=out_dtype)


def dispatch(backend: str, get_kernel, xla_fn, *args, **kwargs):
  """Runs `get_kernel()(*args, interpret=..., **kwargs)` or `xla_fn` as `backend` asks.

  `get_kernel` imports the Mosaic GPU kernel lazily. A kernel signals an input it
  cannot take with NotImplementedError: "auto" then falls back to XLA, an
  explicitly requested kernel backend turns it into a ValueError.
  """
  if backend == "xla" or (backend == "auto" and not common.on_hopper_gpu()):
    return xla_fn(*args, **kwargs)
  try:
    out = get_kernel()(*args, interpret=backend == "interpret", **kwargs)
  except NotImplementedError as e:
    if backend == "auto":
      return xla_fn(*args, **kwargs)
    raise ValueError(f"backend={backend!r} cannot run this input: {e}") from e
  return _vary_like_inputs(out, args)


def _vary_like_inputs(out, args):
  """Under `jax.shard_map`, a Pallas kernel's outputs are typed invariant across the
  mesh axes (its out_shape carries no `vma`) even where its inputs vary; give them
  the inputs' varying axes, as an XLA op would, so that the custom_vjp type check
  and shard_map's autodiff (expert parallelism) see the right types."""
  axes = set()
  for a in jax.tree.leaves(args):
    axes |= set(jax.typeof(a).manual_axis_type.varying)
  if not axes:
    return out

  def cast(x):
    missing = tuple(sorted(axes - set(jax.typeof(x).manual_axis_type.varying)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, out)


def _gmm_kernel():
  from pallas_kernels import gmm_mgpu
  return gmm_mgpu.gmm_mgpu


def _quantize_rows_kernel():
  from pallas_kernels import quantize_rows_triton
  return quantize_rows_triton.quantize_rows_triton


def _quantize_columns_kernel():
  from pallas_kernels import quantize_columns_triton
  return quantize_columns_triton.quantize_columns_triton


def _quantize_rows_and_columns_kernel():
  from pallas_kernels import quantize_columns_triton
  return quantize_columns_triton.quantize_rows_and_columns_triton


def _quantize_blocks_kernel():
  from pallas_kernels import quantize_blocks_triton
  return quantize_blocks_triton.quantize_blocks_triton


def _gmm_fp8_kernel():
  from pallas_kernels import gmm_fp8_mgpu
  return gmm_fp8_mgpu.gmm_fp8_mgpu


def _tgmm_fp8_kernel():
  from pallas_kernels import tgmm_fp8_mgpu
  return tgmm_fp8_mgpu.tgmm_fp8_mgpu


def _tgmm_kernel():
  from pallas_kernels import tgmm_mgpu
  return tgmm_mgpu.tgmm_mgpu


@functools.cache
def _gmm_vjp(transpose_rhs: bool, out_dtype: jnp.dtype, backend: str):
  run = functools.partial(_run_gmm, backend=backend)

  @jax.custom_vjp
  def f(lhs, rhs, group_sizes):
    return run(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
               out_dtype=out_dtype)

  def fwd(lhs, rhs, group_sizes):
    return f(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

  def bwd(residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = run(dout, rhs, group_sizes, transpose_rhs=not transpose_rhs,
               out_dtype=lhs.dtype)
    tgmm_operands = (dout, lhs) if transpose_rhs else (lhs, dout)
    drhs = _run_tgmm(*tgmm_operands, group_sizes, out_dtype=rhs.dtype,
                     backend=backend)
    return dlhs, drhs, None

  f.defvjp(fwd, bwd)
  return f


@functools.cache
def _tgmm_vjp(out_dtype: jnp.dtype, backend: str):
  @jax.custom_vjp
  def f(lhs, rhs, group_sizes):
    return _run_tgmm(lhs, rhs, group_sizes, out_dtype=out_dtype, backend=backend)

  def fwd(lhs, rhs, group_sizes):
    return f(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

  def bwd(residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = _run_gmm(rhs, dout, group_sizes, transpose_rhs=True,
                    out_dtype=lhs.dtype, backend=backend)
    drhs = _run_gmm(lhs, dout, group_sizes, transpose_rhs=False,
                    out_dtype=rhs.dtype, backend=backend)
    return dlhs, drhs, None

  f.defvjp(fwd, bwd)
  return f
