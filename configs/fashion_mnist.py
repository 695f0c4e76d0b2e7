"""The embedded default: class-conditional IMM on Fashion-MNIST (28x28 padded to 32x32, 10 classes), CPU-sized.

    apt-get install dataset-fashion-mnist          # as root (else with sudo): IDX files under /usr/share/datasets/fashion-mnist/
    python -m imm_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist

Any directory holding the four IDX files also works: --config.data.path=DIR.
Network: a small DiT (patch 4 on 32x32x1 = 64 tokens); chosen for speed on a 2-core CPU (README lists the
measured throughput). Samples (1/2/4 steps, CFG) are written to runs/fmnist/samples/ every sample_every steps.
Differences from the paper's CIFAR recipe, all for a ~15 minute CPU run: a small DiT instead of DDPM++,
batch 64 instead of 4096, AdamW at lr 1e-3 with warm-up and clipping, k = 7 instead of 15 (coarse r(s, t)
steps: most pairs with t < 0.7 hit the base case r = s, so the induction bootstraps within minutes; k = 10 or 12
still gave formless blobs after 15 CPU-minutes, k = 7 gave recognisable garments of every class after ~900 steps),
fast EMAs, label dropout 0.1 for classifier-free guidance.

The flow-matching baseline on the same network, data and optimizer (docs/RESULTS.md):
    python -m imm_jax.main --config=configs/fashion_mnist.py:fm --workdir=runs/fmnist_fm
"""
import ml_collections

from imm_jax import networks


def get_config(arg=None):
    if arg not in (None, "", "imm", "fm"):
        raise ValueError(f"configs/fashion_mnist.py:{arg}: use no argument (IMM) or ':fm' (flow matching).")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = networks.dit_config(None, image_size=32, in_channels=1, num_classes=10, hidden_size=128,
                                  depth=4, num_heads=4, patch_size=4)
    c.imm = ml_collections.ConfigDict(dict(
        objective="imm", schedule="fm", f_type="simple_edm", sigma_d=0.5, temb="s", time_scale=1000.0,
        t_min=0.006,
        t_max=0.994, particles=4, k=7, min_gap=0.0, mapping="eta", a=1.0, b=5.0, kernel="laplace",
        label_dropout=0.1, dropout_keys="independent", fused=False,
        k_end=ml_collections.config_dict.placeholder(int), k_ramp_steps=0))
    c.data = ml_collections.ConfigDict(dict(
        source="fashion_mnist", path="", name="", split="train", batch_size=64, random_flip=False,
        seed=0, prefetch=2, pad=2, synthetic_size=1024))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=100, grad_clip=1.0))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=3000, log_every=50, ckpt_every=500, keep_checkpoints=3, sample_every=500,
        ema_decays=(0.999, 0.99), sample_ema=ml_collections.config_dict.placeholder(float),
        async_checkpoints=True, max_train_minutes=15.0))
    # FID during training (imm_jax/evaluation/in_training.py); off by default: Inception on a 2-core CPU runs at
    # ~5-8 img/s, so 1k samples at 2 step counts cost ~5 min. Reference: the first ref_images test images.
    c.eval = ml_collections.ConfigDict(dict(
        every=0, num_samples=1000, steps=(1, 2), batch_size=100, ref_split="test", ref_images=1000,
        ref_stats="", weights="", seed=1))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**18))
    c.sample = ml_collections.ConfigDict(dict(
        steps=(1, 2, 4), grid="uniform", mid_etas=ml_collections.ConfigDict(), cfg_scale=2.0,
        sampler="pushforward", grid_size=100, seed=42))
    if arg == "fm":  # conditional OT flow matching, sampled with Euler (IMM's k, M, mapping, kernel unused)
        c.imm.objective = "fm"
        c.sample.sampler = "euler"
        c.sample.steps = (1, 2, 4, 8)
    return c
