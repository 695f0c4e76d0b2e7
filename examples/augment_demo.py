"""EDM augmentation on a CPU: a small DDPM++ trained with IMM on Fashion-MNIST with augmentation on, then sampled
with the zero augmentation label (what users get: no augmentation) and with chosen labels (x-flip, a quarter
turn, 1.5x zoom), to show the network is conditioned on the augmentation instead of leaking it.

    python examples/augment_demo.py --workdir runs/augment_demo --minutes 15
    -> runs/augment_demo/augment_demo.png (rows of 10 classes; each block one augmentation label)

Needs the IDX files of Fashion-MNIST (apt-get install dataset-fashion-mnist, or --data DIR).
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np


def demo_config(minutes: float, p: float, data: str | None):
    from imm_jax import config_files, networks
    c = config_files.load("configs/fashion_mnist.py")
    c.model = networks.unet_config(image_size=32, in_channels=1, num_classes=10, model_channels=16,
                                   channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0,
                                   augment_dim=9)
    c.data.augment_p = p
    if data:
        c.data.path = data
    c.train.update(dict(max_train_minutes=minutes, num_steps=100_000, sample_every=0, ckpt_every=250))
    return c


class WithAugmentLabel:
    """A network whose apply() always passes one augmentation label (tiled to the batch)."""

    def __init__(self, net, label):
        self.net, self.label = net, np.asarray(label, np.float32)

    def apply(self, variables, x, *args, **kwargs):
        a = np.broadcast_to(self.label, (x.shape[0], self.label.shape[-1]))
        return self.net.apply(variables, x, *args, augment_labels=a, **kwargs)


def label(xflip=0.0, scale=0.0, angle=0.0, std=0.2):
    """The 9-entry label of EDM's CIFAR set: xflip, yflip, scale, cos-1, sin, aniso x2, translate x2."""
    return [xflip, 0.0, scale / std, math.cos(angle) - 1, math.sin(angle), 0.0, 0.0, 0.0, 0.0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--p", type=float, default=0.5, help="augmentation probability (EDM's CIFAR-10 value: 0.12)")
    ap.add_argument("--data", help="directory with the Fashion-MNIST IDX files")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from imm_jax.core import sampling
    from imm_jax.inference import api
    from imm_jax.io import images
    from imm_jax.training import train

    config = demo_config(args.minutes, args.p, args.data)
    train.train_and_evaluate(config, args.workdir)
    sampler = api.load(args.workdir)
    cfg, params = sampler.config, sampler.params
    net = train.build_network(cfg)
    objective = train.build_objective(cfg)
    grid = sampling.time_grid("uniform", args.steps, schedule=cfg.imm.schedule, t_min=cfg.imm.t_min,
                              t_max=cfg.imm.t_max)
    classes = jnp.tile(jnp.arange(10), 3)
    blocks = []
    for name, lab in [("none", None), ("x-flip", label(xflip=1)), ("quarter turn", label(angle=math.pi / 2)),
                      ("zoom 1.5x", label(scale=math.log2(1.5)))]:
        model = net if lab is None else WithAugmentLabel(net, lab)
        x = sampling.generate(model, params, jax.random.key(0), (30, 32, 32, 1), objective=objective, grid=grid,
                              labels=classes)
        blocks.append(images.make_grid(images.to_uint8(x, pad=2), ncol=10))
        print(f"{name}: sampled", flush=True)
    sep = np.full((8,) + blocks[0].shape[1:], 255, np.uint8)
    canvas = np.concatenate(sum([[b, sep] for b in blocks], [])[:-1], 0)
    out = images.save_png(os.path.join(args.workdir, "augment_demo.png"), canvas)
    print(f"wrote {out}: blocks top to bottom = zero label (no augmentation), x-flip, quarter turn, zoom 1.5x")


if __name__ == "__main__":
    main()
