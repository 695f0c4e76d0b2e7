"""Small building blocks shared by the backbones: dtype parsing, float32 norms, attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head softmax attention with float32 logits and softmax.

    q, k, v: (B, N, heads, head_dim) in the trunk dtype. Returns (B, N, heads, head_dim) in v's dtype.
    """
    # Heads-major einsums: measured ~1.5x faster forward on XLA:CPU (DiT-S/2) than contracting in
    # (B, N, heads, d) layout directly, and on par with jax.nn.dot_product_attention's backward.
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    return _attention_core(q, k, v).transpose(0, 2, 1, 3)


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
