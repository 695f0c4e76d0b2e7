"""Tuned time embeddings as stored beside a checkpoint: what `imm_jax.inference.tuning` makes and `imm_jax.inference.api` samples with.

A set holds, for one sampler and time grid, one conditioning vector per sampling step and per network layer
(`TunedVectors`); `save` / `load` / `load_all` keep them in the checkpoint's step directory under tuned/<name>,
and `select` picks the set made for a (sampler, grid).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass
class TunedVectors:
    """Tuned conditioning for one (sampler, grid), plus how it was made (`meta`).

    offsets: (N, L, D) float32 delta, what the sampler adds to the model's time part (`cond_offset`).
    vectors: (N, L, D) float32 e = e0 + delta, the tuned time parts themselves (usable as `cond_override`);
      None for class-conditional UNets, whose time part cannot be separated from the label.
    """
    offsets: np.ndarray
    vectors: Optional[np.ndarray]
    meta: dict

    @property
    def sampler(self) -> str:
        return self.meta["sampler"]

    @property
    def grid(self) -> np.ndarray:
        return np.asarray(self.meta["grid"], np.float64)

    def describe(self) -> str:
        g = ", ".join(f"{t:.4g}" for t in self.grid)
        return f"{self.sampler} {len(self.grid) - 1} steps on grid [{g}] ({self.meta.get('grid_kind')})"

    def matches(self, sampler: str, grid) -> bool:
        """Same sampler and the same time grid (compared as the float32 times the sampler uses)."""
        grid = np.asarray(grid, np.float64)
        return (sampler == self.sampler and grid.shape == self.grid.shape
                and np.array_equal(grid.astype(np.float32), self.grid.astype(np.float32)))


def select(tuned: Sequence[TunedVectors], sampler: str, grid) -> TunedVectors:
    """The set made for (sampler, grid); a ValueError naming the available ones otherwise."""
    for tv in tuned:
        if tv.matches(sampler, grid):
            return tv
    grid = np.asarray(grid, np.float64)
    have = "; ".join(tv.describe() for tv in tuned) or "none"
    raise ValueError(f"no tuned vectors for {sampler} {len(grid) - 1} steps on grid "
                     f"[{', '.join(f'{t:.4g}' for t in grid)}]; available: {have}. Tune this sampler/grid "
                     "(python -m imm_jax.tuning) or sample without tuned vectors (tuned=False).")


def save(step_dir: str, tuned: TunedVectors, name: Optional[str] = None) -> str:
    """Saves beside the checkpoint in `step_dir` as tuned/<name> (default <sampler>_<N>step_<grid>)."""
    from imm_jax.training import checkpointing
    name = name or f"{tuned.meta['sampler']}_{tuned.meta['steps']}step_{tuned.meta['grid_kind']}"
    arrays = {"offsets": np.asarray(tuned.offsets, np.float32)}
    if tuned.vectors is not None:
        arrays["vectors"] = np.asarray(tuned.vectors, np.float32)
    return checkpointing.save_tuned(step_dir, name, arrays, tuned.meta)


def load(path: str) -> TunedVectors:
    """One set saved by `save` (its directory)."""
    from imm_jax.training import checkpointing
    arrays, meta = checkpointing.load_tuned(path)
    vectors = arrays.get("vectors")
    return TunedVectors(np.asarray(arrays["offsets"], np.float32),
                        None if vectors is None else np.asarray(vectors, np.float32), meta)


def load_all(checkpoint: str, step: Optional[int] = None) -> list[TunedVectors]:
    """Every set stored beside the checkpoint that `imm_jax.load(checkpoint, step=step)` reads."""
    from imm_jax.training import checkpointing
    return [load(p) for p in checkpointing.list_tuned(checkpointing.sampling_step_dir(checkpoint, step))]
