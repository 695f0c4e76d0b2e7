"""Test session setup: 8 fake CPU devices, float32 defaults, offline."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The layers use the CPU dense kernel only on hosts without AVX-512 (imm_jax/kernels/cpu_dense.py); the suite
# runs it on every host so that its results are checked wherever CI lands (test_cpu_dense tests the choice).
os.environ.setdefault("IMM_JAX_CPU_DENSE", "1")
