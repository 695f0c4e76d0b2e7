#!/usr/bin/env bash
# Every benchmark of docs/PERFORMANCE.md, in the order and with the arguments used there.
# Writes bench/results/*.json; `python bench/report.py` renders them as Markdown. ~15-20 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/train_step.py --models dit_s2 ddpmpp_narrow --devices 1 8 --fused 0 1 --iters 2 --warmup 2
python bench/profile_step.py --model dit_s2 --batch 32 --iters 2 --out bench/results/profile_step.json
python bench/trace_step.py --model dit_s2
python bench/sampling.py --batch 16 --steps 1 2 4 8 --iters 1
python bench/fid_features.py --batch 32 --batches 2
python bench/report.py
