"""EDM's non-leaking augmentation (AugmentPipe without its colour part) as pure JAX, run inside the train step.

Each sample gets its own transform with probability min(multiplier * p, 1) per operation; the parameters drawn
are returned as an augmentation label (B, label_dim) that the network is conditioned on (DDPM++ `map_augment`),
so the model learns the augmented distribution *labelled* and samples with a zero label (no augmentation).

Operations, in EDM's order, and their label entries:
  pixel blitting   xflip (1: flipped), yflip (1), rotate_int (2: the two flips a 90-degree rotation is made of),
                   translate_int (2: integer shift / (size * translate_int_max), reflected at the borders)
  geometric        scale (1: the standard normal draw w; scale 2^(w scale_std)), rotate_frac (2: cos - 1, sin),
                   aniso (2: w cos r, w sin r), translate_frac (2: the two standard normal draws)
The geometric ones compose into one inverse matrix, executed as EDM does: reflect padding, 2x upsampling with the
sym6 wavelet filter, bilinear sampling with zero padding (align_corners=False), sym6 downsampling and a crop.
EDM's CIFAR-10 setting (xflip=1e8, yflip=scale=rotate_frac=aniso=translate_frac=1, p=0.12) gives 9 label entries.

Deviation from EDM: EDM pads each batch by the largest margin its transforms
need (a data-dependent shape); under jit the padding is the largest EDM can choose, (H-1, W-1) pixels. Outputs
then differ from EDM's only where EDM's smaller padding let the upsampling filter's zero border reach sampled
pixels (below 5e-3 on images in [-1, 1]; measured in tests/test_augment.py). EDM's colour transforms are not
implemented (its CIFAR-10 setting uses none).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Low-pass decomposition filter of the Symlet-6 wavelet (12 taps; sums to sqrt(2), squares to 1).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

PIXEL_OPS = ("xflip", "yflip", "rotate_int", "translate_int")
GEOMETRIC_OPS = ("scale", "rotate_frac", "aniso", "translate_frac")
LABEL_WIDTH = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                   translate_frac=2)
# EDM's CIFAR-10 multipliers (train.py --augment): x-flip on every sample (a fair coin), the rest with p.
EDM_CIFAR_OPS = dict(xflip=1e8, yflip=1.0, rotate_int=0.0, translate_int=0.0, scale=1.0, rotate_frac=1.0,
                     aniso=1.0, translate_frac=1.0)


@dataclasses.dataclass(frozen=True)
class AugmentPipe:
    """Probability `p` and per-operation multipliers (0 = off) and ranges, EDM's names and defaults."""
    p: float = 0.0
    xflip: float = 0.0
    yflip: float = 0.0
    rotate_int: float = 0.0
    translate_int: float = 0.0
    translate_int_max: float = 0.125
    scale: float = 0.0
    rotate_frac: float = 0.0
    aniso: float = 0.0
    translate_frac: float = 0.0
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125

    @property
    def ops(self) -> tuple[str, ...]:
        """The enabled operations, in execution order."""
        return tuple(op for op in PIXEL_OPS + GEOMETRIC_OPS if getattr(self, op) > 0)

    @property
    def label_dim(self) -> int:
        """Width of the augmentation label: what the network's augment_dim must be."""
        return sum(LABEL_WIDTH[op] for op in self.ops)

    @property
    def active(self) -> bool:
        return self.p > 0 and bool(self.ops)

    @classmethod
    def from_config(cls, data) -> "AugmentPipe":
        """From config.data: augment_p and the multipliers in data.augment_ops (EDM_CIFAR_OPS when absent)."""
        ops = dict(EDM_CIFAR_OPS)
        given = dict(data.get("augment_ops", None) or {})
        unknown = sorted(set(given) - set(LABEL_WIDTH))
        if unknown:
            raise ValueError(f"config.data.augment_ops has unknown operations {unknown}; known: "
                             f"{sorted(LABEL_WIDTH)}.")
        ops.update({k: float(v) for k, v in given.items()})
        return cls(p=float(data.get("augment_p", 0.0) or 0.0), **ops)


def draw(pipe: AugmentPipe, key, n: int) -> dict[str, jax.Array]:
    """The per-sample random parameters of every enabled operation, each (n,) (0 where not applied)."""
    keys = iter(jax.random.split(key, 24))
    gate = lambda mult: jax.random.uniform(next(keys), (n,)) < mult * pipe.p
    uniform = lambda: jax.random.uniform(next(keys), (n,), jnp.float32, -1.0, 1.0)
    normal = lambda: jax.random.normal(next(keys), (n,), jnp.float32)
    out = {}
    if pipe.xflip > 0:
        out["xflip"] = jnp.where(gate(pipe.xflip), jax.random.randint(next(keys), (n,), 0, 2), 0)
    if pipe.yflip > 0:
        out["yflip"] = jnp.where(gate(pipe.yflip), jax.random.randint(next(keys), (n,), 0, 2), 0)
    if pipe.rotate_int > 0:
        out["rotate_int"] = jnp.where(gate(pipe.rotate_int), jax.random.randint(next(keys), (n,), 0, 4), 0)
    if pipe.translate_int > 0:
        on = gate(pipe.translate_int)
        out["translate_int_x"], out["translate_int_y"] = (jnp.where(on, uniform(), 0.0) for _ in range(2))
    if pipe.scale > 0:
        out["scale"] = jnp.where(gate(pipe.scale), normal(), 0.0)
    if pipe.rotate_frac > 0:
        out["rotate_frac"] = jnp.where(gate(pipe.rotate_frac), uniform() * (math.pi * pipe.rotate_frac_max), 0.0)
    if pipe.aniso > 0:
        w = jnp.where(gate(pipe.aniso), normal(), 0.0)
        r = jnp.where(jax.random.uniform(next(keys), (n,)) < pipe.aniso_rotate_prob, uniform() * math.pi, 0.0)
        out["aniso"], out["aniso_angle"] = w, r
    if pipe.translate_frac > 0:
        on = gate(pipe.translate_frac)
        out["translate_frac_x"], out["translate_frac_y"] = (jnp.where(on, normal(), 0.0) for _ in range(2))
    return out


# Matrix products at full float32 precision on every backend (TPU's default would round operands to bfloat16:
# ~0.5% error in the transform, a pixel at the upsampled scale).
HIGHEST = jax.lax.Precision.HIGHEST


def _mm(*ms):
    out = ms[0]
    for m in ms[1:]:
        out = jnp.matmul(out, m, precision=HIGHEST)
    return out


# ------------------------------------------------------------------------------- 3x3 homogeneous matrices

def _mat(rows):
    """(n, 3, 3) from a 3x3 nested list of scalars or (n,) arrays."""
    n = next(jnp.shape(v)[0] for row in rows for v in row if jnp.ndim(v))
    return jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,)) for v in row], -1)
                      for row in rows], -2)


def translate(tx, ty):
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def scale(sx, sy):
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def rotate(theta):
    c, s = jnp.cos(theta), jnp.sin(theta)
    return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def inverse_matrix(pipe: AugmentPipe, params: dict, h: int, w: int):
    """(n, 3, 3) inverse geometric transform (output pixel -> input pixel, centred coordinates), or None."""
    g = None

    def then(m):
        nonlocal g
        g = m if g is None else _mm(g, m)

    if "scale" in params:
        s = jnp.exp2(params["scale"] * pipe.scale_std)
        then(scale(1 / s, 1 / s))
    if "rotate_frac" in params:
        then(rotate(params["rotate_frac"]))
    if "aniso" in params:
        s, r = jnp.exp2(params["aniso"] * pipe.aniso_std), params["aniso_angle"]
        then(_mm(rotate(-r), scale(1 / s, s), rotate(r)))
    if "translate_frac_x" in params:
        then(translate(-params["translate_frac_x"] * (w * pipe.translate_frac_std),
                       -params["translate_frac_y"] * (h * pipe.translate_frac_std)))
    return g


# --------------------------------------------------------------------------------------- execution

@functools.lru_cache(maxsize=None)
def _upsample_matrix(length: int) -> np.ndarray:
    """(2L, L): zero insertion then the sym6 filter (EDM's conv with the reversed filter, padding 6)."""
    hz, out = np.asarray(SYM6, np.float64), np.zeros((2 * length, length))
    for i in range(2 * length):
        for j in range(length):
            if 0 <= 5 + i - 2 * j < len(hz):
                out[i, j] = hz[5 + i - 2 * j]
    return out.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _downsample_matrix(length: int) -> np.ndarray:
    """(L/2, L): the sym6 filter, stride 2, padding 5."""
    hz, out = np.asarray(SYM6, np.float64), np.zeros((length // 2, length))
    for i in range(length // 2):
        for q in range(length):
            if 0 <= q - 2 * i + 5 < len(hz):
                out[i, q] = hz[q - 2 * i + 5]
    return out.astype(np.float32)


def _bilinear(images, theta, out_h: int, out_w: int):
    """torch grid_sample(affine_grid(theta, align_corners=False), bilinear, zeros) of images (n, H, W, C) with
    per-sample theta (n, 3, 3) (rows 0-1 used) -> (n, out_h, out_w, C)."""
    n, in_h, in_w, c = images.shape
    xn = (2 * jnp.arange(out_w, dtype=jnp.float32) + 1) / out_w - 1
    yn = (2 * jnp.arange(out_h, dtype=jnp.float32) + 1) / out_h - 1
    th = theta[:, :2, :, None, None]  # (n, 2, 3, 1, 1)
    gx = th[:, 0, 0] * xn[None, :] + th[:, 0, 1] * yn[:, None] + th[:, 0, 2]  # (n, out_h, out_w)
    gy = th[:, 1, 0] * xn[None, :] + th[:, 1, 1] * yn[:, None] + th[:, 1, 2]
    ix, iy = ((gx + 1) * in_w - 1) / 2, ((gy + 1) * in_h - 1) / 2
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    flat = images.reshape(n, in_h * in_w, c)
    out = jnp.zeros((n, out_h * out_w, c), images.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - jnp.abs(ix - xi)) * (1 - jnp.abs(iy - yi))
            ok = (xi >= 0) & (xi <= in_w - 1) & (yi >= 0) & (yi <= in_h - 1)
            idx = (jnp.clip(yi, 0, in_h - 1) * in_w + jnp.clip(xi, 0, in_w - 1)).astype(jnp.int32)
            taps = jnp.take_along_axis(flat, idx.reshape(n, -1, 1), axis=1)
            out = out + jnp.where(ok, wgt, 0.0).reshape(n, -1, 1) * taps
    return out.reshape(n, out_h, out_w, c)


def warp(images, g_inv):
    """EDM's execution of the inverse transforms `g_inv` (n, 3, 3) on images (n, H, W, C)."""
    n, h, w, c = images.shape
    pad = len(SYM6) // 4
    my, mx = h - 1, w - 1  # the largest margin EDM chooses (see the module docstring)
    x = jnp.pad(images, ((0, 0), (my, my), (mx, mx), (0, 0)), mode="reflect")
    hp, wp = h + 2 * my, w + 2 * mx
    x = jnp.einsum("ij,njkc->nikc", _upsample_matrix(hp), x, precision=HIGHEST)
    x = jnp.einsum("kj,nijc->nikc", _upsample_matrix(wp), x, precision=HIGHEST)
    out_h, out_w = (h + 2 * pad) * 2, (w + 2 * pad) * 2
    up_h, up_w = 2 * hp, 2 * wp
    full = lambda v: jnp.full((n,), v, jnp.float32)
    g = _mm(scale(full(2.0), 2.0), g_inv, scale(full(0.5), 0.5))
    g = _mm(translate(full(-0.5), -0.5), g, translate(full(0.5), 0.5))
    g = _mm(scale(full(2 / up_w), 2 / up_h), g, scale(full(out_w / 2), out_h / 2))
    x = _bilinear(x, g, out_h, out_w)
    x = jnp.einsum("ij,njkc->nikc", _downsample_matrix(out_h), x, precision=HIGHEST)
    x = jnp.einsum("kj,nijc->nikc", _downsample_matrix(out_w), x, precision=HIGHEST)
    return x[:, pad:-pad, pad:-pad, :]


def _reflect(idx, size: int):
    return size - 1 - jnp.abs(size - 1 - idx % (2 * size - 2))


def apply(pipe: AugmentPipe, images, params: dict):
    """(augmented images (n, H, W, C) float32, labels (n, label_dim) float32) for drawn `params`."""
    images = jnp.asarray(images, jnp.float32)
    n, h, w, _ = images.shape
    labels = []
    col = lambda v: v.reshape(n, 1, 1, 1)
    if "xflip" in params:
        images = jnp.where(col(params["xflip"]) == 1, images[:, :, ::-1], images)
        labels.append(params["xflip"])
    if "yflip" in params:
        images = jnp.where(col(params["yflip"]) == 1, images[:, ::-1], images)
        labels.append(params["yflip"])
    if "rotate_int" in params:
        if h != w:
            raise ValueError(f"rotate_int needs square images, got {h}x{w}")
        k = col(params["rotate_int"])
        images = jnp.where((k == 1) | (k == 2), images[:, :, ::-1], images)
        images = jnp.where((k == 2) | (k == 3), images[:, ::-1], images)
        images = jnp.where((k == 1) | (k == 3), images.transpose(0, 2, 1, 3), images)
        labels += [(params["rotate_int"] == 1) | (params["rotate_int"] == 2),
                   (params["rotate_int"] == 2) | (params["rotate_int"] == 3)]
    if "translate_int_x" in params:
        tx = jnp.round(params["translate_int_x"] * (w * pipe.translate_int_max)).astype(jnp.int32)
        ty = jnp.round(params["translate_int_y"] * (h * pipe.translate_int_max)).astype(jnp.int32)
        xs = _reflect(jnp.arange(w)[None, :] - tx[:, None], w)  # (n, W)
        ys = _reflect(jnp.arange(h)[None, :] + ty[:, None], h)  # (n, H)
        images = jnp.take_along_axis(images, xs[:, None, :, None], axis=2)
        images = jnp.take_along_axis(images, ys[:, :, None, None], axis=1)
        labels += [tx / (w * pipe.translate_int_max), ty / (h * pipe.translate_int_max)]
    if "scale" in params:
        labels.append(params["scale"])
    if "rotate_frac" in params:
        labels += [jnp.cos(params["rotate_frac"]) - 1, jnp.sin(params["rotate_frac"])]
    if "aniso" in params:
        labels += [params["aniso"] * jnp.cos(params["aniso_angle"]), params["aniso"] * jnp.sin(params["aniso_angle"])]
    if "translate_frac_x" in params:
        labels += [params["translate_frac_x"], params["translate_frac_y"]]
    g_inv = inverse_matrix(pipe, params, h, w)
    if g_inv is not None:
        images = warp(images, g_inv)
    label = jnp.stack([jnp.asarray(v, jnp.float32) for v in labels], 1) if labels else jnp.zeros((n, 0))
    return images, label


def augment(pipe: AugmentPipe, images, key):
    """(images, labels) = apply(pipe, images, draw(pipe, key, n)): a pure function of the key."""
    return apply(pipe, images, draw(pipe, key, images.shape[0]))
