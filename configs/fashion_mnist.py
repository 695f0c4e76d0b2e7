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
M = 2 particles instead of 4 (at about this budget, 256k training images, M = 1 and 2 cannot be told apart over two
training seeds each, and M = 4 is behind at 2-4 steps: at a fixed batch, fewer particles give more (s, t) pairs per step;
at batch 256 and 461k images M = 2 was the best of M = 1/2/4/8; docs/RESULTS.md), fast EMAs, label dropout 0.1 for
classifier-free guidance.

The flow-matching baseline on the same network, data and optimizer (docs/RESULTS.md):
    python -m imm_jax.main --config=configs/fashion_mnist.py:fm --workdir=runs/fmnist_fm
"""
from imm_jax import networks
from imm_jax.configs import base


def get_config(arg=None):
    args = base.parse_args(arg, "fashion_mnist", dict(objective="imm"), dict(objective=("imm", "fm")),
                           positional="objective")
    c = base.get_config(networks.dit_config(None, image_size=32, in_channels=1, num_classes=10, hidden_size=128,
                                            depth=4, num_heads=4, patch_size=4))
    c.imm.k = 7
    c.imm.particles = 2
    c.data.update(dict(source="fashion_mnist", batch_size=64, pad=2))
    c.optim.update(dict(lr=1e-3, warmup_steps=100, grad_clip=1.0))
    # The 15-minute budget ends the run (~3,500 steps on an idle 2-core CPU); num_steps only caps faster machines.
    c.train.update(dict(num_steps=6000, log_every=50, ckpt_every=500, sample_every=500, ema_decays=(0.999, 0.99),
                        sample_ema=None, max_train_minutes=15.0))
    # FID during training (imm_jax/evaluation/in_training.py); off by default: Inception on a 2-core CPU runs at
    # ~5-8 img/s, so 1k samples at 2 step counts cost ~5 min. Reference: the first ref_images test images.
    c.eval.update(dict(num_samples=1000, batch_size=100, ref_images=1000))
    c.sample.update(dict(steps=(1, 2, 4), cfg_scale=2.0, grid_size=100))
    if args["objective"] == "fm":  # conditional OT flow matching, sampled with Euler (IMM's k, M, mapping, kernel unused)
        c.imm.objective = "fm"
        c.sample.sampler = "euler"
        c.sample.steps = (1, 2, 4, 8)
    return c
