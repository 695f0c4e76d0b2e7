"""`python -m imm_jax.convert`: the converter's command line (imm_jax/io/convert.py)."""
import sys

from imm_jax.io.convert import main

if __name__ == "__main__":
    main(sys.argv[1:])
