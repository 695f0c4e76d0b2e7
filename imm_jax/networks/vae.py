"""Stable Diffusion VAE (kl-f8 AutoencoderKL) in Flax Linen, and the IMM latent normalisation.

The architecture is the one of diffusers' `AutoencoderKL` with down/up blocks
`DownEncoderBlock2D` / `UpDecoderBlock2D` (the `stabilityai/sd-vae-ft-ema` and `sd-vae-ft-mse` checkpoints:
block_out_channels (128, 256, 512, 512), 2 resnets per down block, 3 per up block, GroupNorm(32, eps 1e-6),
one single-head self-attention in each mid block, quant_conv / post_quant_conv).

Layout conventions:
- images are NHWC, float in [-1, 1] for `AutoencoderKL.encode` / `decode`, uint8 in [0, 255] for the helpers;
- latents are NHWC with `latent_channels` (4) channels at 1/8 resolution: a 256x256 image gives (32, 32, 4).

Weights load from a local diffusers-format directory (`config.json` + `diffusion_pytorch_model.safetensors`)
with `load_pretrained(path)`; the safetensors file is read with the `safetensors` package's NumPy API, so
torch is not needed. Nothing here downloads anything.

Latent normalisation (spec §6.3): the model space is
    x = (z - RAW_MEAN) / RAW_STD * 0.5
with the IMM/EDM2 authors' channel statistics of raw SD-VAE latents (not the SD factor 0.18215).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

# ---------------------------------------------------------------------------------------------------------
# Latent normalisation (spec §6.3)

RAW_MEAN = np.array([0.86488, -0.27787343, 0.21616915, 0.3738409], dtype=np.float32)
RAW_STD = np.array([4.85503674, 5.31922414, 3.93725398, 3.9870003], dtype=np.float32)
FINAL_STD = 0.5
LATENT_SCALE = (FINAL_STD / RAW_STD).astype(np.float32)  # x = z * scale + bias
LATENT_BIAS = (-RAW_MEAN * LATENT_SCALE).astype(np.float32)


def normalize_latents(z):
    """Raw VAE latents z (..., 4) -> model-space latents (..., 4) with per-channel std ~0.5."""
    return z * LATENT_SCALE + LATENT_BIAS


def denormalize_latents(x):
    """Inverse of `normalize_latents`: model-space latents (..., 4) -> raw VAE latents (..., 4)."""
    return (x - LATENT_BIAS) / LATENT_SCALE


def images_to_vae_input(images):
    """uint8 (or float in [0, 255]) images (..., H, W, 3) -> float32 in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def vae_output_to_uint8(x):
    """VAE decoder output in [-1, 1] -> uint8 in [0, 255].

    Matches the reference `(x * 0.5 + 0.5).clamp(0, 1) * 255` followed by a truncating cast to uint8.
    """
    x = jnp.clip(jnp.asarray(x, jnp.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0
    return jnp.floor(x).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------------------
# Configuration

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str | Any):
    """'float32' | 'bfloat16' | 'float16' (or a jnp dtype) -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"VAE dtype {name!r} is not supported; use one of {sorted(_DTYPES)}.")
        return _DTYPES[name]
    return name


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The subset of diffusers' AutoencoderKL config that determines the architecture."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must all be divisible by "
                    f"norm_num_groups={self.norm_num_groups}.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """Builds the config from a diffusers `config.json` dict; rejects unsupported block types."""
        n = len(cfg.get("block_out_channels", (64,)))
        down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",) * n))
        up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",) * n))
        if any(b != "DownEncoderBlock2D" for b in down) or any(b != "UpDecoderBlock2D" for b in up):
            raise ValueError(
                f"Only DownEncoderBlock2D/UpDecoderBlock2D AutoencoderKL checkpoints are supported; got "
                f"down_block_types={down}, up_block_types={up}.")
        if len(down) != n or len(up) != n:
            raise ValueError("config.json: down_block_types/up_block_types must have one entry per "
                             "block_out_channels entry.")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"config.json: act_fn={cfg['act_fn']!r} is not supported (only 'silu').")
        cls_name = cfg.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"config.json describes a {cls_name!r}, expected 'AutoencoderKL'.")
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers-compatible `config.json` dict for this architecture."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
            "scaling_factor": 0.18215,
        }


KL_F8 = VAEConfig()  # sd-vae-ft-ema / sd-vae-ft-mse


# ---------------------------------------------------------------------------------------------------------
# Modules. Submodule names mirror diffusers' state-dict names with "." before an index replaced by "_"
# (e.g. `down_blocks.0.resnets.1.conv1` <-> `down_blocks_0/resnets_1/conv1`), which keeps the loader mechanical.

def _conv(features, kernel, dtype, name, strides=1, padding=None):
    if padding is None:
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nn.Conv(features, (kernel, kernel), strides=strides, padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def _group_norm(groups, dtype, name):
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: (B,H,W,Cin) -> (B,H,W,out_channels)."""
    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _group_norm(self.groups, self.dtype, "norm1")(x)
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(h))
        h = _group_norm(self.groups, self.dtype, "norm2")(h)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a GroupNorm in front and a residual."""
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, hgt * wid, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        # Scale q before the product so float16 logits stay in range; softmax in float32.
        q = q * jnp.asarray(1.0 / np.sqrt(c), q.dtype)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v)
        out = dense("to_out_0")(out)
        return x + out.reshape(b, hgt, wid, c).astype(x.dtype)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at constant width."""
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class DownBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = _Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class _Downsample(nn.Module):
    """Pads (0, 1) at the bottom/right, then a stride-2 valid 3x3 conv: (B,H,W,C) -> (B,H/2,W/2,C)."""
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.channels, 3, self.dtype, "conv", strides=2, padding=((0, 1), (0, 1)))(x)


class _Upsample(nn.Module):
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class UpBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = _Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images (B,H,W,in_channels) in [-1,1] -> moments (B,H/f,W/f,2*latent_channels) before quant_conv."""
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        chans = cfg.block_out_channels
        x = _conv(chans[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, c in enumerate(chans):
            x = DownBlock(c, cfg.layers_per_block, cfg.norm_num_groups, i < len(chans) - 1, self.dtype,
                          name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                     name="mid_block")(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, self.dtype, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Latents (B,h,w,latent_channels) after post_quant_conv -> images (B,h*f,w*f,out_channels) in ~[-1,1]."""
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        chans = tuple(reversed(cfg.block_out_channels))
        x = _conv(chans[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                     name="mid_block")(x)
        for i, c in enumerate(chans):
            x = UpBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(chans) - 1, self.dtype,
                        name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, self.dtype, "conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """kl-f8 style VAE. Params are float32; `dtype` is the compute dtype (float32 / bfloat16 / float16).

    Methods (use with `module.apply({"params": p}, x, method=...)`):
      encode(images) -> (mean, std): images (B,H,W,3) in [-1,1]; mean, std (B,H/f,W/f,latent) float32.
      decode(z) -> images (B,h*f,w*f,3) float32, nominally in [-1,1] (not clipped).
      __call__(images) -> decode(mean): used by `init` to create every parameter.
    """
    config: VAEConfig = KL_F8
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        dt = compute_dtype(self.dtype)
        self.encoder = Encoder(cfg, dt)
        self.decoder = Decoder(cfg, dt)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, dt, None)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, dt, None)

    def encode(self, images):
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        return mean, jnp.exp(0.5 * logvar)

    def decode(self, z):
        z = jnp.asarray(z).astype(compute_dtype(self.dtype))
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def init_params(config: VAEConfig, key, image_size: int | None = None):
    """Random float32 params for `config` (Flax default initialisers)."""
    size = image_size or 2 * config.downsample_factor
    x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    return AutoencoderKL(config).init(key, x)["params"]


def random_params(config: VAEConfig, seed: int = 0, norm_noise: float = 0.0):
    """Random float32 params built with NumPy (no XLA compile): kernels N(0, 1/fan_in), biases 0,
    GroupNorm scales 1; `norm_noise` > 0 adds N(0, norm_noise^2) to every bias and scale. For tests and smoke runs."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(spec.shape[:-1]))
            arr = rng.normal(size=spec.shape) / np.sqrt(fan_in)
        else:
            arr = np.full(spec.shape, 1.0 if name == "scale" else 0.0)
            arr = arr + norm_noise * rng.normal(size=spec.shape)
        return jnp.asarray(arr, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


def param_shapes(config: VAEConfig):
    """Abstract (ShapeDtypeStruct) params tree of `config`, computed without allocating."""
    size = 2 * config.downsample_factor
    x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda k, x: AutoencoderKL(config).init(k, x)["params"], jax.random.key(0), x)


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


# ---------------------------------------------------------------------------------------------------------
# High-level helpers (pure functions of module, params and arrays; jit them with the module static).

def encode_images(vae: AutoencoderKL, params, images):
    """uint8 images (B,H,W,3) -> posterior (mean, std), each (B,H/8,W/8,4) float32 (raw, unnormalised)."""
    return vae.apply({"params": params}, images_to_vae_input(images), method=AutoencoderKL.encode)


def decode_to_uint8(vae: AutoencoderKL, params, x):
    """Model-space latents x (B,h,w,4) -> uint8 images (B,8h,8w,3): inverse normalisation, decode, quantise."""
    z = denormalize_latents(jnp.asarray(x, jnp.float32))
    return vae_output_to_uint8(vae.apply({"params": params}, z, method=AutoencoderKL.decode))


# ---------------------------------------------------------------------------------------------------------
# diffusers state dict <-> Flax params

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_key(flax_path: Sequence[str]) -> str:
    """('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'encoder.down_blocks.0.resnets.1.conv1.weight'."""
    parts = []
    for p in flax_path[:-1]:
        m = _INDEXED.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    parts.append("bias" if flax_path[-1] == "bias" else "weight")
    return ".".join(parts)


def _canonical_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """Renames the pre-0.14 diffusers attention names (query/key/value/proj_attn) to the current ones.

    Returns (renamed dict, map from new name to the name found in the file) for error messages.
    """
    out, origin = {}, {}
    for k, v in state_dict.items():
        new = k
        m = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            new = f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}"
        if new in out:
            raise ValueError(f"state dict has both {origin[new]!r} and {k!r} for the same tensor {new!r}.")
        out[new], origin[new] = v, k
    return out, origin


def _to_flax(key: str, leaf: str, arr: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if leaf == "kernel" and len(want) == 4:  # conv: torch (O, I, kh, kw) -> flax (kh, kw, I, O)
        if arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and len(want) == 2:  # linear: torch (out, in) -> flax (in, out)
        if arr.ndim == 4 and arr.shape[2:] == (1, 1):  # 1x1-conv attention projections in some exports
            arr = arr[:, :, 0, 0]
        if arr.ndim == 2:
            arr = arr.T
    if arr.shape != want:
        raise ValueError(f"tensor {key!r} has shape {arr.shape} (after conversion to Flax layout) but the "
                         f"architecture needs {want}; the checkpoint does not match config.json.")
    return arr


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: VAEConfig):
    """diffusers AutoencoderKL state dict (NumPy arrays) -> Flax params (float32) for `config`.

    Every tensor of the state dict must be consumed and every parameter found; otherwise a ValueError
    names the offending keys.
    """
    sd, origin = _canonical_state_dict(state_dict)
    shapes = param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    params: dict = {}
    missing, used = [], set()
    for path, spec in flat:
        names = [p.key for p in path]
        key = _torch_key(names)
        if key not in sd:
            missing.append(key)
            continue
        arr = _to_flax(origin[key], names[-1], sd[key], tuple(spec.shape))
        used.add(key)
        node = params
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = arr
    if missing:
        raise ValueError(f"VAE checkpoint is missing {len(missing)} tensor(s) required by config.json, "
                         f"e.g. {missing[:5]}.")
    unused = sorted(origin[k] for k in sd if k not in used)
    if unused:
        raise ValueError(f"VAE checkpoint has {len(unused)} tensor(s) the architecture does not use "
                         f"(config.json mismatch?), e.g. {unused[:5]}.")
    return params


def state_dict_from_params(params) -> dict[str, np.ndarray]:
    """Flax params -> diffusers state dict (NumPy float32, torch layouts). Inverse of `params_from_state_dict`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        arr = np.asarray(leaf, dtype=np.float32)
        if names[-1] == "kernel":
            arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
        out[_torch_key(names)] = np.ascontiguousarray(arr)
    return out


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


def check_local_dir(path: str | os.PathLike) -> str:
    """`path` if it is a local diffusers AutoencoderKL directory; FileNotFoundError saying what to do if not."""
    path = os.fspath(path)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, n))]
    if not missing:
        return path
    hint = ""
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        hint = (f" {path!r} looks like a model-hub name: imm_jax never downloads. Make a local copy once where "
                f"internet is available (e.g. diffusers' AutoencoderKL.from_pretrained({path!r})"
                ".save_pretrained(DIR)) and pass DIR.")
    raise FileNotFoundError(
        f"VAE path {path!r} is not a local diffusers AutoencoderKL directory: {' and '.join(missing)} not found "
        f"there (it needs {CONFIG_NAME} and {WEIGHTS_NAME}, e.g. a local copy of stabilityai/sd-vae-ft-ema).{hint}")


def load_pretrained(path: str | os.PathLike, dtype: str | Any = "float32"):
    """Loads a local diffusers AutoencoderKL directory -> (AutoencoderKL module, float32 params).

    `path` holds `config.json` and `diffusion_pytorch_model.safetensors` (e.g. a local copy of
    stabilityai/sd-vae-ft-ema); `dtype` is the compute dtype.
    """
    path = check_local_dir(path)
    cfg_file, w_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    with open(cfg_file) as f:
        config = VAEConfig.from_diffusers(json.load(f))
    params = params_from_state_dict(safetensors.numpy.load_file(w_file), config)
    return AutoencoderKL(config, dtype=compute_dtype(dtype)), jax.tree_util.tree_map(jnp.asarray, params)


def save_pretrained(path: str | os.PathLike, config: VAEConfig, params) -> None:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` in the diffusers layout."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config.to_diffusers(), f, indent=2)
    safetensors.numpy.save_file(state_dict_from_params(params), os.path.join(path, WEIGHTS_NAME),
                                metadata={"format": "pt"})
