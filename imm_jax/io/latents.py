"""Pre-encoded SD-VAE latents on disk: the shard format, its writer, and a random-access reader.

A latent directory holds, for every shard k (a contiguous range of example indices):
    shard-{k:05d}.mean.npy    (n, h, w, c) posterior means, raw VAE units (float32 or float16)
    shard-{k:05d}.std.npy     (n, h, w, c) posterior standard deviations, same dtype
    shard-{k:05d}.label.npy   (n,) int32 class labels
    shard-{k:05d}.json        written last: marks the shard complete (resumable writing)
and, once every shard is complete, `index.json`:
    {"format": "imm_jax.io.latents/v1", "num_examples": N, "shard_size": S, "latent_shape": [h, w, c],
     "storage_dtype": "float32", "shards": [{"name", "start", "count"}, ...], "metadata": {...}}
Shard k covers examples [k*S, min((k+1)*S, N)). The reader memory-maps the .npy files, so
random access costs one small read per example.

Training draws z = mean + std * N(0, 1) each time a latent is used and normalises it (spec §6.3):
`sample_latents(key, mean, std)`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "imm_jax.io.latents/v1"
INDEX_NAME = "index.json"
STORAGE_DTYPES = ("float32", "float16")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_ranges(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] for each shard of a dataset of `num_examples` split into `shard_size` pieces."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    return [(s, min(s + shard_size, num_examples)) for s in range(0, num_examples, shard_size)]


def shard_is_done(path: str, k: int) -> bool:
    """True when shard k has been completely written (its marker exists)."""
    return os.path.isfile(os.path.join(path, shard_name(k) + ".json"))


def _save_npy_atomic(filename: str, arr: np.ndarray) -> None:
    tmp = filename + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, filename)


def write_shard(path: str, k: int, start: int, mean: np.ndarray, std: np.ndarray, labels: np.ndarray,
                storage_dtype: str = "float32") -> None:
    """Writes shard k (examples [start, start + n)): mean/std (n, h, w, c), labels (n,). Atomic per file;
    the completion marker is written last, so an interrupted shard is simply redone."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype={storage_dtype!r}: use one of {STORAGE_DTYPES}.")
    mean, std = np.asarray(mean), np.asarray(std)
    labels = np.asarray(labels)
    if mean.shape != std.shape or mean.ndim != 4 or labels.shape != mean.shape[:1]:
        raise ValueError(f"shard {k}: mean {mean.shape}, std {std.shape} must be equal (n, h, w, c) and "
                         f"labels {labels.shape} must be (n,).")
    os.makedirs(path, exist_ok=True)
    base = os.path.join(path, shard_name(k))
    _save_npy_atomic(base + ".mean.npy", mean.astype(storage_dtype))
    _save_npy_atomic(base + ".std.npy", std.astype(storage_dtype))
    _save_npy_atomic(base + ".label.npy", labels.astype(np.int32))
    marker = {"shard": k, "start": int(start), "count": int(mean.shape[0]),
              "latent_shape": list(mean.shape[1:]), "storage_dtype": storage_dtype}
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(marker, f)
    os.replace(tmp, base + ".json")


def finalize(path: str, num_examples: int, shard_size: int,
             metadata: Mapping[str, Any] | None = None) -> bool:
    """Writes `index.json` if every shard of the plan is complete; returns whether it did.

    Safe to call from several hosts: each writes identical content atomically.
    """
    shards, shape, dtype = [], None, None
    for k, (start, stop) in enumerate(shard_ranges(num_examples, shard_size)):
        if not shard_is_done(path, k):
            return False
        with open(os.path.join(path, shard_name(k) + ".json")) as f:
            m = json.load(f)
        if (m["start"], m["count"]) != (start, stop - start):
            raise ValueError(f"{path}: shard {k} holds examples [{m['start']}, {m['start'] + m['count']}) but the "
                             f"plan expects [{start}, {stop}); it was written with a different dataset size or "
                             f"--shard_size. Use a fresh output directory.")
        if shape is None:
            shape, dtype = m["latent_shape"], m["storage_dtype"]
        elif (m["latent_shape"], m["storage_dtype"]) != (shape, dtype):
            raise ValueError(f"{path}: shard {k} has latent shape {m['latent_shape']} / {m['storage_dtype']} "
                             f"but shard 0 has {shape} / {dtype}.")
        shards.append({"name": shard_name(k), "start": start, "count": stop - start})
    index = {"format": FORMAT, "num_examples": int(num_examples), "shard_size": int(shard_size),
             "latent_shape": shape, "storage_dtype": dtype, "shards": shards, "metadata": dict(metadata or {})}
    tmp = os.path.join(path, INDEX_NAME + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(path, INDEX_NAME))
    return True


class LatentShards:
    """Random-access reader of a latent directory.

    len(ds) = number of examples; ds[i] -> {"mean": (h, w, c) float32, "std": (h, w, c) float32, "label": int}
    (raw VAE units; see `sample_latents`). `ds.get_batch(indices)` returns the same fields stacked
    ((B, h, w, c), (B, h, w, c), (B,) int32). `ds.labels` is every label, (N,) int32.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        index_file = os.path.join(self.path, INDEX_NAME)
        if not os.path.isfile(index_file):
            raise FileNotFoundError(
                f"{index_file} not found: {self.path} is not a finished latent directory. Write it with "
                f"`python -m imm_jax.tools.encode_latents --out={self.path} ...` (re-run it to finish an "
                f"interrupted encode; finished shards are skipped).")
        with open(index_file) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file}: format {self.index.get('format')!r} is not {FORMAT!r}.")
        self.num_examples = int(self.index["num_examples"])
        self.shard_size = int(self.index["shard_size"])
        self.latent_shape = tuple(self.index["latent_shape"])
        self.metadata = self.index.get("metadata", {})
        self._shards = self.index["shards"]
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_examples

    def _shard(self, k: int):
        if k not in self._open:
            info = self._shards[k]
            base = os.path.join(self.path, info["name"])
            arrays = tuple(np.load(f"{base}.{part}.npy", mmap_mode="r") for part in ("mean", "std", "label"))
            want = (info["count"],) + self.latent_shape
            if arrays[0].shape != want or arrays[1].shape != want or arrays[2].shape != want[:1]:
                raise ValueError(f"{base}: arrays have shapes {[a.shape for a in arrays]}, index.json "
                                 f"says {want}; the directory is corrupt (re-encode this shard).")
            self._open[k] = arrays
        return self._open[k]

    def _locate(self, i: int) -> tuple[int, int]:
        i = int(i)
        if i < 0:
            i += self.num_examples
        if not 0 <= i < self.num_examples:
            raise IndexError(f"latent index {i} out of range [0, {self.num_examples}).")
        return i // self.shard_size, i % self.shard_size

    def __getitem__(self, i: int) -> dict:
        k, j = self._locate(i)
        mean, std, label = self._shard(k)
        return {"mean": np.asarray(mean[j], np.float32), "std": np.asarray(std[j], np.float32),
                "label": int(label[j])}

    def get_batch(self, indices: Sequence[int]) -> dict:
        """Stacked examples: {"mean": (B, h, w, c) f32, "std": (B, h, w, c) f32, "label": (B,) int32}."""
        b = len(indices)
        mean = np.empty((b,) + self.latent_shape, np.float32)
        std = np.empty_like(mean)
        label = np.empty((b,), np.int32)
        for n, i in enumerate(indices):
            k, j = self._locate(i)
            m, s, lab = self._shard(k)
            mean[n], std[n], label[n] = m[j], s[j], lab[j]
        return {"mean": mean, "std": std, "label": label}

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(self._shard(k)[2]) for k in range(len(self._shards))]
                              ) if self._shards else np.zeros((0,), np.int32)


def sample_latents(key, mean, std):
    """z = normalize_latents(mean + std * N(0, 1)), the training input (spec §6.3).

    key: a jax PRNG key; mean, std: (..., 4) raw VAE posterior moments. Returns float32 of mean's shape.
    """
    import jax
    import jax.numpy as jnp
    from imm_jax.networks.vae import normalize_latents
    mean = jnp.asarray(mean, jnp.float32)
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return normalize_latents(mean + jnp.asarray(std, jnp.float32) * eps)
