"""Deterministic input pipeline: random-access sources -> global batches sharded over the mesh.

Order. Example positions p = 0, 1, 2, ... run over an endless sequence of epochs; position p reads
item perm_e[p % N] with e = p // N and perm_e a seeded permutation of the N items. Global batch `step`
holds positions [step*B, (step+1)*B). The pipeline is a pure function of (config, step): the data
position saved in a checkpoint is the step, and a resumed run sees exactly the batches it would have seen.

Hosts. Each process reads only the rows of the global batch that live on its own devices and hands them to
`jax.make_array_from_process_local_data`. Results do not depend on the number of hosts.

Sources (config.data.source):
  fashion_mnist  IDX .gz files (Debian package dataset-fashion-mnist, or config.data.path, or tfds).
                 28x28 padded to 32x32 with background (-1), so patch sizes 2, 4, 8 all divide.
  tfds           any tfds dataset via tfds.data_source (array_record files; TensorFlow not needed);
                 config.data.name (e.g. "cifar10"), config.data.split, data dir from config.data.path
                 or the TFDS_DATA_DIR environment variable.
  synthetic      random images/labels generated from the seed (tests, benchmarks).
  latents        pre-computed SD-VAE posteriors (imm_jax.io.latents.LatentShards at config.data.path);
                 z = mean + std * N(0, 1) drawn afresh on every use, then normalised.
Pixels are scaled to [-1, 1]. Optional random horizontal flip (config.data.random_flip).
"""
from __future__ import annotations

import gzip
import os
import queue
import struct
import threading
from typing import Any

import jax
import numpy as np

from imm_jax.training import sharding as sharding_lib

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SOURCES = ("fashion_mnist", "tfds", "synthetic", "latents")


# ----------------------------------------------------------------------------- sources

def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into a NumPy array (uint8 data only)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} bytes.")
    return data.reshape(shape)


def find_fashion_mnist(path: str | None, split: str) -> tuple[str, str] | None:
    """(images, labels) IDX paths of `split` in `path` (only there), or in the Debian package's directory when
    no path is given; None if absent."""
    names = FASHION_MNIST_FILES[split]
    for d in [path] if path else list(FASHION_MNIST_DIRS):
        for img, lbl in ((names[0], names[1]), (names[0][:-3], names[1][:-3])):
            pi, pl = os.path.join(d, img), os.path.join(d, lbl)
            if os.path.exists(pi) and os.path.exists(pl):
                return pi, pl
    return None


class ArraySource:
    """In-memory random-access source: images uint8 (N, H, W, C), labels int32 (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        self.images, self.labels, self.num_classes = images, labels.astype(np.int32), num_classes

    def __len__(self):
        return len(self.images)

    def get(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        del rng
        x = self.images[indices].astype(np.float32) / 127.5 - 1.0
        return {"image": x, "label": self.labels[indices]}


def fashion_mnist_source(data_config) -> ArraySource:
    split = data_config.get("split", "train")
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"config.data.split={split!r}: Fashion-MNIST has splits 'train' and 'test'.")
    path = data_config.get("path", None) or None
    found = find_fashion_mnist(path, split)
    if found is not None:
        images = read_idx(found[0])[..., None]
        labels = read_idx(found[1]).astype(np.int32)
    else:
        images = labels = None
        try:
            import tensorflow_datasets as tfds
            src = tfds.data_source("fashion_mnist", split=split, data_dir=path)
            items = [src[i] for i in range(len(src))]
            images = np.stack([it["image"] for it in items]).astype(np.uint8)
            labels = np.asarray([it["label"] for it in items], np.int32)
        except Exception:  # noqa: BLE001 - any tfds failure means "not available here"
            pass
        if images is None:
            files = " + ".join(FASHION_MNIST_FILES[split])
            if path:  # an explicit path never falls back to another copy
                raise FileNotFoundError(
                    f"Fashion-MNIST {split} split not found in config.data.path={path!r}: looked for {files} (or "
                    f"the same without .gz) there, and for a tfds 'fashion_mnist' dataset with data_dir={path!r}. "
                    "Point --config.data.path at the directory holding the IDX files, or leave it empty to use "
                    f"the Debian package's copy in {FASHION_MNIST_DIRS[0]}.")
            raise FileNotFoundError(
                f"Fashion-MNIST not found: looked for {files} in {', '.join(FASHION_MNIST_DIRS)} and for tfds "
                "'fashion_mnist'. Install it with `apt-get install dataset-fashion-mnist` (as root, else with "
                "sudo), or set --config.data.path=DIR to a directory holding the four IDX files.")
    pad = int(data_config.get("pad", 2))
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # background 0 -> -1 after scaling
    return ArraySource(images, labels, 10)


class SyntheticSource:
    """Random smooth-ish images (a fixed pool of `size` items generated from the seed) with random labels."""

    def __init__(self, image_size: int, channels: int, num_classes: int, size: int, seed: int):
        rng = np.random.default_rng([seed, 12345])
        self.images = np.tanh(rng.normal(size=(size, image_size, image_size, channels))).astype(np.float32)
        self.labels = rng.integers(0, max(num_classes, 1), size=(size,), dtype=np.int32)
        self.num_classes = num_classes

    def __len__(self):
        return len(self.images)

    def get(self, indices, rng):
        del rng
        return {"image": self.images[indices], "label": self.labels[indices]}


class TfdsSource:
    """Random access over a tfds dataset prepared as array_record (no TensorFlow needed)."""

    def __init__(self, name: str, split: str, data_dir: str | None, num_classes: int):
        import tensorflow_datasets as tfds
        data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001
            raise FileNotFoundError(
                f"tfds dataset {name!r} split {split!r} is not prepared in data_dir={data_dir!r}: {e}. Prepare it "
                "once where internet is available (tfds build --file_format=array_record "
                f"{name}) and set TFDS_DATA_DIR (or --config.data.path) to that directory.") from e
        self.num_classes = num_classes

    def __len__(self):
        return len(self.source)

    def get(self, indices, rng):
        del rng
        items = self.source.__getitems__(list(int(i) for i in indices))
        x = np.stack([np.asarray(it["image"]) for it in items]).astype(np.float32) / 127.5 - 1.0
        y = np.asarray([it["label"] for it in items], np.int32)
        return {"image": x, "label": y}


class LatentSource:
    """Pre-encoded VAE posteriors; draws z = mean + std * N(0,1) per use and normalises (spec §6.3)."""

    def __init__(self, path: str, num_classes: int):
        from imm_jax.io import latents
        self._latents = latents
        self.shards = latents.LatentShards(path)
        self.num_classes = num_classes

    def __len__(self):
        return len(self.shards)

    def get(self, indices, rng):
        items = [self.shards[int(i)] for i in indices]
        mean = np.stack([np.asarray(it["mean"], np.float32) for it in items])
        std = np.stack([np.asarray(it["std"], np.float32) for it in items])
        key = jax.random.key(int(rng.integers(0, 2**31 - 1)))
        z = np.asarray(self._latents.sample_latents(key, mean, std), np.float32)
        return {"image": z, "label": np.asarray([it["label"] for it in items], np.int32)}


def make_source(config):
    d = config.data
    src = d.source
    num_classes = int(config.model.num_classes)
    if src == "fashion_mnist":
        return fashion_mnist_source(d)
    if src == "synthetic":
        return SyntheticSource(int(config.model.image_size), int(config.model.in_channels), num_classes,
                               int(d.get("synthetic_size", 1024)), int(config.seed))
    if src == "tfds":
        return TfdsSource(d.name, d.get("split", "train"), d.get("path", None) or None, num_classes)
    if src == "latents":
        if not d.get("path", None):
            raise ValueError("config.data.source='latents' needs config.data.path = the latent shard directory "
                             "written by `python -m imm_jax.tools.encode_latents`.")
        return LatentSource(d.path, num_classes)
    raise ValueError(f"config.data.source={src!r} is not known; use one of {SOURCES}.")


# ----------------------------------------------------------------------------- batches

class Pipeline:
    """Global batch `step` -> dict(image (B,H,W,C) float32, label (B,) int32) of global jax.Arrays.

    Stateless: `global_batch(step)` depends only on (config, step). `iterate(start_step)` prefetches ahead
    on a thread. Each process materialises only its own rows.
    """

    def __init__(self, config, mesh, source=None):
        self.config = config
        self.source = make_source(config) if source is None else source
        self.batch_size = int(config.data.batch_size)
        self.seed = int(config.data.get("seed", config.seed))
        self.random_flip = bool(config.data.get("random_flip", False))
        self.sharding = sharding_lib.batch_sharding(mesh)
        self.rows = sharding_lib.process_batch_rows(self.sharding, self.batch_size)
        self.n = len(self.source)
        if self.n == 0:
            raise ValueError("The data source is empty.")
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
        return self._perm_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Item indices of the whole global batch `step` (B,)."""
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offs = pos // self.n, pos % self.n
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._perm(int(e))[offs[m]]
        return out

    def local_batch(self, step: int) -> dict:
        """This process's rows of global batch `step`, as NumPy."""
        start, stop = self.rows
        idx = self.indices(step)[start:stop]
        rng = np.random.default_rng([self.seed, 11, step, start])
        batch = self.source.get(idx, rng)
        if self.random_flip:
            flips = np.random.default_rng([self.seed, 13, step]).random(self.batch_size)[start:stop] < 0.5
            img = batch["image"]
            batch["image"] = np.where(flips[:, None, None, None], img[:, :, ::-1, :], img)
        batch["image"] = np.ascontiguousarray(batch["image"], np.float32)
        batch["label"] = np.asarray(batch["label"], np.int32)
        return batch

    def global_batch(self, step: int) -> dict:
        local = self.local_batch(step)
        return {k: jax.make_array_from_process_local_data(self.sharding, v, (self.batch_size,) + v.shape[1:])
                for k, v in local.items()}

    def iterate(self, start_step: int, prefetch: int = 2):
        """Yields (step, global batch) from start_step on; host-side work runs on a background thread."""
        if prefetch <= 0:
            step = start_step
            while True:
                yield step, self.global_batch(step)
                step += 1
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def worker():
            step = start_step
            while not stop.is_set():
                try:
                    item = (step, self.local_batch(step), None)
                except Exception as e:  # noqa: BLE001 - re-raised in the consumer
                    item = (step, None, e)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return
                step += 1

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        try:
            while True:
                step, local, err = q.get()
                if err is not None:
                    raise err
                yield step, {k: jax.make_array_from_process_local_data(
                    self.sharding, v, (self.batch_size,) + v.shape[1:]) for k, v in local.items()}
        finally:
            stop.set()


def data_position(pipeline: Pipeline, step: int) -> dict[str, Any]:
    """What a checkpoint stores about the data: enough to check a resume reads the same stream."""
    return {"step": int(step), "seed": pipeline.seed, "batch_size": pipeline.batch_size,
            "num_items": pipeline.n, "source": str(pipeline.config.data.source),
            "epoch": int(step * pipeline.batch_size // pipeline.n),
            "index_in_epoch": int(step * pipeline.batch_size % pipeline.n)}
