"""`python -m imm_jax.tuning`: the time-embedding tuner's command line (imm_jax/inference/tuning.py)."""
import sys

from imm_jax import errors
from imm_jax.inference.tuning import main

if __name__ == "__main__":
    from imm_jax.kernels import host_memory
    host_memory.keep_freed_memory()
    errors.run("python -m imm_jax.tuning", main, sys.argv[1:])
