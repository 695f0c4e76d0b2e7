"""ImageNet-256 in SD-VAE latent space (32x32x4) with DiT, the paper's recipe (spec §4, Table 5).

    python -m imm_jax.tools.encode_latents ...            # once: pre-computed latents (see launch/README.md)
    python -m imm_jax.main --config=configs/imagenet256.py:variant=XL/2,a=2,temb=stride \
        --workdir=runs/im256_xl_ts_a2 --config.data.path=/data/imagenet256_latents

Args (comma separated key=value): variant=S/2|B/2|L/2|XL/2 (default B/2, the ablation model), a=1|2,
temb=s|stride, dtype=float32|bfloat16|float16. With temb=stride and a=2 (the headline "ts_a2" XL model)
the minimum t-r gap is 1e-4 (spec §3.5); fp16 is then fine (Table 8).
Recipe: Euler-FM + OT-FM, sigma_d 0.5, t ~ U(0, 0.994), k = 12, M = 4, b = 4, label dropout 0.1, AdamW
lr 1e-4 (0.9, 0.999, eps 1e-8), no weight decay, batch 4096, 1.2M steps, EMA 0.9999, no flip, CFG 1.5.
"""
import ml_collections

from imm_jax import networks
from imm_jax.configs import base

VARIANTS = ("S/2", "B/2", "L/2", "XL/2")


def parse_args(arg):
    return base.parse_args(arg, "imagenet256", dict(variant="B/2", a="1", temb="s", dtype="float32"),
                           dict(variant=VARIANTS, a=("1", "2"), temb=("s", "stride"),
                                dtype=("float32", "bfloat16", "float16")))


def get_config(arg=None):
    args = parse_args(arg)
    headline = args["temb"] == "stride" and args["a"] == "2"
    c = base.get_config(networks.dit_config(args["variant"], image_size=32, in_channels=4, num_classes=1000,
                                            dtype=args["dtype"]))
    c.imm.update(dict(f_type="euler_fm", temb=args["temb"], t_min=0.0, a=float(args["a"]), b=4.0,
                      min_gap=1e-4 if (headline or args["dtype"] != "float32") else 0.0))
    c.data.source = "latents"
    c.train.update(dict(num_steps=1_200_000, sample_every=0))
    # Local diffusers directory of stabilityai/sd-vae-ft-ema, used to decode samples (imm_jax.sample, grids, FID).
    c.vae = ml_collections.ConfigDict(dict(path="", dtype="float16"))
    # FID during training needs config.vae.path and config.eval.ref_stats (python -m imm_jax.evaluation stats).
    c.eval.update(dict(ref_split="validation"))
    return c
