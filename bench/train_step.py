"""Benchmark: the IMM train step (online pass with gradient + target pass + backward + optimizer + EMA).

    python bench/train_step.py                       # DiT-S/2 (32x32x4) and a narrow DDPM++ (32x32x3), batch 32
    python bench/train_step.py --models dit_s2 --devices 1 8 --out bench/results/train_step.json

For each model: fused vs two-pass online/target forward, on 1 and 8 (fake) CPU devices. Reports images/s,
achieved FLOP/s (XLA cost analysis of the compiled step / measured step time), the ratio to the float32
matmul peak measured in the same process, compile time and XLA's planned peak memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def bench_config(model: str, batch: int, fused: bool):
    from imm_jax import networks
    if model == "dit_s2":
        c = load_config("imagenet256", "variant=S/2")
    elif model == "ddpmpp_narrow":
        c = load_config("cifar10")
        c.model = networks.unet_config(image_size=32, in_channels=3, num_classes=0, model_channels=64,
                                       channel_mult=(1, 2, 2), num_blocks=2, dropout=0.2)
    else:
        raise ValueError(f"unknown model {model!r}; use dit_s2 or ddpmpp_narrow")
    c.data.batch_size = batch
    c.data.source = "synthetic"
    c.imm.fused = fused
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c


def child(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from imm_jax import train

    peak = common.matmul_peak_flops()
    for model in args.models:
        for fused in (False, True):
            config = bench_config(model, args.batch, fused)
            trainer = train.Trainer(config)
            m = config.model
            rng = np.random.default_rng(0)
            batch = {"image": rng.uniform(-1, 1, (args.batch, m.image_size, m.image_size, m.in_channels)
                                          ).astype(np.float32)}
            if m.num_classes:
                batch["label"] = rng.integers(0, m.num_classes, args.batch).astype(np.int32)
            else:
                batch["label"] = np.zeros(args.batch, np.int32)
            batch = jax.device_put(batch, trainer.batch_sharding)
            state = trainer.init()
            t0 = time.perf_counter()
            compiled = trainer.train_step.lower(state, batch).compile()
            compile_s = time.perf_counter() - t0
            holder = [state]

            def run():
                holder[0], metrics = compiled(holder[0], batch)
                jax.block_until_ready(metrics["loss"])

            times = common.time_calls(run, args.iters, warmup=2)
            step_s = common.median(times)
            flops = common.cost_flops(compiled)
            print(json_line(dict(model=model, fused=fused, devices=jax.device_count(), batch=args.batch,
                                 step_ms=1e3 * step_s, img_s=args.batch / step_s, gflop_step=flops / 1e9,
                                 gflop_s=flops / step_s / 1e9, peak_gflop_s=peak / 1e9,
                                 frac_peak=flops / step_s / peak, compile_s=compile_s,
                                 mem_mb=common.memory_bytes(compiled) / 2**20)), flush=True)


def json_line(d):
    import json
    return json.dumps(d)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit_s2", "ddpmpp_narrow"])
    p.add_argument("--devices", nargs="+", type=int, default=[1, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "train_step.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    child_args = ["--models", *args.models, "--batch", str(args.batch), "--iters", str(args.iters)]
    for n in args.devices:
        rows += common.run_child(os.path.abspath(__file__), child_args, n)
    common.print_table(rows, ["model", "fused", "devices", "batch", "step_ms", "img_s", "gflop_step", "gflop_s",
                              "peak_gflop_s", "frac_peak", "compile_s", "mem_mb"])
    import jax
    common.write_json(args.out, dict(machine=common.machine(), command=" ".join(sys.argv), rows=rows))


if __name__ == "__main__":
    main()
