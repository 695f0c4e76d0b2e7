"""Tiny config for tests: a 1-block DiT on 8x8x1 synthetic data, 8 groups of 4 particles.

    python -m imm_jax.main --config=configs/tiny.py --workdir=/tmp/imm_tiny
"""
import ml_collections

from imm_jax import networks


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = networks.dit_config(None, image_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=1,
                                  num_heads=2, patch_size=4)
    c.imm = ml_collections.ConfigDict(dict(
        objective="imm", schedule="fm", f_type="simple_edm", sigma_d=0.5, temb="s", time_scale=1000.0,
        t_min=0.006,
        t_max=0.994, particles=4, k=12, min_gap=0.0, mapping="eta", a=1.0, b=5.0, kernel="laplace",
        label_dropout=0.1, dropout_keys="independent", fused=False,
        k_end=ml_collections.config_dict.placeholder(int), k_ramp_steps=0))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", batch_size=32, synthetic_size=256, random_flip=True, path="", name="",
        split="train", seed=0, prefetch=2, pad=0))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=2, grad_clip=1.0))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=6, log_every=1, ckpt_every=3, keep_checkpoints=3, sample_every=0, ema_decays=(0.9, 0.5),
        sample_ema=ml_collections.config_dict.placeholder(float), async_checkpoints=True,
        max_train_minutes=0.0))
    c.eval = ml_collections.ConfigDict(dict(
        every=0, num_samples=8, steps=(1,), batch_size=8, ref_split="test", ref_images=8, ref_stats="",
        weights="", seed=1))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**18))
    c.sample = ml_collections.ConfigDict(dict(
        steps=(1, 2), grid="uniform", mid_etas=ml_collections.ConfigDict(), cfg_scale=1.5,
        sampler="pushforward", grid_size=4, seed=42))
    return c
