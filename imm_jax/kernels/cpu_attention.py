"""Softmax attention as an XLA:CPU custom call (cpu_attention.cc), parallel over (batch, head).

XLA:CPU runs batched attention matmuls on one thread; this kernel runs one (batch, head) pair per task on
XLA's intra-op pool (docs/PERFORMANCE.md has the measurements). It is used for float32 attention when JAX's
default backend is the CPU and a C++ compiler is present: the source is compiled at first use with
`g++ -O3 -march=native` against jaxlib's FFI headers and cached under `$IMM_JAX_CACHE_DIR` (default
`~/.cache/imm_jax`), keyed by source, jaxlib version and CPU flags. Without a compiler, or with
`IMM_JAX_CPU_ATTENTION=0`, attention stays the plain-JAX formulation (same values up to rounding).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_TARGETS = {"forward": "ImmAttentionForward", "forward_res": "ImmAttentionForwardRes",
            "backward": "ImmAttentionBackward"}
ENV_SWITCH = "IMM_JAX_CPU_ATTENTION"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("IMM_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "imm_jax")
    return Path(root) / "kernels"


def _compile(compiler: str) -> Path:
    """Builds the shared library (or finds it in the cache); raises RuntimeError with the compiler's output."""
    import jaxlib
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir()]
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join([compiler] + flags).encode(),
                                     jaxlib.__version__.encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"cpu_attention_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logging.info("imm_jax: compiling the CPU attention kernel into %s (once per machine)", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, str(_SOURCE), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent processes may build the same key
    return target


@functools.cache
def available() -> bool:
    """True when the kernel is switched on, compiled and registered with XLA:CPU (logs why not, once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logging.warning("imm_jax: no C++ compiler found; CPU attention uses the plain-JAX path "
                        "(install g++ for the faster kernel, or set %s=0 to silence this).", ENV_SWITCH)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
        for kind, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(f"imm_attention_{kind}", jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (RuntimeError, OSError, AttributeError) as err:
        logging.warning("imm_jax: the CPU attention kernel is unavailable, using the plain-JAX path: %s", err)
        return False
    return True


_switched_off = False


@contextlib.contextmanager
def switched_off():
    """Functions traced inside this context use the plain-JAX attention (bench/ counts its FLOPs this way:
    XLA's cost analysis does not see inside custom calls)."""
    global _switched_off
    previous, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = previous


def applies(qkv: jax.Array) -> bool:
    """Whether attention on qkv (..., N, 3, heads, head_dim) runs through the kernel."""
    return (not _switched_off and jax.default_backend() == "cpu" and qkv.dtype == jnp.float32
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
