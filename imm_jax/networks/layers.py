"""Small building blocks shared by the backbones: dtype parsing, float32 norms, token linears, attention.

Linear layers, convolutions and attention run on one of three execution paths, a static `backend` argument
(a field of the networks, so part of every traced program and its compilation cache key):
  "plain"  plain JAX: XLA's own autodiff for dense layers and convolutions, `jax.nn.dot_product_attention`
           (XLA implementation). TPU, and every program exported for another platform.
  "gpu"    as "plain", with cuDNN's fused attention where dtype (bfloat16/float16) and head size allow.
  "cpu"    the XLA:CPU backend: the C++ kernels of `imm_jax.kernels` where available, and backward passes
           written for XLA:CPU (same values up to rounding).
`backend_for(devices)` picks the path for the devices a computation is placed on.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imm_jax.kernels import cpu_attention, cpu_dense

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BACKENDS = ("plain", "gpu", "cpu")
# jax.export platform names and device platforms -> backend. An exported program must not contain CPU custom
# calls, and cuDNN attention checks for a GPU while tracing, so exports for "cuda"/"rocm" use the plain path.
_EXPORT_BACKENDS = {"cpu": "cpu", "tpu": "plain", "cuda": "plain", "rocm": "plain"}


def backend_for(devices: Optional[Sequence[Any]] = None) -> str:
    """The execution path for computations placed on `devices` (default: jax.devices()):
    "cpu" when all are CPU devices, "gpu" when all are GPUs, else "plain"."""
    platforms = {d.platform for d in (jax.devices() if devices is None else devices)}
    if platforms == {"cpu"}:
        return "cpu"
    if platforms and platforms <= {"gpu", "cuda", "rocm"}:
        return "gpu"
    return "plain"


def backend_for_export(platforms: Sequence[str]) -> str:
    """The execution path of a program exported with `jax.export(..., platforms=platforms)`."""
    paths = {_EXPORT_BACKENDS.get(p, "plain") for p in platforms}
    return "cpu" if paths == {"cpu"} else "plain"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def compute_dtype(name: str):
    """Maps model.dtype ("float32" | "bfloat16" | "float16") to a jnp dtype."""
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine params; statistics in float32, returns float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               eps: float) -> jax.Array:
    """GroupNorm of NHWC x (statistics in float32, biased variance like torch); returns float32."""
    n, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(n, h * w, num_groups, c // num_groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + eps)
    return xg.reshape(n, h, w, c) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array, backend: str = "plain") -> jax.Array:
    """x (..., K) @ kernel (K, D) + bias (D,) -> (..., D), all in one dtype, on the `backend` path."""
    if backend == "cpu":
        return _linear_cpu(x, kernel, bias)
    return jnp.dot(x, kernel) + bias


@jax.custom_vjp
def _linear_cpu(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    if cpu_dense.applies(x, kernel, bias):
        out = cpu_dense.matmul(x.reshape(-1, x.shape[-1]), kernel, bias)
        return out.reshape(*x.shape[:-1], kernel.shape[-1])
    return jnp.dot(x, kernel) + bias


def _linear_fwd(x, kernel, bias):
    return _linear_cpu(x, kernel, bias), (x, kernel)


def _linear_bwd(res, dy):
    # The weight gradient is one (K, M) x (M, D) matmul over the flattened leading axes. Autodiff's own
    # transpose (a dot contracting the unflattened leading axes) makes XLA:CPU copy the (M, D) cotangent
    # into a transposed layout first; this form avoids the copy (DiT-S/2 train step ~1.1x faster, see
    # docs/PERFORMANCE.md). The weight gradient stays XLA's dot: the CPU kernel (cpu_dense) is not faster
    # for its long contraction, and XLA partitions it (a sum over the batch shards) on a mesh.
    x, kernel = res
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    if cpu_dense.applies(dy, kernel):
        dx = cpu_dense.matmul(dy2, kernel, transpose_b=True).reshape(x.shape)
    else:
        dx = jnp.dot(dy, kernel.T)
    d_kernel = jnp.dot(x2.T, dy2, preferred_element_type=jnp.float32).astype(kernel.dtype)
    return dx, d_kernel, jnp.sum(dy2, axis=0, dtype=jnp.float32).astype(dy.dtype)


_linear_cpu.defvjp(_linear_fwd, _linear_bwd)


class Dense(nn.Module):
    """Linear layer over the last axis with float32 params `kernel` (K, D) and `bias` (D,).

    Same params, initialisation and values as `flax.linen.Dense(features, dtype=dtype)`; computes in
    `dtype` through `linear` on the `backend` path (on "cpu" reverse mode only; no `jax.jvp`).
    """
    features: int
    dtype: Any = jnp.float32
    backend: str = "plain"
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return linear(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype), self.backend)


def conv2d(x: jax.Array, kernel: jax.Array, pad: int, backend: str = "plain") -> jax.Array:
    """Stride-1 2-D convolution, NHWC x (B, H, W, Cin) with HWIO kernel (k, k, Cin, Cout), zero padding
    `pad` on each side -> (B, H + 2 pad - k + 1, W + 2 pad - k + 1, Cout), in x's dtype."""
    if backend == "cpu":
        return _conv2d(pad, x, kernel)
    return _xla_conv(x, kernel, pad)


def _xla_conv(x, kernel, pad):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_nhwc(x, kernel, pad):
    if cpu_dense.applies(x, kernel):
        return cpu_dense.conv2d(x, kernel, pad)
    return _xla_conv(x, kernel, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv2d(pad, x, kernel):
    return _conv_nhwc(x, kernel, pad)


def _conv2d_fwd(pad, x, kernel):
    return _conv_nhwc(x, kernel, pad), (x, kernel)


def _conv2d_bwd(pad, res, dy):
    # XLA:CPU's own convolution backward runs at ~12 GFLOP/s for 3x3 convs at 32x32x64 (docs/PERFORMANCE.md): the
    # input gradient is written as a forward convolution (kernel rotated 180 degrees, in/out swapped),
    # the kernel gradient as one matmul over im2col patches of x; 5.9x faster there, 1.2-1.5x at 16x16/8x8.
    x, kernel = res
    k = kernel.shape[0]
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    dx = _conv_nhwc(dy, flipped, k - 1 - pad)
    ho, wo = dy.shape[1], dy.shape[2]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo] for i in range(k) for j in range(k)], axis=-1)
    d_kernel = jnp.dot(cols.reshape(-1, cols.shape[-1]).T, dy.reshape(-1, dy.shape[-1]),
                       preferred_element_type=jnp.float32)
    return dx, d_kernel.reshape(kernel.shape).astype(kernel.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def attention(qkv: jax.Array, backend: str = "plain") -> jax.Array:
    """Multi-head softmax attention with float32 logits and softmax.

    qkv: (B, N, 3, heads, head_dim) in the trunk dtype, q/k/v stacked on axis 2 (the fused projection's
    output, reshaped). Returns (B, N, heads, head_dim) in the trunk dtype.
    """
    if backend != "cpu":
        q, k, v = (qkv[:, :, i] for i in range(3))
        return jax.nn.dot_product_attention(q, k, v, implementation=attention_implementation(qkv, backend))
    if cpu_attention.applies(qkv):
        return cpu_attention.attention(qkv)
    # Heads-major einsums: measured ~1.5x faster forward on XLA:CPU (DiT-S/2) than contracting in
    # (B, N, heads, d) layout directly, and on par with jax.nn.dot_product_attention's backward.
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    return _attention_core(q, k, v).transpose(0, 2, 1, 3)


def attention_implementation(qkv: jax.Array, backend: str) -> Optional[str]:
    """`jax.nn.dot_product_attention`'s implementation for this input: "cudnn" on the "gpu" path for
    bfloat16/float16 with a head size cuDNN's fused kernel takes (a multiple of 8, at most 128), else None
    (XLA's, which keeps logits and softmax in float32)."""
    head_dim = qkv.shape[-1]
    if (backend == "gpu" and qkv.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    return None


def _attention_fwd(q, k, v):
    qs = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", qs, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    return out, (qs, k, v, weights, out)


def _attention_bwd(res, d_out):
    # Softmax backward with rowsum(dP * P) = rowsum(dO * O): the reduction runs over the (q, head_dim)
    # tensors instead of a further pass over the (q, k) ones (as in FlashAttention). Measured ~13% faster
    # attention forward+backward than autodiff on XLA:CPU at DiT-S/2 sizes; same values up to rounding.
    qs, k, v, weights, out = res
    d_v = jnp.einsum("bhqk,bhqd->bhkd", weights, d_out)
    d_w = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (weights.astype(jnp.float32) * (d_w - delta)).astype(qs.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k) * jnp.asarray(qs.shape[-1] ** -0.5, qs.dtype)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, qs)
    return d_q, d_k, d_v


@jax.custom_vjp
def _attention_core(q, k, v):
    """softmax(q k^T / sqrt(d)) v for heads-major (B, heads, N, d) inputs."""
    return _attention_fwd(q, k, v)[0]


_attention_core.defvjp(_attention_fwd, _attention_bwd)
