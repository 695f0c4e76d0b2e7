"""Image sources for evaluation: ADM-layout .npz files and IDX (MNIST-format) files, as uint8 NHWC."""
from __future__ import annotations

import gzip
import os

import numpy as np

FASHION_MNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def load_npz_images(path: str, key: str = "arr_0") -> np.ndarray:
    """uint8 (N, H, W, C) images from an .npz in the ADM evaluator layout (key `arr_0`, NHWC)."""
    with np.load(path) as f:
        if key not in f.files:
            raise ValueError(f"{path} has no array {key!r} (has {f.files}); expected uint8 images (N, H, W, C) "
                             "saved as np.savez(path, arr_0=images)")
        images = f[key]
    if images.dtype != np.uint8:
        raise TypeError(f"{path}[{key!r}] must be uint8 (N, H, W, C), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}[{key!r}] must be (N, H, W, C) with C = 1 or 3, got {images.shape}")
    return images


def load_idx_images(path: str) -> np.ndarray:
    """uint8 (N, rows, cols, 1) images from an IDX3 file (MNIST / Fashion-MNIST format, optionally gzipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 16 or data[:4] != b"\x00\x00\x08\x03":
        raise ValueError(f"{path} is not an IDX3 uint8 image file (magic {data[:4].hex()}, expected 00000803)")
    n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    if len(data) != 16 + n * rows * cols:
        raise ValueError(f"{path}: header says {n}x{rows}x{cols} images but the payload has {len(data) - 16} bytes")
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols, 1).copy()


def fashion_mnist_test(path: str = FASHION_MNIST_TEST) -> np.ndarray:
    """The 10,000 Fashion-MNIST test images, uint8 (10000, 28, 28, 1)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Fashion-MNIST test images not found at {path}; pass the IDX file's path "
                                "(t10k-images-idx3-ubyte.gz)")
    return load_idx_images(path)
