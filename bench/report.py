"""Render bench/results/*.json (written by the bench scripts) as Markdown tables for docs/PERFORMANCE.md.

    python bench/report.py [--results bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import train_step  # noqa: E402

_STEP = train_step.COLUMNS + ["user_s_per_step", "sys_s_per_step", "page_faults_per_step"]
_FID = ["input", "batch", "devices", "batch_s", "img_s", "gflop_img", "gflop_s", "frac_peak", "first_call_s"]
TABLES = {
    "train_step_dit_s2.json": _STEP,
    "train_step_dit_s2_dense_off.json": _STEP,
    "train_step_ddpmpp_narrow.json": _STEP,
    "train_step_8dev.json": _STEP,
    "profile_step.json": ["part", "ms", "gflop", "gflop_s", "frac_peak", "compile_s"],
    "trace_step.json": ["direction", "layer", "kind", "ms", "share", "ops", "gflop", "gflop_s"],
    "sampling.json": ["model", "steps", "cfg", "batch", "devices", "nfe_per_image", "batch_s", "img_s",
                      "ms_per_nfe_img", "first_call_s"],
    "fid_features.json": _FID,
    "fid_features_dense_off.json": _FID,
}


def markdown(rows, columns) -> str:
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(common._fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(common.ROOT, "bench", "results"))
    args = p.parse_args()
    for name, columns in TABLES.items():
        path = os.path.join(args.results, name)
        if not os.path.exists(path):
            continue
        data = json.load(open(path))
        m = data["machine"]
        print(f"### {name}\n\n`{data['command']}` — {m['cpu']}, {m['cores']} cores, jax {m['jax']}, {m['date']}\n")
        print(markdown(data["rows"], columns) + "\n")


if __name__ == "__main__":
    main()
