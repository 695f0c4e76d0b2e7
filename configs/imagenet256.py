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

VARIANTS = ("S/2", "B/2", "L/2", "XL/2")


def parse_args(arg):
    out = dict(variant="B/2", a="1", temb="s", dtype="float32")
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"configs/imagenet256.py arg {item!r} must be key=value; keys: {sorted(out)}.")
        k, v = item.split("=", 1)
        if k not in out:
            raise ValueError(f"configs/imagenet256.py: unknown arg {k!r}; use {sorted(out)}.")
        out[k] = v
    if out["variant"] not in VARIANTS:
        raise ValueError(f"variant={out['variant']!r}: use one of {VARIANTS}.")
    if out["a"] not in ("1", "2"):
        raise ValueError(f"a={out['a']!r}: use 1 or 2.")
    if out["temb"] not in ("s", "stride"):
        raise ValueError(f"temb={out['temb']!r}: use s or stride.")
    if out["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={out['dtype']!r}: use float32, bfloat16 or float16.")
    return out


def get_config(arg=None):
    args = parse_args(arg)
    headline = args["temb"] == "stride" and args["a"] == "2"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = networks.dit_config(args["variant"], image_size=32, in_channels=4, num_classes=1000,
                                  dtype=args["dtype"])
    c.imm = ml_collections.ConfigDict(dict(
        objective="imm", schedule="fm", f_type="euler_fm", sigma_d=0.5, temb=args["temb"], time_scale=1000.0,
        t_min=0.0,
        t_max=0.994, particles=4, k=12, min_gap=1e-4 if (headline or args["dtype"] != "float32") else 0.0,
        mapping="eta", a=float(args["a"]), b=4.0, kernel="laplace", label_dropout=0.1,
        dropout_keys="independent", fused=False,
        k_end=ml_collections.config_dict.placeholder(int), k_ramp_steps=0))
    c.data = ml_collections.ConfigDict(dict(
        source="latents", path="", name="", split="train", batch_size=4096, random_flip=False, seed=0,
        prefetch=2, pad=0, synthetic_size=1024))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, grad_clip=0.0))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=1_200_000, log_every=100, ckpt_every=5000, keep_checkpoints=3, sample_every=0,
        ema_decays=(0.9999, 0.999), sample_ema=0.9999,
        async_checkpoints=True, max_train_minutes=0.0))
    # Local diffusers directory of stabilityai/sd-vae-ft-ema, used to decode samples (imm_jax.sample, FID).
    c.vae = ml_collections.ConfigDict(dict(path="", dtype="float16"))
    # Latent model: FID needs VAE decoding, which the trainer does not run; export samples with
    # --mode=sample and use python -m imm_jax.evaluation (see README).
    c.eval = ml_collections.ConfigDict(dict(
        every=0, num_samples=10000, steps=(1, 2), batch_size=500, ref_split="validation", ref_images=10000,
        ref_stats="", weights="", seed=1))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**18))
    c.sample = ml_collections.ConfigDict(dict(
        steps=(1, 2, 4, 8), grid="uniform", mid_etas=ml_collections.ConfigDict(), cfg_scale=1.5,
        sampler="pushforward", grid_size=64, seed=42))
    return c
