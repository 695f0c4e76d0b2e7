"""Softmax attention as an XLA:CPU custom call (cpu_attention.cc), parallel over (batch, head).

XLA:CPU runs batched attention matmuls on one thread; this kernel runs one (batch, head) pair per task on
XLA's intra-op pool (docs/PERFORMANCE.md has the measurements). It is used for float32 attention when JAX's
default backend is the CPU and a C++ compiler is present (built at first use, see `build.py`). Without a
compiler, or with `IMM_JAX_CPU_ATTENTION=0` (or `IMM_JAX_CPU_KERNELS=0`), attention stays the plain-JAX
formulation (same values up to rounding).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from imm_jax.kernels import build

_TARGETS = {"forward": "ImmAttentionForward", "forward_res": "ImmAttentionForwardRes",
            "backward": "ImmAttentionBackward"}
ENV_SWITCH = "IMM_JAX_CPU_ATTENTION"


@functools.cache
def available() -> bool:
    """True when the kernel is switched on, compiled and registered with XLA:CPU (logs why not, once)."""
    return build.load("cpu_attention", {f"imm_attention_{kind}": symbol for kind, symbol in _TARGETS.items()},
                      ENV_SWITCH, "CPU attention")


switched_off = build.switched_off  # kept here for callers of the attention kernel alone


def applies(qkv: jax.Array) -> bool:
    """Whether attention on qkv (..., N, 3, heads, head_dim) runs through the kernel."""
    return (build.tracing_allowed() and qkv.dtype == jnp.float32
            and qkv.ndim >= 4 and qkv.shape[-3] == 3 and qkv.shape[-4] % 8 == 0 and available())


def _result_shapes(kind: str, qkv):
    *lead, n, _, heads, head_dim = qkv.shape
    out = jax.ShapeDtypeStruct((*lead, n, heads, head_dim), jnp.float32)
    lse = jax.ShapeDtypeStruct((*lead, heads, n), jnp.float32)  # row log-sum-exp, the backward's residual
    return {"forward": out, "forward_res": (out, lse), "backward": jax.ShapeDtypeStruct(qkv.shape, jnp.float32)}[kind]


def _ffi_call(kind: str, qkv, *rest):
    if not available():
        raise RuntimeError(f"the CPU attention kernel is unavailable (see the warning above, or {ENV_SWITCH}=0)")
    return jax.ffi.ffi_call(f"imm_attention_{kind}", _result_shapes(kind, qkv), vmap_method="broadcast_all")(
        qkv, *rest, scale=np.float32(qkv.shape[-1] ** -0.5))


# Sharding: every operand and result has the batch first and the kernel treats each (batch, head) pair on its
# own, so on a mesh each device runs it on its batch shard (custom_partitioning; without it the partitioner
# would all-gather the batch and replicate the work). custom_vmap folds vmapped axes into the batch, which
# custom_partitioning cannot batch by itself.

def _shardings(mesh, arg_shapes, result_shapes):
    spec = tuple(getattr(arg_shapes[0].sharding, "spec", ()))
    batch = spec[0] if spec else None
    like = lambda x: NamedSharding(mesh, PartitionSpec(batch, *([None] * (x.ndim - 1))))
    return tuple(like(a) for a in arg_shapes), jax.tree.map(like, result_shapes)


def _partition(kind, mesh, arg_shapes, result_shapes):
    arg_shardings, result_shardings = _shardings(mesh, arg_shapes, result_shapes)
    return mesh, functools.partial(_ffi_call, kind), result_shardings, arg_shardings


def _sharding_rule(mesh, operand_types, result_types):
    """Einsum-like rule: the first dimension ("b") shared by all operands and results, the rest independent."""
    dims = lambda types, tag: ", ".join(
        " ".join(["b"] + [f"{tag}{j}_{i}" for i in range(1, len(t.shape))]) for j, t in enumerate(types))
    return f"{dims(operand_types, 'in')} -> {dims(result_types, 'out')}"


def _batched_call(kind: str):
    partitioned = custom_partitioning(functools.partial(_ffi_call, kind))
    partitioned.def_partition(
        functools.partial(_partition, kind),
        infer_sharding_from_operands=lambda mesh, args, results: _shardings(mesh, args, results)[1],
        sharding_rule=_sharding_rule)
    call = custom_vmap(lambda *args: partitioned(*args))

    @call.def_vmap
    def _fold_vmapped_axis_into_batch(axis_size, in_batched, *args):
        args = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, batched in zip(args, in_batched)]
        out = call(*[a.reshape(-1, *a.shape[2:]) for a in args])
        return (jax.tree.map(lambda o: o.reshape(axis_size, -1, *o.shape[1:]), out),
                jax.tree.map(lambda _: True, out))

    return call


_CALLS = {kind: _batched_call(kind) for kind in _TARGETS}


def _forward(qkv):
    out, lse = _CALLS["forward_res"](qkv)
    return out, (qkv, out, lse)


def _backward(res, d_out):
    return (_CALLS["backward"](*res, d_out),)


@jax.custom_vjp
def attention(qkv: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v per head.

    qkv: float32 (B, N, 3, heads, head_dim), q/k/v stacked on axis -3, N a multiple of 8.
    Returns (B, N, heads, head_dim) float32.
    """
    return _CALLS["forward"](qkv)


attention.defvjp(_forward, _backward)
