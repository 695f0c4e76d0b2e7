"""Benchmark: the IMM train step (online pass with gradient + target pass + backward + optimizer + EMA).

    python bench/train_step.py                       # DiT-S/2 (32x32x4) and a narrow DDPM++ (32x32x3), batch 32
    python bench/train_step.py --models dit_s2 --devices 1 8 --out bench/results/train_step.json

For each model: fused vs two-pass online/target forward, on 1 and 8 (fake) CPU devices. Reports images/s,
achieved FLOP/s (XLA cost analysis of the compiled step / measured step time; with the CPU attention kernel,
of the same step compiled with plain-JAX attention, as the analysis does not count custom calls), the ratio
to the float32 matmul peak measured in the same process (frac_peak: median step against the best-of-10 peak
measured after the steps; frac_peak_interleaved: median over steps of each step against the peak measured
right before and after it), compile time and XLA's planned peak memory per device (arguments + outputs +
temporaries).
"""
from __future__ import annotations

import argparse
import resource
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# Printed table columns (bench/report.py adds the getrusage ones).
COLUMNS = ["model", "fused", "devices", "cpu_kernels", "batch", "step_ms", "best_ms", "img_s", "gflop_step",
           "gflop_s", "peak_gflop_s", "frac_peak", "frac_peak_best", "frac_peak_interleaved", "frac_peak_useful",
           "compile_s", "mem_mb_per_device"]


def bench_config(model: str, batch: int, fused: bool):
    from imm_jax import networks
    if model == "dit_s2":
        c = common.load_config("imagenet256", "variant=S/2")
    elif model == "ddpmpp_narrow":
        c = common.load_config("cifar10", "augment=0")  # the network's step (bench/augment_cost.py: with it)
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


def compiled_step(model: str, batch_size: int, fused: bool):
    """The model's compiled IMM train step on a fixed random batch (1 CPU device or the fake-device mesh).

    Returns (run, compiled, compile_s): run() performs one step on the held state and waits for it.
    """
    import jax
    import numpy as np
    from imm_jax.training import train

    config = bench_config(model, batch_size, fused)
    trainer = train.Trainer(config)
    m = config.model
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (batch_size, m.image_size, m.image_size, m.in_channels)).astype(np.float32)}
    if m.num_classes:
        batch["label"] = rng.integers(0, m.num_classes, batch_size).astype(np.int32)
    else:
        batch["label"] = np.zeros(batch_size, np.int32)
    batch = jax.device_put(batch, trainer.batch_sharding)
    state = trainer.init()
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    return run, compiled, compile_s


def timed_steps_with_peak(run, iters: int):
    """Times `iters` calls of run(), measuring the matmul peak (best of 5) before each call and after the last.

    Returns (step seconds, iters + 1 peaks in FLOP/s, getrusage deltas per step over the steps only).
    The host's speed drifts by +-10% within minutes, so each step is compared with the peak around it.
    """
    times, peaks = [], [common.matmul_peak_flops(iters=5)]
    user = sys_s = faults = 0.0
    for _ in range(iters):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user += r1.ru_utime - r0.ru_utime
        sys_s += r1.ru_stime - r0.ru_stime
        faults += r1.ru_minflt - r0.ru_minflt
        peaks.append(common.matmul_peak_flops(iters=5))
    usage = dict(user_s_per_step=user / iters, sys_s_per_step=sys_s / iters, page_faults_per_step=int(faults) // iters)
    return times, peaks, usage


def child(args):
    common.setup()
    import jax

    for model in args.models:
        for fused in args.fused:
            run, compiled, compile_s = compiled_step(model, args.batch, bool(fused))
            for _ in range(args.warmup):
                run()
            times, peaks, usage = timed_steps_with_peak(run, args.iters)
            # The peak is also measured once more after the steps (best of 10), as in earlier runs.
            peak = common.matmul_peak_flops()
            step_s, best_s = common.median(times), min(times)
            # XLA's cost analysis of an SPMD program counts one partition: scale to the whole step.
            flops, kernels = common.model_flops(compiled, lambda: compiled_step(model, args.batch, bool(fused))[1])
            flops *= jax.device_count()
            # Per step against the mean of the peaks measured right before and right after it.
            fracs = [flops / t / ((a + b) / 2) for t, a, b in zip(times, peaks, peaks[1:])]
            print(json_line(dict(model=model, fused=bool(fused), devices=jax.device_count(), batch=args.batch,
                                 cpu_kernels="+".join(kernels) or "none",
                                 step_ms=1e3 * step_s, best_ms=1e3 * best_s, img_s=args.batch / step_s,
                                 gflop_step=flops / 1e9, gflop_s=flops / step_s / 1e9, peak_gflop_s=peak / 1e9,
                                 frac_peak=flops / step_s / peak, frac_peak_best=flops / best_s / peak,
                                 frac_peak_interleaved=common.median(fracs),
                                 peaks_interleaved_gflop_s=[round(x / 1e9, 1) for x in peaks],
                                 compile_s=compile_s, mem_mb_per_device=common.memory_bytes(compiled) / 2**20,
                                 times_ms=[round(1e3 * t, 1) for t in times], **usage)), flush=True)


def json_line(d):
    import json
    return json.dumps(d)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit_s2", "ddpmpp_narrow"])
    p.add_argument("--devices", nargs="+", type=int, default=[1, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fused", nargs="+", type=int, default=[0, 1], help="1: fused online/target pass, 0: two-pass")
    p.add_argument("--iters", type=int, default=3, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "train_step.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    child_args = ["--models", *args.models, "--batch", str(args.batch), "--iters", str(args.iters),
                  "--warmup", str(args.warmup), "--fused", *map(str, args.fused)]
    for n in args.devices:
        rows += common.run_child(os.path.abspath(__file__), child_args, n)
    # Fused steps also compute weight gradients for the (zero-cotangent) target half, so XLA counts more
    # FLOPs for the same work; frac_peak_useful uses the two-pass FLOP count of the same model.
    useful = {(r["model"], r["devices"]): r["gflop_step"] for r in rows if not r["fused"]}
    for r in rows:
        u = useful.get((r["model"], r["devices"]))
        if u is not None:
            r["frac_peak_useful"] = u / (r["step_ms"] / 1e3) / r["peak_gflop_s"]
    common.print_table(rows, COLUMNS)
    common.write_json(args.out, dict(machine=common.machine(), command=" ".join(sys.argv), rows=rows))


if __name__ == "__main__":
    main()
