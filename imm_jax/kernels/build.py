"""Builds, caches and registers the CPU kernels (XLA FFI custom calls); one switch to trace without them.

Each kernel is one C++ source beside this file (plus the shared `cpu_common.h`), compiled at first use with
`g++ -O3 -march=native` against jaxlib's FFI headers and cached under `$IMM_JAX_CACHE_DIR` (default
`~/.cache/imm_jax`), keyed by the sources, flags, jaxlib version and CPU flags. Without a compiler a kernel
is unavailable and its callers keep their plain-JAX path. Environment switches: `IMM_JAX_CPU_KERNELS=0`
turns all kernels off, `IMM_JAX_CPU_ATTENTION=0` / `IMM_JAX_CPU_DENSE=0` one of them.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

_DIR = Path(__file__).parent
_HEADERS = ("cpu_common.h",)
ENV_ALL = "IMM_JAX_CPU_KERNELS"


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


def _compile(compiler: str, stem: str) -> Path:
    """Builds `stem`.cc into a shared library (or finds it in the cache); RuntimeError with the compiler output."""
    import jaxlib
    source = _DIR / f"{stem}.cc"
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir()]
    parts = [source.read_bytes(), *[(_DIR / h).read_bytes() for h in _HEADERS],
             " ".join([compiler] + flags).encode(), jaxlib.__version__.encode(), _cpu_flags().encode(),
             platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = _cache_dir() / f"{stem}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logging.info("imm_jax: compiling the CPU kernel %s into %s (once per machine)", stem, target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, str(source), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent processes may build the same key
    return target


def switched_on(env_switch: str) -> bool:
    """False when IMM_JAX_CPU_KERNELS=0 or the kernel's own switch is 0."""
    return os.environ.get(ENV_ALL, "1") != "0" and os.environ.get(env_switch, "1") != "0"


def load(stem: str, targets: dict[str, str], env_switch: str, what: str) -> bool:
    """Compiles `stem`.cc and registers its handler symbols as XLA:CPU FFI targets {ffi name: symbol}.

    Returns False (with one warning saying why and which path is used instead) when the kernel is
    switched off, no compiler is found or the build fails. `what` names the kernel in messages.
    """
    if not switched_on(env_switch):
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logging.warning("imm_jax: no C++ compiler found; %s uses the plain-JAX path "
                        "(install g++ for the faster kernel, or set %s=0 to silence this).", what, env_switch)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_compile(compiler, stem)))
        for name, symbol in targets.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as err:
        logging.warning("imm_jax: the CPU kernel for %s is unavailable, using the plain-JAX path: %s", what, err)
        return False
    return True


_switched_off = False


@contextlib.contextmanager
def switched_off():
    """Functions traced inside this context use the plain-JAX paths instead of any kernel (bench/ counts
    FLOPs this way: XLA's cost analysis does not see inside custom calls)."""
    global _switched_off
    previous, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = previous


def tracing_allowed() -> bool:
    """Whether code being traced now may use a kernel: not inside `switched_off()`. Callers reach the kernels
    only on the "cpu" execution path of `imm_jax.networks.layers`, chosen when the program runs on CPU devices."""
    return not _switched_off
