"""Shared helpers for the benchmarks: device setup, timing, matmul peak, XLA cost analysis, output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from imm_jax.kernels import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state = {"keep_freed_memory": None}  # set by setup(); None: setup() was not called


def load_config(name: str, arg=None):
    """configs/<name>.py's get_config(arg) (the installed copy: bench scripts run from any directory)."""
    from imm_jax import config_files
    return config_files.load(f"configs/{name}.py" + (f":{arg}" if arg else ""))


def setup(devices: int | None = None) -> bool:
    """Process setup, first thing in a benchmark's main: `devices` fake CPU devices (None: as XLA_FLAGS says),
    then the host-memory setting the entry points run with (imm_jax/kernels/host_memory.py;
    IMM_JAX_KEEP_FREED_MEMORY=0 measures glibc's defaults instead). Returns whether that setting is on."""
    if devices is not None:
        if "jax" in sys.modules:
            raise RuntimeError("common.setup(devices) must run before jax is imported")
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    _state["keep_freed_memory"] = host_memory.keep_freed_memory()
    return _state["keep_freed_memory"]


def block(x):
    import jax
    return jax.block_until_ready(x)


def time_calls(fn, iters: int, warmup: int = 2) -> list[float]:
    """Seconds per call of fn() (which must block), after warm-up."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak_flops(n: int = 2048, iters: int = 10) -> float:
    """Best measured float32 matmul FLOP/s (n x n @ n x n, jit, default precision) on the default device."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    times = time_calls(lambda: block(f(a, b)), iters)
    return 2 * n ** 3 / min(times)


def cost_flops(compiled) -> float:
    """FLOPs of one call of a compiled XLA program (XLA's own cost analysis), summed over devices."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in ca))
    return float(ca.get("flops", 0.0))


# The custom-call targets of each CPU kernel (imm_jax/kernels).
KERNEL_TARGETS = {"attention": ("imm_attention",), "dense": ("imm_matmul", "imm_conv2d")}


def kernels_called(compiled) -> list[str]:
    """Which of the CPU kernels (imm_jax/kernels) a compiled program calls: "attention", "dense"."""
    text = compiled.as_text()
    return [name for name, targets in KERNEL_TARGETS.items() if any(t in text for t in targets)]


def model_flops(compiled, recompile) -> tuple[float, list[str]]:
    """(FLOPs of one call, the CPU kernels it calls).

    XLA's cost analysis does not see into custom calls, so a program that uses the kernels is counted as
    `recompile()` returns it when traced with the plain-JAX paths (same math, a fresh trace).
    """
    from imm_jax.kernels import build
    kernels = kernels_called(compiled)
    if not kernels:
        return cost_flops(compiled), kernels
    with build.switched_off():
        reference = recompile()
    if kernels_called(reference):
        raise RuntimeError("the reference program still calls a CPU kernel (a cached trace?)")
    return cost_flops(reference), kernels


def memory_bytes(compiled) -> int:
    """Peak bytes XLA plans for one call: arguments + outputs + temporaries (per device)."""
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def machine() -> dict:
    import jax
    cpu = platform.processor() or platform.machine()
    try:
        model = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except (OSError, IndexError):
        model = cpu
    return dict(cpu=model, cores=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend(),
                devices=jax.device_count(), keep_freed_memory=_state["keep_freed_memory"],
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def run_child(script: str, args: list[str], devices: int) -> list[dict]:
    """Run a benchmark script in a fresh process with `devices` fake CPU devices; parse its JSON lines."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    out = subprocess.run([sys.executable, script, "--child", *args], env=env, capture_output=True, text=True)
    rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode:  # keep the settings that finished (e.g. the 8-device child killed for memory)
        sys.stderr.write(out.stderr[-4000:])
        sys.stderr.write(f"WARNING: {script} with {devices} devices failed with exit code {out.returncode} "
                         f"(-9: killed, usually out of memory); keeping its {len(rows)} finished rows\n")
    return rows


def print_table(rows: list[dict], columns: list[str]):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return "" if v is None else str(v)


def write_json(path: str, payload: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def median(xs):
    return statistics.median(xs)
