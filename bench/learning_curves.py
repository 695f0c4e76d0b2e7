"""FID learning curves of training runs (the in-training FID in metrics.jsonl) against training images seen.

    python bench/learning_curves.py --out docs/img/study/curves.png --json bench/results/study_curves.json \
        --run "IMM M=4=/work/runs/study/imm_m4" --run "flow matching=/work/runs/study/fm"

One panel per sampling step count found (fid_<N>step), one line per run; runs labelled "METHOD, seed N" share
METHOD's colour and differ in line style. A run can also be read back from a JSON this script wrote
(`--run "LABEL=bench/results/study_curves.json#KEY"`), for runs whose directories are gone. A resumed run can hold a step twice
in metrics.jsonl (the steps between its last checkpoint and the interruption are trained again); the last
line of each step wins, which is the value the surviving trajectory produced. Images seen = step x batch
(config.json of the run). Needs matplotlib for the PNG (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import re

FID_KEY = re.compile(r"^fid_(\d+)step$")


def read_run(workdir: str) -> dict:
    """{"batch": B, "fid": {N: [(step, fid), ...] sorted by step}, "train_seconds": ...} of one run."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    batch = int(config["data"]["batch_size"])
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                m = FID_KEY.match(key)
                if m:
                    rows.setdefault(int(m.group(1)), {})[int(row["step"])] = float(value)
    return {"batch": batch, "fid": {n: sorted(v.items()) for n, v in sorted(rows.items())}}


def read_json_run(spec: str) -> dict:
    """A run from the --json output of an earlier invocation: spec = FILE#KEY."""
    path, key = spec.split("#", 1)
    with open(path) as f:
        r = json.load(f)[key]
    return {"workdir": r["workdir"], "batch": int(r["batch"]),
            "fid": {int(n): [tuple(p) for p in pts] for n, pts in sorted(r["fid"].items(), key=lambda i: int(i[0]))}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="LABEL=WORKDIR or LABEL=RESULTS.json#KEY (LABEL may contain '=')")
    p.add_argument("--out", default="", help="PNG path")
    p.add_argument("--json", default="", help="write the curves as JSON here")
    p.add_argument("--title", default="FID (in-training) vs training images seen")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        if ".json#" in spec:  # the KEY may hold '=' too
            head, key = spec.split(".json#", 1)
            label, path = head.rsplit("=", 1)
            runs[label] = read_json_run(f"{path}.json#{key}")
        else:
            label, workdir = spec.rsplit("=", 1)
            runs[label] = {"workdir": workdir, **read_run(workdir)}
    for label, r in runs.items():
        for n, pts in r["fid"].items():
            last = pts[-1]
            print(f"{label}: {n} step(s): {len(pts)} points, last step {last[0]} "
                  f"({last[0] * r['batch'] / 1e3:.0f}k images) FID {last[1]:.1f}; best {min(v for _, v in pts):.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({label: {"workdir": r["workdir"], "batch": r["batch"],
                               "fid": {str(n): pts for n, pts in r["fid"].items()}}
                       for label, r in runs.items()}, f, indent=1)
    if args.out:
        plot(runs, args.out, args.title)
        print(args.out)


def plot(runs: dict, out: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = sorted({n for r in runs.values() for n in r["fid"]})
    fig, axes = plt.subplots(1, len(counts), figsize=(3.6 * len(counts), 3.4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], counts):
        methods, repeats = [], {}
        for label, r in runs.items():
            method = label.split(", seed")[0]
            if method not in methods:
                methods.append(method)
            style = ("-", "--", ":", "-.")[repeats.setdefault(method, 0) % 4]
            repeats[method] += 1
            pts = r["fid"].get(n)
            if pts:
                ax.plot([s * r["batch"] / 1e3 for s, _ in pts], [v for _, v in pts], "o" + style, ms=3, lw=1.3,
                        color=f"C{methods.index(method)}", label=label)
        ax.set_title(f"{n} step{'s' * (n > 1)}")
        ax.set_xlabel("training images seen (thousands)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FID")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
