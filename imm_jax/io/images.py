"""Image utilities: model-space images to uint8, tile samples into one grid, write PNGs."""
from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(x, pad: int = 0) -> np.ndarray:
    """Model-space images in [-1, 1] (N, H, W, C) -> uint8, with `pad` border pixels cropped off."""
    img = np.clip(np.asarray(x, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)
    return img[:, pad:img.shape[1] - pad, pad:img.shape[2] - pad] if pad else img


def make_grid(images: np.ndarray, ncol: int | None = None, border: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+b)+b, ncol*(W+b)+b, C) uint8 image with dark borders."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"make_grid wants uint8 (N, H, W, C), got {x.dtype} {x.shape}.")
    n, h, w, c = x.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + border) + border, ncol * (w + border) + border, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = border + r * (h + border), border + q * (w + border)
        grid[top:top + h, left:left + w] = x[i]
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """Write a (H, W, C) uint8 image (C = 1 or 3) as PNG, creating parent directories."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(img).save(path)
    return path
