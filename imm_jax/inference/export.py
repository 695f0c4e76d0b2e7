"""Write many samples to disk: a PNG grid and an ADM-evaluator `.npz` (`arr_0` uint8 NHWC, `arr_1` labels).

    python -m imm_jax.main --mode=sample --workdir=runs/fmnist --num_samples=50000 --steps=2

Work is split into chunks saved as `<out>/chunks/NNNNN.npz`; an interrupted run picks up at the first
missing chunk and produces exactly the samples an uninterrupted run would have (sample i depends only on
seed, i and the batch size).
"""
from __future__ import annotations

import glob
import os
import sys
import time
from typing import Optional

import numpy as np

from imm_jax.inference import api
from imm_jax.io import images


def export_samples(checkpoint: str, out_dir: str, num_samples: int, *, chunk_size: int = 1000,
                   batch_size: Optional[int] = None, grid_size: int = 64, sampler_obj=None,
                   **sample_kwargs) -> str:
    """Sample `num_samples` images into `<out_dir>/samples.npz` (+ grid.png); returns the .npz path.

    sample_kwargs go to `Sampler.__call__` (steps, preset, grid, mid_etas, cfg_scale, labels, seed, sampler).
    chunk_size must be a multiple of the batch size so chunks resume on batch boundaries.
    """
    s = sampler_obj or api.load(checkpoint)
    bs = int(batch_size or min(chunk_size, 256))
    if chunk_size % bs:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of batch_size ({bs}).")
    chunk_dir = os.path.join(out_dir, "chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    labels = sample_kwargs.pop("labels", None)
    if labels is not None:
        labels = np.broadcast_to(np.asarray(labels, np.int32), (num_samples,))
    n_chunks = -(-num_samples // chunk_size)
    t0, made = time.time(), 0
    for c in range(n_chunks):
        path = os.path.join(chunk_dir, f"{c:05d}.npz")
        if os.path.exists(path):
            continue
        start = c * chunk_size
        n = min(chunk_size, num_samples - start)
        chunk_labels = None if labels is None else labels[start:start + n]
        imgs, lab = s(n, start=start, batch_size=bs, labels=chunk_labels, return_labels=True, **sample_kwargs)
        tmp = path + ".tmp.npz"
        np.savez(tmp, arr_0=imgs, arr_1=lab)
        os.replace(tmp, path)  # a chunk exists only once it is complete
        made += n
        rate = made / max(time.time() - t0, 1e-9)
        print(f"chunk {c + 1}/{n_chunks}: {start + n}/{num_samples} samples ({rate:.1f} img/s)",
              file=sys.stderr, flush=True)
    parts = [np.load(p) for p in sorted(glob.glob(os.path.join(chunk_dir, "*.npz")))[:n_chunks]]
    arr = np.concatenate([p["arr_0"] for p in parts])[:num_samples]
    lab = np.concatenate([p["arr_1"] for p in parts])[:num_samples]
    out = os.path.join(out_dir, "samples.npz")
    np.savez(out, arr_0=arr, arr_1=lab)
    images.save_png(os.path.join(out_dir, "grid.png"), images.make_grid(arr[:grid_size]))
    return out

