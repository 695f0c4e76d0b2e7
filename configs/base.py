"""Defaults every experiment config starts from, and the argument parser they share.

The values are the paper's ImageNet/CIFAR recipe where one exists (spec §4): OT-FM schedule, Simple-EDM,
sigma_d 0.5, t ~ U(0.006, 0.994), M = 4, k = 12, mapping eta with a = 1, b = 5, Laplace kernel, label dropout
0.1, AdamW lr 1e-4 (0.9, 0.999, eps 1e-8), batch 4096, EMA 0.9999, pushforward sampling with CFG 1.5.
An experiment file sets its model and what differs:

    from imm_jax.configs import base
    def get_config(arg=None):
        c = base.get_config(networks.dit_config("B/2", image_size=32, in_channels=4, num_classes=1000))
        c.imm.k = 15
        return c
"""
from __future__ import annotations

import ml_collections

from imm_jax.training import augment


def get_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The full default config around `model` (a networks.*_config ConfigDict)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model
    c.imm = ml_collections.ConfigDict(dict(
        objective="imm", schedule="fm", f_type="simple_edm", sigma_d=0.5, temb="s", time_scale=1000.0,
        t_min=0.006, t_max=0.994, particles=4, k=12, min_gap=0.0, mapping="eta", a=1.0, b=5.0, kernel="laplace",
        label_dropout=0.1, dropout_keys="independent", fused=False,
        k_end=ml_collections.config_dict.placeholder(int), k_ramp_steps=0))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", path="", name="", split="train", batch_size=4096, random_flip=False, seed=0,
        prefetch=2, pad=0, synthetic_size=1024,
        # EDM's non-leaking augmentation (imm_jax/training/augment.py): probability p (0 = off) and the
        # per-operation multipliers (EDM's CIFAR-10 set; 9 label entries -> model.augment_dim = 9).
        augment_p=0.0, augment_ops=ml_collections.ConfigDict(dict(augment.EDM_CIFAR_OPS))))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, grad_clip=0.0))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=400_000, log_every=100, ckpt_every=5000, keep_checkpoints=3, sample_every=5000,
        ema_decays=(0.9999, 0.999), sample_ema=ml_collections.config_dict.placeholder(float),
        async_checkpoints=True, max_train_minutes=0.0))
    c.train.sample_ema = 0.9999
    # FID during training (imm_jax/evaluation/in_training.py); every=0 turns it off.
    c.eval = ml_collections.ConfigDict(dict(
        every=0, num_samples=10000, steps=(1, 2), batch_size=500, ref_split="test", ref_images=10000,
        ref_stats="", weights="", seed=1))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**18))
    c.sample = ml_collections.ConfigDict(dict(
        steps=(1, 2, 4, 8), grid="uniform", mid_etas=ml_collections.ConfigDict(), cfg_scale=1.5,
        sampler="pushforward", grid_size=64, seed=42))
    return c


def parse_args(arg: str | None, name: str, defaults: dict[str, str], choices: dict[str, tuple[str, ...]],
               positional: str | None = None) -> dict[str, str]:
    """'key=value,key=value' (the text after ':' in --config=FILE:ARGS) -> dict over `defaults`.

    A bare value is taken as `positional`'s (e.g. ':fm' for objective=fm). ValueError names the bad item
    and what is allowed.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            if positional is None:
                raise ValueError(f"configs/{name}.py: argument {item!r} must be key=value; keys: {sorted(out)}.")
            k, v = positional, item
        if k not in out:
            raise ValueError(f"configs/{name}.py: unknown argument {k!r}; use {sorted(out)}.")
        if k in choices and v not in choices[k]:
            raise ValueError(f"configs/{name}.py: {k}={v!r}: use one of {choices[k]}.")
        out[k] = v
    return out
