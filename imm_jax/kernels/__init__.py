"""Hand-written kernels behind plain-JAX fallbacks (see each module for when it applies)."""
