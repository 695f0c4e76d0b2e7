"""Matrix products of linear layers and convolutions as XLA:CPU custom calls (cpu_dense.cc).

`matmul`: op(A) @ op(B) [+ bias]; `conv2d`: NHWC x HWIO, the same GEMM on implicit im2col rows. Used by
`imm_jax.networks.layers.linear` / `layers.conv2d` and the FID Inception's convolutions for float32 on the
CPU when a C++ compiler is present (built at first use, see `build.py`) and the host has no AVX-512;
otherwise, and with `IMM_JAX_CPU_DENSE=0` (or `IMM_JAX_CPU_KERNELS=0`), they use `jnp.dot` /
`lax.conv_general_dilated`. The kernel's 6x16 register tile is sized for AVX2's sixteen 8-wide registers: on
AVX-512 hosts XLA's own dot ran the DiT's products 1.6-1.8x faster, the DiT-S/2 forward 1.36x and its train
step 1.26x faster than with the kernel (docs/PERFORMANCE.md), so there the layers use XLA's unless
`IMM_JAX_CPU_DENSE=1` forces the kernel.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from imm_jax.kernels import build

ENV_SWITCH = "IMM_JAX_CPU_DENSE"


@functools.cache
def available() -> bool:
    """True when the kernel is switched on, compiled and registered with XLA:CPU (logs why not, once)."""
    return build.load("cpu_dense", {"imm_matmul": "ImmMatmul", "imm_conv2d": "ImmConv2d"}, ENV_SWITCH,
                      "the linear and convolution layers")


@functools.cache
def host_has_avx512() -> bool:
    """Whether this machine's CPU reports AVX-512 (the `avx512f` flag of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512f" in line.split() for line in f)
    except OSError:
        return False


def preferred() -> bool:
    """Whether the layers use the kernel: available, and either forced (IMM_JAX_CPU_DENSE=1) or the host has
    no AVX-512 (where XLA's dot is faster; see the module docstring)."""
    if not available():
        return False
    return os.environ.get(ENV_SWITCH) == "1" or not host_has_avx512()


def applies(*arrays: jax.Array) -> bool:
    """Whether products of these arrays run through the kernel: float32, CPU, kernel `preferred()`."""
    return build.tracing_allowed() and all(a.dtype == jnp.float32 for a in arrays) and preferred()


def _reference(a, b, bias, transpose_a, transpose_b):
    a = a.T if transpose_a else a
    b = b.T if transpose_b else b
    out = jnp.dot(a, b, preferred_element_type=jnp.float32)
    return out if bias is None else out + bias


def _ffi_call(transpose_a: bool, transpose_b: bool, a, b, bias):
    if not available():
        raise RuntimeError(f"the CPU dense kernel is unavailable (see the warning above, or {ENV_SWITCH}=0)")
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    has_bias = bias is not None
    bias = bias if has_bias else jnp.zeros((1,), jnp.float32)
    return jax.ffi.ffi_call("imm_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a, b, bias, transpose_a=transpose_a, transpose_b=transpose_b, has_bias=has_bias)


# Sharding of the row-parallel products (A not transposed): rows of A and C follow A's first dimension, B and
# the bias are replicated, so on a data-parallel mesh each device multiplies its own rows (custom_partitioning;
# without it the partitioner would all-gather A and repeat the work on every device).

def _row_shardings(mesh, arg_shapes, result_shape):
    spec = tuple(getattr(arg_shapes[0].sharding, "spec", ()))
    rows = spec[0] if spec else None
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (NamedSharding(mesh, PartitionSpec(rows, None)), replicated, replicated)
    return args, NamedSharding(mesh, PartitionSpec(rows, None))


def _row_parallel(transpose_b: bool, has_bias: bool):
    def call(a, b, bias):
        return _ffi_call(False, transpose_b, a, b, bias if has_bias else None)

    def partition(mesh, arg_shapes, result_shape):
        args, result = _row_shardings(mesh, arg_shapes, result_shape)
        return mesh, call, result, args

    partitioned = custom_partitioning(call)
    partitioned.def_partition(
        partition, infer_sharding_from_operands=lambda mesh, args, result: _row_shardings(mesh, args, result)[1],
        sharding_rule=f"m k, {'n k' if transpose_b else 'k n'}, {'n' if has_bias else 'z'} -> m n")
    return partitioned


_ROW_PARALLEL = {(t, h): _row_parallel(t, h) for t in (False, True) for h in (False, True)}


@functools.cache
def _folding_vmap(transpose_b: bool, has_bias: bool):
    """The row-parallel call, with vmap of A alone folded into its rows (other vmaps: the jnp formula)."""
    call = custom_vmap(lambda a, b, bias: _ROW_PARALLEL[(transpose_b, has_bias)](a, b, bias))

    @call.def_vmap
    def _rule(axis_size, in_batched, a, b, bias):
        if in_batched[0] and not any(in_batched[1:]):
            out = call(a.reshape(-1, a.shape[-1]), b, bias)
            return out.reshape(axis_size, -1, out.shape[-1]), True
        ref = lambda a, b, bias: _reference(a, b, bias if has_bias else None, False, transpose_b)
        return jax.vmap(ref, in_axes=tuple(0 if x else None for x in in_batched))(a, b, bias), True

    return call


def matmul(a: jax.Array, b: jax.Array, bias: jax.Array | None = None, *, transpose_a: bool = False,
           transpose_b: bool = False) -> jax.Array:
    """op(a) (M, K) @ op(b) (K, N) [+ bias (N,)] -> (M, N) float32, op = transpose where asked.

    a is stored (M, K), or (K, M) with transpose_a; b (K, N), or (N, K) with transpose_b. float32 only.
    Row-parallel products (transpose_a False) are partitioned by rows on a mesh; a transposed-A product
    (a weight gradient, contracting the rows) runs on gathered operands there.
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul takes 2-D operands, got {a.shape} and {b.shape}")
    if transpose_a:
        return _ffi_call(True, transpose_b, a, b, bias)
    bias_arg = bias if bias is not None else jnp.zeros((1,), jnp.float32)
    return _folding_vmap(transpose_b, bias is not None)(a, b, bias_arg)


def _conv_call(stride: int, pad: tuple[int, int], x, kernel):
    if not available():
        raise RuntimeError(f"the CPU dense kernel is unavailable (see the warning above, or {ENV_SWITCH}=0)")
    b, h, w, _ = x.shape
    kh, kw, _, n = kernel.shape
    out = jax.ShapeDtypeStruct((b, (h + 2 * pad[0] - kh) // stride + 1, (w + 2 * pad[1] - kw) // stride + 1, n),
                               jnp.float32)
    return jax.ffi.ffi_call("imm_conv2d", out)(x, kernel, stride=np.int64(stride), pad_h=np.int64(pad[0]),
                                              pad_w=np.int64(pad[1]))


def _conv_reference(stride, pad, x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad[0], pad[0]), (pad[1], pad[1])],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def _batch_shardings(mesh, arg_shapes):
    spec = tuple(getattr(arg_shapes[0].sharding, "spec", ()))
    batch = PartitionSpec(spec[0] if spec else None, None, None, None)
    return (NamedSharding(mesh, batch), NamedSharding(mesh, PartitionSpec())), NamedSharding(mesh, batch)


@functools.cache
def _conv(stride: int, pad: tuple[int, int]):
    """The convolution call: per batch shard on a mesh, vmap of x alone folded into the batch."""
    call = functools.partial(_conv_call, stride, pad)

    def partition(mesh, arg_shapes, result_shape):
        args, result = _batch_shardings(mesh, arg_shapes)
        return mesh, call, result, args

    partitioned = custom_partitioning(call)
    partitioned.def_partition(
        partition, infer_sharding_from_operands=lambda mesh, args, result: _batch_shardings(mesh, args)[1],
        sharding_rule="b h w c, kh kw c d -> b oh ow d")
    batched = custom_vmap(lambda x, kernel: partitioned(x, kernel))

    @batched.def_vmap
    def _rule(axis_size, in_batched, x, kernel):
        if in_batched[0] and not in_batched[1]:
            out = batched(x.reshape(-1, *x.shape[2:]), kernel)
            return out.reshape(axis_size, -1, *out.shape[1:]), True
        ref = functools.partial(_conv_reference, stride, pad)
        return jax.vmap(ref, in_axes=tuple(0 if v else None for v in in_batched))(x, kernel), True

    return batched


def conv2d(x: jax.Array, kernel: jax.Array, pad: int | tuple[int, int], stride: int = 1) -> jax.Array:
    """Convolution: x (B, H, W, C) NHWC float32, kernel (kh, kw, C, D) HWIO float32, zero padding `pad` (or
    (pad_h, pad_w)) on both sides, the same stride along H and W -> (B, (H + 2 pad_h - kh) // stride + 1,
    (W + 2 pad_w - kw) // stride + 1, D). Partitioned by batch on a mesh."""
    pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"conv2d takes x (B, H, W, C) and an HWIO kernel (kh, kw, C, D), got {x.shape} and "
                         f"{kernel.shape}")
    if (stride < 1 or min(pad) < 0 or x.shape[1] + 2 * pad[0] < kernel.shape[0]
            or x.shape[2] + 2 * pad[1] < kernel.shape[1]):
        raise ValueError(f"conv2d: stride {stride} and padding {pad} do not fit input {x.shape} and kernel "
                         f"{kernel.shape}")
    return _conv(int(stride), (int(pad[0]), int(pad[1])))(x, kernel)
