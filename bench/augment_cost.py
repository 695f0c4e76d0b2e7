"""Benchmark: what EDM's augmentation (imm_jax/training/augment.py) costs in the IMM train step.

    python bench/augment_cost.py --out bench/results/augment_cost.json

Two compiled train steps of the same network and batch, with augmentation (EDM's CIFAR-10 set, p = 0.12,
augment_dim 9) and without, timed interleaved A/B/A/B on one CPU device; plus the augmentation alone (jitted,
the same batch, p = 0.12 and p = 1). Networks: a narrow DDPM++ on 32x32x3 (as bench/train_step.py) and the
tiny 16-channel UNet of the demonstration run on 32x32x1 Fashion-MNIST.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def config(model: str, batch: int, p: float):
    from imm_jax import networks
    c = common.load_config("cifar10", f"augment={p}")
    if model == "ddpmpp_narrow":
        c.model = networks.unet_config(image_size=32, in_channels=3, num_classes=0, model_channels=64,
                                       channel_mult=(1, 2, 2), num_blocks=2, dropout=0.2, augment_dim=9 if p else 0)
    elif model == "fmnist_unet":
        c.model = networks.unet_config(image_size=32, in_channels=1, num_classes=10, model_channels=32,
                                       channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0,
                                       augment_dim=9 if p else 0)
    else:
        raise ValueError(f"unknown model {model!r}")
    c.data.update(dict(batch_size=batch, source="synthetic"))
    c.mesh.update(dict(data=1, fsdp=1))
    return c


def compiled(c):
    import jax
    import numpy as np
    from imm_jax.training import sharding, train
    tr = train.Trainer(c, mesh=sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))
    m, b = c.model, int(c.data.batch_size)
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.in_channels)).astype(
        np.float32), "label": rng.integers(0, max(1, m.num_classes), b).astype(np.int32)}, tr.batch_sharding)
    state = [tr.init()]
    t0 = time.perf_counter()
    step = tr.train_step.lower(state[0], batch).compile()
    compile_s = time.perf_counter() - t0

    def run():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready(metrics["loss"])
    return run, batch, compile_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["ddpmpp_narrow", "fmnist_unet"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    common.setup()
    import jax
    from imm_jax.training import augment

    rows = []
    for model in args.models:
        on, batch, compile_on = compiled(config(model, args.batch, 0.12))
        off, _, compile_off = compiled(config(model, args.batch, 0.0))
        for fn in (on, off, on, off):  # warm-up
            fn()
        t_on, t_off = [], []
        for _ in range(args.iters):
            for fn, out in ((on, t_on), (off, t_off)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        alone = {}
        for p in (0.12, 1.0):
            pipe = augment.AugmentPipe(p=p, **augment.EDM_CIFAR_OPS)
            fn = jax.jit(lambda im, k, pipe=pipe: augment.augment(pipe, im, k))
            times = common.time_calls(lambda: jax.block_until_ready(fn(batch["image"], jax.random.key(0))),
                                      args.iters, warmup=2)
            alone[f"augment_only_ms_p{p}"] = 1e3 * statistics.median(times)
        row = dict(model=model, batch=args.batch, step_ms_augment=1e3 * statistics.median(t_on),
                   step_ms_plain=1e3 * statistics.median(t_off), compile_s_augment=compile_on,
                   compile_s_plain=compile_off, **alone)
        row["ratio_augment_over_plain"] = row["step_ms_augment"] / row["step_ms_plain"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=common.machine(), command=" ".join(sys.argv), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
