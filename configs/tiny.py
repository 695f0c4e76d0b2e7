"""Tiny config for tests: a 1-block DiT on 8x8x1 synthetic data, 8 groups of 4 particles.

    python -m imm_jax.main --config=configs/tiny.py --workdir=/tmp/imm_tiny

`configs/tiny.py:augment`: a tiny DDPM++ UNet instead, trained with EDM's augmentation (p = 0.5, 9 labels).
"""
from imm_jax import networks
from imm_jax.configs import base


def get_config(arg=None):
    args = base.parse_args(arg, "tiny", dict(variant="dit"), dict(variant=("dit", "augment")), positional="variant")
    if args["variant"] == "augment":
        c = base.get_config(networks.unet_config(image_size=8, in_channels=1, num_classes=10, model_channels=16,
                                                 channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                                                 augment_dim=9, dropout=0.0))
        c.data.augment_p = 0.5
    else:
        c = base.get_config(networks.dit_config(None, image_size=8, in_channels=1, num_classes=10,
                                                hidden_size=32, depth=1, num_heads=2, patch_size=4))
    c.data.update(dict(batch_size=32, synthetic_size=256, random_flip=True))
    c.optim.update(dict(lr=1e-3, warmup_steps=2, grad_clip=1.0))
    c.train.update(dict(num_steps=6, log_every=1, ckpt_every=3, sample_every=0, ema_decays=(0.9, 0.5),
                        sample_ema=None))
    c.eval.update(dict(num_samples=8, steps=(1,), batch_size=8, ref_images=8))
    c.sample.update(dict(steps=(1, 2), grid_size=4))
    return c
