"""Side-by-side grids: the same noise and labels sampled untuned (left) and with tuned time embeddings (right).

    python bench/tuned_grids.py --run runs/imm_m4 --steps 1 --out docs/img/mteo_mmd_imm_1step.png

Samples come from `imm_jax.load(run, tuned=True)` (the tuned set for that sampler, step count and grid), 32 images
(labels 0..9 repeated), seed 0; also prints the pixel standard deviation of each half (a contrast check).
"""
from __future__ import annotations

import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="workdir or checkpoint with tuned vectors saved beside it")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import imm_jax
    from imm_jax.io import images

    sampler = imm_jax.load(args.run, tuned=True)
    labels = np.arange(args.num) % max(1, int(sampler.config.model.num_classes))
    halves = [sampler(args.num, steps=args.steps, seed=0, labels=labels, tuned=t) for t in (False, True)]
    grids = [images.make_grid(np.asarray(h), ncol=8) for h in halves]
    gap = np.full((grids[0].shape[0], 8, grids[0].shape[2]), 255, np.uint8)
    images.save_png(args.out, np.concatenate([grids[0], gap, grids[1]], axis=1))
    print(f"wrote {args.out}; pixel std untuned {np.std(halves[0]):.1f}, tuned {np.std(halves[1]):.1f}")


if __name__ == "__main__":
    main()
