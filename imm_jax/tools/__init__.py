"""Command-line tools: `python -m imm_jax.tools.encode_latents` (pre-encode ImageNet into SD-VAE latents)."""
