"""Loss curve per training run (metrics.jsonl) as PNG: one file per run.

    python bench/plot_losses.py --out docs/img --run imm_m4=runs/repro/imm_m4 --run fm=runs/repro/fm

Needs matplotlib (pip install matplotlib); not a dependency of the package.
"""
from __future__ import annotations

import argparse
import json
import os


def read_losses(workdir: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    return steps, losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="NAME=WORKDIR")
    p.add_argument("--out", required=True, help="output directory for loss_<NAME>.png")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.out, exist_ok=True)
    for spec in args.run:
        name, workdir = spec.split("=", 1)
        steps, losses = read_losses(workdir)
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, losses, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("training step (batch 64)")
        ax.set_ylabel("training loss (log)")
        ax.set_title(f"{name}: {os.path.basename(os.path.normpath(workdir))}")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path = os.path.join(args.out, f"loss_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
