"""Test session setup: 8 fake CPU devices, float32 defaults, offline, one compilation cache for the session."""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The layers use the CPU dense kernel only on hosts without AVX-512 (imm_jax/kernels/cpu_dense.py); the suite
# runs it on every host so that its results are checked wherever CI lands (test_cpu_dense tests the choice).
os.environ.setdefault("IMM_JAX_CPU_DENSE", "1")

# Many tests (and the command-line subprocesses, through the environment) compile the same tiny programs: a
# persistent compilation cache, fresh for each session and removed at its end, lets them compile each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="imm_jax_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
