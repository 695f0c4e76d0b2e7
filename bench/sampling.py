"""Benchmark: few-step IMM sampling through `imm_jax.inference.api.Sampler`, images/s with and without CFG.

    python bench/sampling.py                                   # DiT-S/2 (32x32x4 latents), batch 16, 1/2/4/8 steps
    python bench/sampling.py --batch 32 --steps 1 2 --out bench/results/sampling.json

The network is a randomly initialised class-conditional DiT-S/2 (speed does not depend on the weights),
given to `api.Sampler(config, params)` directly (or saved with `checkpointing.save_for_sampling` and
restored with `Sampler.from_checkpoint` when --via-checkpoint is set). Times cover the whole compiled
sampling program (noise -> model-space latents), not the SD-VAE decode. CFG doubles the network batch
(conditional + unconditional) at every step. The first call of each program is compilation and is
reported separately.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="S/2", help="DiT variant of configs/imagenet256.py")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--cfg", type=float, default=1.5, help="CFG scale of the guided runs")
    p.add_argument("--iters", type=int, default=2, help="timed calls per setting (after the compiling call)")
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices (batch is split over them)")
    p.add_argument("--via-checkpoint", action="store_true",
                   help="round-trip the params through save_for_sampling / Sampler.from_checkpoint")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "sampling.json"))
    args = p.parse_args()
    common.setup(args.devices)
    import jax
    import numpy as np
    from imm_jax.inference import api
    from imm_jax.training import checkpointing, train

    config = common.load_config("imagenet256", f"variant={args.variant}")
    config.data.source = "synthetic"
    params = train.init_params(train.build_network(config), config, jax.random.key(0))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    if args.via_checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            checkpointing.save_for_sampling(tmp, params, config)
            sampler = api.Sampler.from_checkpoint(tmp)
    else:
        sampler = api.Sampler(config, params)
    labels = np.arange(args.batch, dtype=np.int32) % config.model.num_classes
    rows = []
    for guided in (False, True):
        for steps in args.steps:
            kw = dict(steps=steps, cfg_scale=args.cfg if guided else None)
            t0 = time.perf_counter()
            jax.block_until_ready(sampler.generate(jax.random.key(1), labels, **kw))
            first_s = time.perf_counter() - t0
            times = common.time_calls(
                lambda: jax.block_until_ready(sampler.generate(jax.random.key(2), labels, **kw)),
                args.iters, warmup=0)
            t = common.median(times)
            nfe = steps * (2 if guided else 1)
            row = dict(model=f"DiT-{args.variant}", steps=steps, cfg=args.cfg if guided else None,
                       batch=args.batch, devices=jax.device_count(), nfe_per_image=nfe,
                       batch_s=t, img_s=args.batch / t, ms_per_nfe_img=1e3 * t / (args.batch * nfe),
                       first_call_s=first_s)
            rows.append(row)
            print(f"steps={steps} cfg={row['cfg']}: {row['img_s']:.2f} img/s", flush=True)
    common.print_table(rows, ["model", "steps", "cfg", "batch", "devices", "nfe_per_image", "batch_s", "img_s",
                              "ms_per_nfe_img", "first_call_s"])
    common.write_json(args.out, dict(machine=common.machine(), command=" ".join(sys.argv), params=n_params,
                                     rows=rows))


if __name__ == "__main__":
    main()
