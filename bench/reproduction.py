"""FID of trained runs at several step counts (the CPU-scale reproduction, docs/RESULTS.md).

    python bench/reproduction.py --ref REF_STATS.npz --out bench/results/reproduction.json \\
        --run imm_m4=runs/repro/imm_m4:1,2,4,8 --run fm=runs/repro/fm:1,2,4,8,32,128 \\
        --tuned-run fm_tuned=runs/repro/fm:3,4,6,8

`--tuned-run` samples with the tuned time embeddings saved beside the checkpoint (`imm_jax.inference.tuning`, issue 8)
for each step count (an error if a step count has no tuned set) and records the tuning's cost and losses.

Each run's checkpoint is sampled with `imm_jax.load` (the config's sampler: pushforward for IMM, Euler for
flow matching; its CFG scale; the sampling EMA unless --ema; the config's time grid unless --grid, with
--mid-etas for grid "etas"), N samples with --seed (default 0) and uniform random labels, and
compared with the reference statistics (`python -m imm_jax.evaluation stats`). Results are appended to the
JSON file as they finish; entries already there (same name, steps and seed) are skipped, so an interrupted
run resumes. Use a different NAME for each grid or EMA of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="NAME=WORKDIR:STEPS[,STEPS...]")
    p.add_argument("--tuned-run", action="append", default=[],
                   help="NAME=WORKDIR:STEPS[,STEPS...], sampled with the tuned time embeddings")
    p.add_argument("--ref", required=True, help="reference statistics .npz")
    p.add_argument("--out", required=True, help="results JSON (appended to, resumable)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=None, help="EMA decay to sample with (default: the config's)")
    p.add_argument("--grid", default=None, help="time grid: uniform, edm or etas (default: the config's)")
    p.add_argument("--mid-etas", type=float, nargs="*", default=None, help="mid-point etas for --grid etas")
    args = p.parse_args(argv)

    import imm_jax
    from imm_jax.evaluation.features import FeatureExtractor
    from imm_jax.evaluation.metrics import FIDEvaluator

    results, commands = [], []
    if os.path.isfile(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        results = previous["rows"]
        commands = previous.get("commands") or [previous["command"]]
    commands.append(" ".join(sys.argv))
    done = {(r["run"], r["steps"], r.get("seed", 0)) for r in results}
    evaluator = FIDEvaluator(args.ref, extractor=FeatureExtractor(batch_size=100))
    specs = [(s, False) for s in args.run] + [(s, True) for s in args.tuned_run]
    for spec, tuned in specs:
        name, rest = spec.split("=", 1)
        workdir, steps_list = rest.rsplit(":", 1)
        sampler = imm_jax.load(workdir, tuned=tuned, ema=args.ema)
        for steps in (int(s) for s in steps_list.split(",")):
            if (name, steps, args.seed) in done:
                continue
            t0 = time.time()
            grid_opts = {} if args.grid is None else {"grid": args.grid}
            if args.grid == "etas":
                grid_opts["mid_etas"] = tuple(args.mid_etas or ())
            imgs = sampler(args.num_samples, steps=steps, seed=args.seed, batch_size=args.batch_size,
                           tuned=tuned, **grid_opts)
            t_sample = time.time() - t0
            fid = evaluator(imgs)["fid"]
            row = dict(run=name, workdir=workdir, steps=steps, sampler=sampler.check_sampler(None),
                       cfg_scale=sampler.config.sample.cfg_scale, ema=sampler.ema, n=args.num_samples,
                       seed=args.seed, grid=args.grid or sampler.config.sample.grid, fid=fid,
                       sample_s=round(t_sample, 1),
                       fid_s=round(time.time() - t0 - t_sample, 1), tuned=tuned)
            if tuned:
                meta = sampler.tuned_for(steps).meta
                row["tuning"] = {k: meta[k] for k in (
                    "teacher", "teacher_steps", "loss", "lr", "num_steps", "batch_size", "num_trajectories",
                    "num_eval", "seed", "eval_loss_before", "eval_loss_after", "reference_seconds",
                    "tune_seconds", "total_seconds")}
            results.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump({"commands": commands, "ref": args.ref, "rows": results}, f, indent=1)


if __name__ == "__main__":
    from imm_jax.kernels import host_memory
    host_memory.keep_freed_memory()
    main()
