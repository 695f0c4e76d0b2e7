"""Benchmark: imm_jax against PyTorch (eager) on the same DiT, timed interleaved in one process.

    pip install torch==2.13.0                                  # a CPU build; never part of the core install
    python bench/vs_torch.py                                   # DiT-S/2, 32x32x4, batch 32, float32, all parts
    python bench/vs_torch.py --parts forward sample --steps 1 2 --rounds 3

The PyTorch network is bench/torch_dit.py (the same layers and the official parameter names). Before any
timing, its state_dict is converted with `imm_jax.io.convert.convert_state_dict` and both frameworks are
checked to compute the same function: equal parameter counts, the network output and a 2-step guided
sample from the same noise equal to float32 rounding, and the FLOPs of one forward (PyTorch's
FlopCounterMode: matmuls, convolutions and attention; XLA's cost analysis of the plain-JAX program, which
also counts elementwise work).

Parts, each timed as A/B/A/B in rounds (the order alternates per round; the host drifts within minutes):
  forward   one network evaluation of the batch (PyTorch under inference_mode; imm_jax a jitted apply)
  sample    1/2/4/8-step pushforward sampling without and with CFG, noise drawn inside the timed call
            (PyTorch: a Python loop over steps; imm_jax: `api.Sampler.generate`, one compiled program)
  train     the IMM train step of configs/imagenet256.py (M = 4, k = 12): online pass with gradient,
            target pass without, grouped Laplace MMD, backward, AdamW, two EMAs (imm_jax: `train.Trainer`)
Ratio = PyTorch time / imm_jax time: above 1, imm_jax is faster. Both use --threads threads (XLA:CPU uses
every core of the process's affinity; keep --threads equal to it).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PARTS = ("forward", "sample", "train")
SWITCH_PAUSE_S = 0.5  # lets the other framework's worker threads stop spinning before a timed call


def build(args):
    import jax
    import torch
    import torch_dit
    from imm_jax.io import convert
    from imm_jax.networks import dit
    from imm_jax.training import train

    config = common.load_config("imagenet256", f"variant={args.variant}")
    config.data.source = "synthetic"
    config.data.batch_size = args.batch
    config.mesh.data, config.mesh.fsdp = -1, 1
    dims = dit.resolve_dims(config.model)
    torch.manual_seed(0)
    tnet = torch_dit.DiT(image_size=32, in_channels=4, num_classes=1000, **dims).eval()
    state = {k: v.detach().numpy() for k, v in tnet.state_dict().items()}
    params = jax.tree.map(jax.numpy.asarray, convert.convert_state_dict(state, config.model))
    jnet = train.build_network(config)
    return config, tnet, jnet, params


def check_same(config, tnet, jnet, params, batch: int) -> dict:
    """Parameter counts, FLOPs per forward, and output agreement of the two implementations."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch_dit
    from torch.utils.flop_counter import FlopCounterMode
    from imm_jax import networks
    from imm_jax.core import sampling
    from imm_jax.core.losses import IMMObjective

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 4)).astype(np.float32)
    t = rng.uniform(0, 994, batch).astype(np.float32)
    s = (t * rng.uniform(0, 1, batch)).astype(np.float32)
    y = rng.integers(0, 1001, batch).astype(np.int32)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    nchw = lambda a: to_t(a.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        g_torch = tnet(nchw(x), to_t(t), to_t(s), to_t(y).long()).numpy().transpose(0, 2, 3, 1)
    fwd = jax.jit(lambda p, *a: jnet.apply({"params": p}, *a))
    g_jax = np.asarray(fwd(params, x, t, s, y))
    scale = float(np.max(np.abs(g_torch)))

    # A 2-step guided pushforward from the same initial noise.
    obj = IMMObjective.from_config(config.imm, num_classes=1000)
    grid = np.asarray(torch_dit.uniform_grid(2), np.float32)
    labels = y % 1000
    x0 = (0.5 * x).astype(np.float32)
    fn = lambda xx, ti, si, lab: jnet.apply({"params": params}, xx, ti, si, lab)
    f = lambda xx, ss, tt: obj.param.apply(fn, xx, ss, tt, jnp.asarray(labels), cfg_scale=1.5, null_label=1000)
    x_jax = np.asarray(jax.jit(lambda v: sampling.pushforward(f, v, grid))(x0))
    x_torch = torch_dit.pushforward(tnet, nchw(x0), list(grid), to_t(labels).long(), 1.5)
    x_torch = x_torch.numpy().transpose(0, 2, 3, 1)

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        tnet(nchw(x), to_t(t), to_t(s), to_t(y).long())
    plain_net = networks.build(config.model, backend="plain")
    compiled = jax.jit(lambda p, *a: plain_net.apply({"params": p}, *a)).lower(params, x, t, s, y).compile()
    n_torch = sum(p.numel() for p in tnet.parameters())
    n_jax = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return dict(params_torch=n_torch, params_jax=n_jax,
                gflop_forward_torch=counter.get_total_flops() / 1e9,
                gflop_forward_xla=common.cost_flops(compiled) / 1e9,
                forward_max_abs_diff=float(np.max(np.abs(g_torch - g_jax))), forward_max_abs=scale,
                sample_2step_cfg_max_abs_diff=float(np.max(np.abs(x_torch - x_jax))),
                sample_max_abs=float(np.max(np.abs(x_jax))))


def contenders(args, config, tnet, jnet, params):
    """{name: (torch_fn, jax_fn)}; each fn runs one call and blocks until it is done."""
    import jax
    import numpy as np
    import torch
    import torch_dit
    from imm_jax.inference import api

    b = args.batch
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, 32, 32, 4)).astype(np.float32)
    t = np.full((b,), 700.0, np.float32)
    s = np.full((b,), 300.0, np.float32)
    labels = (np.arange(b) % 1000).astype(np.int32)
    tx, tt, ts, ty = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                      torch.from_numpy(s), torch.from_numpy(labels).long())
    out = {}
    if "forward" in args.parts:
        fwd = jax.jit(lambda p, *a: jnet.apply({"params": p}, *a))
        jx = jax.device_put((x, t, s, labels))

        def torch_forward():
            with torch.inference_mode():
                tnet(tx, tt, ts, ty)

        out["forward"] = (torch_forward, lambda: jax.block_until_ready(fwd(params, *jx)))
    if "sample" in args.parts:
        sampler = api.Sampler(config, params)
        for cfg in (None, args.cfg):
            for steps in args.steps:
                grid = torch_dit.uniform_grid(steps)

                def torch_sample(grid=grid, cfg=cfg):
                    noise = torch_dit.SIGMA_D * torch.randn(b, 4, 32, 32)
                    torch_dit.pushforward(tnet, noise, grid, ty, cfg)

                def jax_sample(steps=steps, cfg=cfg):
                    jax.block_until_ready(sampler.generate(jax.random.key(2), labels, steps=steps, cfg_scale=cfg))

                out[f"sample {steps} step{'s' if steps > 1 else ''}" + (f", CFG {cfg}" if cfg else "")] = (
                    torch_sample, jax_sample)
    if "train" in args.parts:
        import train_step as jax_train
        run, _, _ = jax_train.compiled_step("dit_s2", b, False)  # main() allows the train part for S/2 only
        tnet_train = copy.deepcopy(tnet).train()
        step = torch_dit.IMMStep(tnet_train, particles=int(config.imm.particles), k=int(config.imm.k))
        xb = torch.from_numpy(rng.uniform(-1, 1, (b, 4, 32, 32)).astype(np.float32))
        yb = torch.from_numpy(rng.integers(0, 1000, b)).long()
        out["train step"] = (lambda: step(xb, yb), run)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="S/2", help="DiT variant (the train part supports S/2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=3, help="timed A/B pairs per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed A/B pairs first (after imm_jax's compiling call)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "vs_torch.json"))
    args = p.parse_args()
    if "train" in args.parts and args.variant != "S/2":
        p.error("--parts train times the DiT-S/2 step of bench/train_step.py; use --variant S/2")
    try:
        import torch
    except ImportError:
        sys.exit("bench/vs_torch.py needs PyTorch: pip install torch==2.13.0 (a CPU build)")
    torch.set_num_threads(args.threads)
    common.setup()
    import jax

    config, tnet, jnet, params = build(args)
    same = check_same(config, tnet, jnet, params, batch=4)
    print("same function:", same, flush=True)
    if (same["params_torch"] != same["params_jax"]
            or same["forward_max_abs_diff"] > 1e-4 * max(1.0, same["forward_max_abs"])
            or same["sample_2step_cfg_max_abs_diff"] > 1e-4 * max(1.0, same["sample_max_abs"])):
        sys.exit(f"the two implementations differ ({same}): not timing them")

    rows = []
    for name, (torch_fn, jax_fn) in contenders(args, config, tnet, jnet, params).items():
        times = {"torch": [], "jax": []}
        t0 = time.perf_counter()
        jax_fn()
        compile_s = time.perf_counter() - t0
        for r in range(args.warmup + args.rounds):
            order = (("torch", torch_fn), ("jax", jax_fn)) if r % 2 == 0 else (("jax", jax_fn), ("torch", torch_fn))
            for who, fn in order:
                time.sleep(SWITCH_PAUSE_S)
                t0 = time.perf_counter()
                fn()
                if r >= args.warmup:
                    times[who].append(time.perf_counter() - t0)
        tm, jm = common.median(times["torch"]), common.median(times["jax"])
        row = dict(part=name, batch=args.batch, torch_s=tm, jax_s=jm, ratio=tm / jm,
                   torch_ms_per_image=1e3 * tm / args.batch, jax_ms_per_image=1e3 * jm / args.batch,
                   jax_first_call_s=compile_s, torch_times_s=[round(v, 3) for v in times["torch"]],
                   jax_times_s=[round(v, 3) for v in times["jax"]])
        rows.append(row)
        print(f"{name}: PyTorch {tm:.3f} s, imm_jax {jm:.3f} s, ratio {tm / jm:.2f}", flush=True)
    common.print_table(rows, ["part", "batch", "torch_s", "jax_s", "ratio", "torch_ms_per_image",
                              "jax_ms_per_image", "jax_first_call_s"])
    common.write_json(args.out, dict(machine=common.machine(), command=" ".join(sys.argv), threads=args.threads,
                                     torch=torch.__version__, jax=jax.__version__, same_function=same, rows=rows))


if __name__ == "__main__":
    main()
