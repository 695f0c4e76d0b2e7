"""imm_jax: Inductive Moment Matching in JAX/Flax.

Public entry points: `imm_jax.sample(checkpoint, num_samples, ...)` and `imm_jax.load(checkpoint)`
(see `imm_jax.inference.api`). Submodules hold the math (`interpolants`, `parameterization`, `mmd`, `losses`,
`sampling`), the networks (`networks`) and the training system (`train`, `main`).
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing the package stays cheap and free of side effects.
    if name in ("sample", "load", "Sampler"):
        from imm_jax.inference import api
        return getattr(api, name)
    raise AttributeError(f"module 'imm_jax' has no attribute {name!r}")
