"""imm_jax.kernels.host_memory: freed large blocks stay in the process, so re-allocating them costs no page faults."""
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from imm_jax.kernels import host_memory
from jax._src import xla_bridge
applied = host_memory.keep_freed_memory()
assert not xla_bridge.backends_are_initialized()  # decided before JAX starts its threads
mib = int(sys.argv[1])
def touch():
    a = np.ones(mib * 2**20 // 8)  # written, so every page is faulted in
    del a
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(env_value, mib):
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["IMM_JAX_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, str(mib)], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("mib", [64, 2560])  # 2.5 GiB: above the largest positive trim threshold
def test_freed_blocks_are_reused_without_page_faults(mib):
    # Fresh blocks cost at least one fault per 2 MiB huge page each time: the floor below which reuse shows.
    fresh_floor = 3 * mib // 2
    applied_on, faults_on = probe("1", mib)
    assert applied_on
    assert faults_on * 10 <= fresh_floor
    if mib <= 64:  # the opt-out measured once, at the small size (at 2.5 GiB it costs ~12 GiB of page faulting)
        applied_off, faults_off = probe("0", mib)  # glibc's default: one fresh mmap per block
        assert not applied_off and faults_off >= fresh_floor


@pytest.mark.parametrize("host", ["plugin installed", "JAX_PLATFORMS=tpu", "backends started"])
def test_accelerator_processes_keep_the_default_allocator(host, tmp_path):
    """On a TPU/GPU host (JAX's default backend is not the CPU) the allocator settings are not applied: an
    installed accelerator plugin or JAX_PLATFORMS naming one leaves the decision to the backends."""
    pre = "import jax; jax.default_backend = lambda: 'tpu'\n"
    env = dict(os.environ, IMM_JAX_KEEP_FREED_MEMORY="1")
    env.pop("LD_PRELOAD", None)
    if host == "plugin installed":
        (tmp_path / "libtpu").mkdir()
        (tmp_path / "libtpu" / "__init__.py").write_text("")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
        env.pop("JAX_PLATFORMS", None)  # the suite's "cpu" would make the process CPU-only whatever is installed
    elif host == "JAX_PLATFORMS=tpu":
        env["JAX_PLATFORMS"] = "tpu"
    else:
        pre = "import jax; jax.devices(); jax.default_backend = lambda: 'tpu'\n"
    code = pre + "from imm_jax.kernels import host_memory; print(host_memory.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
