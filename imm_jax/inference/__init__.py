"""Using a trained model: `api` (imm_jax.load / imm_jax.sample, the one Sampler that compiles sampling
programs), `export` (many samples, resumable), `tuning` (step-wise time-embedding tuning) and its
`tuned_vectors` store."""
