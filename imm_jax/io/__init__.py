"""Files made by or for other tools: the restricted torch unpickler and TorchScript reader, the converter of
official checkpoints (torch layouts -> imm_jax params), latent shards, PNG/uint8 images."""
