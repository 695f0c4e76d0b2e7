#!/usr/bin/env bash
# Every benchmark of docs/PERFORMANCE.md, with the arguments used there (run on an idle machine).
# Writes bench/results/*.json; `python bench/report.py` renders them as Markdown. ~20-30 min on 2 cores
# (+ ~20 min for bench/vs_torch.py where torch is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/train_step.py --models dit_s2 --devices 1 --fused 0 --iters 5 --warmup 2 --out bench/results/train_step_dit_s2.json
IMM_JAX_CPU_DENSE=0 python bench/train_step.py --models dit_s2 --devices 1 --fused 0 --iters 5 --warmup 2 \
    --out bench/results/train_step_dit_s2_dense_off.json
python bench/train_step.py --models ddpmpp_narrow --devices 1 --fused 0 --iters 3 --warmup 2 --out bench/results/train_step_ddpmpp_narrow.json
python bench/train_step.py --models dit_s2 ddpmpp_narrow --devices 8 --fused 0 --iters 2 --warmup 2 --out bench/results/train_step_8dev.json
python bench/trace_step.py --model dit_s2 --out bench/results/trace_step.json
python bench/sampling.py --batch 16 --steps 1 2 4 8 --iters 1 --out bench/results/sampling.json
python bench/fid_features.py --batch 32 --batches 2 --out bench/results/fid_features.json
IMM_JAX_CPU_DENSE=0 python bench/fid_features.py --batch 32 --batches 2 --out bench/results/fid_features_dense_off.json
if python -c "import torch" 2>/dev/null; then python bench/vs_torch.py --out bench/results/vs_torch.json; fi
python bench/report.py
