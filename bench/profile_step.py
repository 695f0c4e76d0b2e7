"""Where the IMM train step spends its time: forward, forward+backward, MMD, optimizer, full step.

    python bench/profile_step.py --model dit_s2 --batch 32 --iters 3

Each part is jitted and timed on its own (1 CPU device); FLOPs from XLA's cost analysis; fraction of the
float32 matmul peak measured in the same process. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(name, fn, args, iters, peak, rows):
    import jax
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = common.time_calls(lambda: jax.block_until_ready(compiled(*args)), iters, warmup=1)
    step = min(times)
    flops, _ = common.model_flops(compiled, lambda: jax.jit(lambda *a: fn(*a)).lower(*args).compile())
    row = dict(part=name, ms=1e3 * step, gflop=flops / 1e9, gflop_s=flops / step / 1e9,
               frac_peak=flops / step / peak, compile_s=compile_s)
    rows.append(row)
    print(json.dumps(row), flush=True)
    return compiled


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit_s2", choices=["dit_s2", "ddpmpp_narrow"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["fwd", "fwdbwd", "mmd", "opt", "step"])
    p.add_argument("--fused", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    common.setup(1)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import train_step as ts_bench
    from imm_jax.core import mmd
    from imm_jax.training import train

    peak = common.matmul_peak_flops()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    config = ts_bench.bench_config(args.model, args.batch, args.fused)
    trainer = train.Trainer(config)
    net, m = trainer.net, config.model
    state = trainer.init()
    params = state.params
    b = args.batch
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, m.image_size, m.image_size, m.in_channels)).astype(np.float32))
    t = jnp.asarray(rng.uniform(0, 1000, b).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, max(m.num_classes, 1), b).astype(np.int32)) if m.num_classes else None
    rows = []

    def fwd(params, x, t):
        return net.apply({"params": params}, x, t, t, labels=labels, train=True,
                         rngs={"dropout": jax.random.key(0)})

    if "fwd" in args.parts:
        timed("forward", fwd, (params, x, t), args.iters, peak, rows)
    if "fwdbwd" in args.parts:
        def fb(params, x, t):
            return jax.grad(lambda p: jnp.mean(fwd(p, x, t) * x))(params)
        timed("forward+backward", fb, (params, x, t), args.iters, peak, rows)
    if "mmd" in args.parts:
        g, mm = b // config.imm.particles, config.imm.particles
        yt = x.reshape((g, mm) + x.shape[1:])
        yr = yt + 0.01

        def mmd_fb(yt, yr):
            f = lambda a: jnp.mean(mmd.grouped_mmd(a, yr, kernel_weight=jnp.ones((g,)), kernel="laplace"))
            return jax.value_and_grad(f)(yt)
        timed("mmd fwd+bwd", mmd_fb, (yt, yr), args.iters, peak, rows)
    if "opt" in args.parts:
        def opt(state):
            grads = jax.tree.map(jnp.ones_like, state.params)
            updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
            import optax
            return optax.apply_updates(state.params, updates), opt_state
        timed("optimizer", opt, (state,), args.iters, peak, rows)
    if "step" in args.parts:
        batch = {"image": x, "label": labels if labels is not None else jnp.zeros((b,), jnp.int32)}
        def step(params, batch, key):
            return jax.value_and_grad(trainer.loss_fn, has_aux=True)(params, batch, key)
        timed("loss value_and_grad", step, (params, batch, jax.random.key(1)), args.iters, peak, rows)
    common.print_table(rows, ["part", "ms", "gflop", "gflop_s", "frac_peak", "compile_s"])
    if args.out:
        common.write_json(args.out, dict(machine=common.machine(), command=" ".join(sys.argv),
                                         peak_gflop_s=peak / 1e9, rows=rows))


if __name__ == "__main__":
    main()
