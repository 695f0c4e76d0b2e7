"""DDPM++ / NCSN++ UNet (EDM's SongUNet design) with IMM's second time embedding (spec §6.1).

G(x, t_in, s_in, y), NHWC:
  emb_t = map_layer1(SiLU(map_layer0(PE(t_in) + map_label(y) + map_augment(a))))   (a: augmentation label)
  emb_s = map_layer1_s(SiLU(map_layer0_s(PE(s_in))))          (if s_embed)
  emb   = SiLU(emb_t + emb_s)                                 (SiLU(emb_t) without the s path)
  encoder (per level: [down block], num_blocks blocks) -> decoder (in0/in1 or up, num_blocks + 1 blocks
  with skip concatenation) -> GroupNorm -> SiLU -> 3x3 conv (aux_norm / aux_conv).

PE is `[sin, cos]` (EDM positional, endpoint=True, then flipped) or a fixed random Fourier embedding.
Labels: one-hot(y) * sqrt(num_classes) -> map_label, as EDM; the null class y = num_classes is the zero
one-hot, so it contributes only map_label's bias (zero at init): the null class shares the
unconditional path instead of having a learned token.

Blocks (`UNetBlock`): GroupNorm(min(32, C/4) groups, eps 1e-6) -> SiLU -> conv0 (3x3, with up/down
resampling) -> + affine(emb) -> GroupNorm -> SiLU -> dropout -> conv1 (init x1e-5) -> + skip (1x1 conv
when channels change or resampling) -> * skip_scale; optional self-attention (GroupNorm -> qkv 1x1 ->
softmax(q k / sqrt(d)) v -> proj 1x1 (init x1e-5) -> residual -> * skip_scale).

Layout of params (mirrors the torch names; see `imm_jax.io.convert`): top-level `map_label`, `map_layer0`,
`map_layer1`, `map_layer0_s`, `map_layer1_s`; `enc_{R}x{R}_conv|_down|_block{i}|_aux_skip|_aux_residual`;
`dec_{R}x{R}_in0|_in1|_up|_block{i}|_aux_norm|_aux_conv`; inside a block `norm0 conv0 affine norm1 conv1
skip norm2 qkv proj`. Conv kernels are HWIO. The qkv kernel's 3C outputs are ordered (q|k|v, head,
channel), i.e. de-interleaved relative to EDM's (head, channel, q|k|v).

Precision: params float32; convs in model.dtype; GroupNorm statistics, the embedding path, the
per-block affine, and the attention softmax in float32.
"""
from __future__ import annotations

import functools

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.networks import embeddings, layers

# Every knob of the model config, with the DDPM++ CIFAR-10 values of spec §6.1.
DEFAULTS = dict(
    model_channels=128,
    channel_mult=(2, 2, 2),
    channel_mult_emb=4,
    channel_mult_noise=1,
    num_blocks=4,
    attn_resolutions=(16,),
    num_heads=1,
    dropout=0.2,
    embedding_type="positional",    # "positional" (DDPM++) | "fourier" (NCSN++)
    fourier_scale=16.0,
    fourier_seed=0,                  # the fixed Fourier frequencies are a constant of this seed
    encoder_type="standard",        # "standard" | "skip" | "residual"
    decoder_type="standard",        # "standard" | "skip"
    resample_filter=(1, 1),
    skip_scale=math.sqrt(0.5),
    norm_eps=1e-6,
    init_zero_scale=1e-5,            # conv1, proj and aux_conv: xavier x this
    init_attn_scale=math.sqrt(0.2),  # qkv: xavier x this
    s_embed=True,                    # IMM's separate embedding of the second time input
    augment_dim=0,                   # width of EDM's augmentation label (map_augment; 0 = no such input)
    remat=False,                     # rematerialise blocks in the backward pass (memory for compute)
)

PRESETS = {
    "ddpmpp": {},
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, resample_filter=(1, 3, 3, 1),
                   encoder_type="residual"),
}


def check_config(cfg) -> None:
    """Raises ValueError with a fix-it message for an inconsistent UNet model config."""
    if cfg.embedding_type not in ("positional", "fourier"):
        raise ValueError(f"model.embedding_type must be 'positional' or 'fourier', got {cfg.embedding_type!r}")
    if cfg.encoder_type not in ("standard", "skip", "residual"):
        raise ValueError(f"model.encoder_type must be standard|skip|residual, got {cfg.encoder_type!r}")
    if cfg.decoder_type not in ("standard", "skip"):
        raise ValueError(f"model.decoder_type must be standard|skip, got {cfg.decoder_type!r}")
    levels = len(cfg.channel_mult)
    if cfg.image_size % (2 ** (levels - 1)):
        raise ValueError(f"model.image_size {cfg.image_size} must be divisible by 2^(len(channel_mult)-1) "
                         f"= {2 ** (levels - 1)}")
    for mult in cfg.channel_mult:
        c = cfg.model_channels * mult
        if c % cfg.num_heads or c // min(32, c // 4) * min(32, c // 4) != c:
            raise ValueError(f"channel count {c} (model_channels x channel_mult) must be divisible by "
                             f"num_heads {cfg.num_heads} and by its GroupNorm groups min(32, C/4)")
    layers.compute_dtype(cfg.dtype)


# ------------------------------------------------------------------------------------------ resampling

def _filter_2d(resample_filter: Sequence[int]) -> np.ndarray:
    f = np.asarray(resample_filter, np.float64)
    return np.outer(f, f) / f.sum() ** 2


def downsample(x: jax.Array, resample_filter: Sequence[int], pad: int | None = None) -> jax.Array:
    """Depthwise stride-2 filtering by f f^T / sum(f)^2 (EDM down). x NHWC -> (N, H/2, W/2, C)."""
    f = tuple(resample_filter)
    pad = (len(f) - 1) // 2 if pad is None else pad
    n, h, w, c = x.shape
    if f == (1, 1) and pad == 0:
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    k = jnp.asarray(_filter_2d(f), x.dtype)[:, :, None, None] * jnp.ones((1, 1, 1, c), x.dtype)
    return jax.lax.conv_general_dilated(x, k, (2, 2), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def upsample(x: jax.Array, resample_filter: Sequence[int]) -> jax.Array:
    """Depthwise stride-2 transposed filtering by 4 f f^T / sum(f)^2 (EDM up). -> (N, 2H, 2W, C)."""
    f = tuple(resample_filter)
    pad = (len(f) - 1) // 2
    n, h, w, c = x.shape
    if f == (1, 1):
        return jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
    kern = 4.0 * _filter_2d(f)[::-1, ::-1]
    k = jnp.asarray(kern.copy(), x.dtype)[:, :, None, None] * jnp.ones((1, 1, 1, c), x.dtype)
    edge = len(f) - 1 - pad
    return jax.lax.conv_general_dilated(x, k, (1, 1), [(edge, edge), (edge, edge)], lhs_dilation=(2, 2),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


# ------------------------------------------------------------------------------------------ layers

def _scaled_xavier(scale: float):
    base = nn.initializers.xavier_uniform()

    def init(key, shape, dtype=jnp.float32):
        return base(key, shape, dtype) * scale
    return init


class Conv2d(nn.Module):
    """EDM Conv2d: optional up/down resampling, then a k x k conv ('same' padding); kernel HWIO.

    kernel=0 means resampling only (no params). `fused_down` is EDM's fused_resample for down=True:
    conv with padding k//2 + f_pad, then the stride-2 filter without padding.
    """
    features: int
    kernel: int
    dtype: Any
    up: bool = False
    down: bool = False
    resample_filter: Sequence[int] = (1, 1)
    fused_down: bool = False
    init_scale: float = 1.0
    backend: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        f_pad = (len(self.resample_filter) - 1) // 2
        if self.kernel == 0:
            if self.up:
                x = upsample(x, self.resample_filter)
            if self.down:
                x = downsample(x, self.resample_filter)
            return x
        k = self.kernel
        w = self.param("kernel", _scaled_xavier(self.init_scale), (k, k, x.shape[-1], self.features),
                       jnp.float32).astype(self.dtype)
        b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        if self.fused_down:
            if not self.down:
                raise ValueError("fused resampling is implemented for down=True only")
            x = self._conv(x, w, k // 2 + f_pad)
            return downsample(x, self.resample_filter, pad=0) + b
        if self.up:
            x = upsample(x, self.resample_filter)
        if self.down:
            x = downsample(x, self.resample_filter)
        return self._conv(x, w, k // 2) + b

    def _conv(self, x, w, pad):
        if w.shape[0] == 1 and pad == 0:
            return layers.linear(x, w[0, 0], jnp.zeros(w.shape[-1:], w.dtype), self.backend)
        return layers.conv2d(x, w, pad, self.backend)


class GroupNorm(nn.Module):
    """EDM GroupNorm: min(32, C // 4) groups, affine; statistics in float32; returns float32."""
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return layers.group_norm(x, scale, bias, min(32, c // 4), self.eps)


class UNetBlock(nn.Module):
    """SongUNet residual block with additive embedding and optional self-attention (see module doc)."""
    out_channels: int
    dtype: Any
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int = 1
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-6
    resample_filter: Sequence[int] = (1, 1)
    init_zero_scale: float = 1e-5
    init_attn_scale: float = 1.0
    backend: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        cout, dt = self.out_channels, self.dtype
        Conv2d_ = functools.partial(Conv2d, backend=self.backend)  # noqa: N806
        orig = x
        h = nn.silu(GroupNorm(self.eps, name="norm0")(x))
        h = Conv2d_(cout, 3, dt, up=self.up, down=self.down, resample_filter=self.resample_filter,
                    name="conv0")(h)
        shift = embeddings.dense32(cout, "affine")(emb)
        h = nn.silu(GroupNorm(self.eps, name="norm1")(h.astype(jnp.float32) + shift[:, None, None, :]))
        h = nn.Dropout(self.dropout, deterministic=not train)(h.astype(dt))
        h = Conv2d_(cout, 3, dt, init_scale=self.init_zero_scale, name="conv1")(h)
        if cout != x.shape[-1] or self.up or self.down:
            orig = Conv2d_(cout, 1, dt, up=self.up, down=self.down, resample_filter=self.resample_filter,
                           name="skip")(orig)
        x = (h + orig.astype(dt)) * self.skip_scale

        if self.attention:
            n, hh, ww, c = x.shape
            heads = self.num_heads
            qkv = Conv2d_(3 * c, 1, dt, init_scale=self.init_attn_scale, name="qkv")(
                GroupNorm(self.eps, name="norm2")(x))
            qkv = qkv.reshape(n, hh * ww, 3, heads, c // heads)
            a = layers.attention(qkv, self.backend).reshape(n, hh, ww, c)
            a = Conv2d_(c, 1, dt, init_scale=self.init_zero_scale, name="proj")(a)
            x = (a + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """DDPM++/NCSN++ UNet; fields are the model config values (see DEFAULTS)."""
    image_size: int
    in_channels: int
    num_classes: int
    model_channels: int
    channel_mult: Sequence[int]
    channel_mult_emb: int
    channel_mult_noise: int
    num_blocks: int
    attn_resolutions: Sequence[int]
    num_heads: int
    dropout: float
    embedding_type: str
    fourier_scale: float
    fourier_seed: int
    encoder_type: str
    decoder_type: str
    resample_filter: Sequence[int]
    skip_scale: float
    norm_eps: float
    init_zero_scale: float
    init_attn_scale: float
    s_embed: bool
    augment_dim: int
    remat: bool
    dtype: str
    backend: str = "plain"  # execution path of the layers (imm_jax.networks.layers)

    def _noise_embedding(self, t: jax.Array, seed_offset: int) -> jax.Array:
        width = self.model_channels * self.channel_mult_noise
        if self.embedding_type == "positional":
            return embeddings.sinusoidal_embedding(t, width, endpoint=True, sin_first=True)
        freqs = embeddings.fourier_frequencies(width, self.fourier_scale, self.fourier_seed + seed_offset)
        return embeddings.fourier_embedding(t, freqs, sin_first=True)

    @property
    def num_cond_layers(self) -> int:
        """UNetBlocks, each reading the embedding, in call order (encoder, then decoder)."""
        levels, nb = len(self.channel_mult), self.num_blocks
        return levels * nb + (levels - 1) + 2 + (levels - 1) + levels * (nb + 1)

    @nn.compact
    def __call__(self, x, t_in, s_in, labels=None, train: bool = False, cond_override=None,
                 cond_offset=None, augment_labels=None):
        """G (B, H, W, C) float32; see the module docstring.

        augment_labels: None (= no augmentation, as when sampling) or (B, augment_dim) float32, the labels of
        `imm_jax.training.augment`; with augment_dim > 0 they enter the t path beside the class label
        (EDM's `map_augment`, a bias-free linear layer, so a zero label equals none).

        cond_override: None (default path), or float32 (L, E) / (L, B, E) with L = `num_cond_layers`,
        E = model_channels * channel_mult_emb: the l-th UNetBlock (call order) reads SiLU(cond_override[l])
        instead of the shared SiLU(emb_t + emb_s); the embedding MLPs are then skipped. Unconditional
        models only (the label enters inside the t MLP, so it cannot be kept apart from the time part).
        cond_offset: same shapes, additive instead: block l reads SiLU(emb_t + emb_s + cond_offset[l])
        (labels, if any, stay inside emb_t as before); a zero offset reproduces the default path exactly.
        At most one of the two. The pre-SiLU emb_t + emb_s (B, E) is sown as ("intermediates", "time_cond")
        when that collection is mutable.
        """
        b, h, w, c = x.shape
        if (h, w, c) != (self.image_size, self.image_size, self.in_channels):
            raise ValueError(f"UNet expects NHWC input (B, {self.image_size}, {self.image_size}, "
                             f"{self.in_channels}) from model.image_size/in_channels, got {x.shape}")
        labels = embeddings.check_labels(labels, self.num_classes, b, "UNet")
        layers.check_backend(self.backend)
        dt = layers.compute_dtype(self.dtype)
        Conv2d_ = functools.partial(Conv2d, backend=self.backend)  # noqa: N806
        emb_ch = self.model_channels * self.channel_mult_emb
        mc = self.model_channels

        # Conditioning path, float32 / HIGHEST.
        if cond_override is not None and cond_offset is not None:
            raise ValueError("UNet: pass cond_override or cond_offset, not both")
        if cond_override is None:
            emb = self._noise_embedding(t_in, 0)
            if self.num_classes:
                onehot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)  # null -> zeros
                emb = emb + embeddings.dense32(emb.shape[-1], "map_label")(onehot * np.sqrt(self.num_classes))
            if self.augment_dim:
                aug = jnp.zeros((b, self.augment_dim), jnp.float32) if augment_labels is None else augment_labels
                if aug.shape != (b, self.augment_dim):
                    raise ValueError(f"UNet: augment_labels must be (batch, model.augment_dim) = "
                                     f"{(b, self.augment_dim)}, got {aug.shape}")
                emb = emb + embeddings.dense32(emb.shape[-1], "map_augment", use_bias=False)(aug.astype(jnp.float32))
            elif augment_labels is not None:
                raise ValueError("UNet: augment_labels given but model.augment_dim = 0; set model.augment_dim to "
                                 "the augmentation label width (9 for EDM's CIFAR-10 pipeline).")
            emb = embeddings.dense32(emb_ch, "map_layer1")(nn.silu(embeddings.dense32(emb_ch, "map_layer0")(emb)))
            if self.s_embed:
                emb_s = self._noise_embedding(s_in, 1)
                emb_s = embeddings.dense32(emb_ch, "map_layer0_s")(emb_s)
                emb = emb + embeddings.dense32(emb_ch, "map_layer1_s")(nn.silu(emb_s))
            self.sow("intermediates", "time_cond", emb)
            overrides = None
            if cond_offset is not None:
                overrides = emb[None] + embeddings.check_cond_override(cond_offset, self.num_cond_layers, b,
                                                                       emb_ch, "UNet")
            emb = embeddings.silu_materialised(emb, self.backend)
        else:
            if self.num_classes:
                raise ValueError("UNet: cond_override is supported for unconditional models only "
                                 "(num_classes == 0): the label enters the time MLP (map_label) and cannot be "
                                 "kept apart from the time part.")
            overrides = embeddings.check_cond_override(cond_override, self.num_cond_layers, b, emb_ch, "UNet")
            emb = None
        layer = [0]

        def emb_next():  # the embedding the next UNetBlock (in call order) reads
            layer[0] += 1
            return emb if overrides is None else embeddings.silu_materialised(overrides[layer[0] - 1],
                                                                              self.backend)

        block = dict(dtype=dt, num_heads=self.num_heads, dropout=self.dropout, skip_scale=self.skip_scale,
                     eps=self.norm_eps, resample_filter=tuple(self.resample_filter),
                     init_zero_scale=self.init_zero_scale, init_attn_scale=self.init_attn_scale,
                     backend=self.backend)
        rf = tuple(self.resample_filter)
        # static_argnums counts `self` as 0: (x, emb, train) -> train is 3.
        UNetBlock_ = nn.remat(UNetBlock, static_argnums=(3,)) if self.remat else UNetBlock  # noqa: N806

        # Encoder.
        skips = []
        aux = x.astype(dt)
        hcur = x
        cout = self.in_channels
        for level, mult in enumerate(self.channel_mult):
            res = self.image_size >> level
            tag = f"enc_{res}x{res}"
            if level == 0:
                cout = mc
                hcur = Conv2d_(cout, 3, dt, name=f"{tag}_conv")(hcur)
                skips.append(hcur)
            else:
                hcur = UNetBlock_(cout, down=True, name=f"{tag}_down", **block)(hcur, emb_next(), train)
                skips.append(hcur)
                if self.encoder_type == "skip":
                    aux = Conv2d_(0, 0, dt, down=True, resample_filter=rf, name=f"{tag}_aux_down")(aux)
                    hcur = skips[-1] = hcur + Conv2d_(cout, 1, dt, name=f"{tag}_aux_skip")(aux)
                elif self.encoder_type == "residual":
                    res_out = Conv2d_(cout, 3, dt, down=True, resample_filter=rf, fused_down=True,
                                     name=f"{tag}_aux_residual")(aux)
                    hcur = skips[-1] = aux = (hcur + res_out) / math.sqrt(2.0)
            for idx in range(self.num_blocks):
                cout = mc * mult
                hcur = UNetBlock_(cout, attention=res in self.attn_resolutions, name=f"{tag}_block{idx}",
                                 **block)(hcur, emb_next(), train)
                skips.append(hcur)

        # Decoder.
        aux = None
        levels = len(self.channel_mult)
        for level in reversed(range(levels)):
            mult = self.channel_mult[level]
            res = self.image_size >> level
            tag = f"dec_{res}x{res}"
            if level == levels - 1:
                hcur = UNetBlock_(cout, attention=True, name=f"{tag}_in0", **block)(hcur, emb_next(), train)
                hcur = UNetBlock_(cout, name=f"{tag}_in1", **block)(hcur, emb_next(), train)
            else:
                hcur = UNetBlock_(cout, up=True, name=f"{tag}_up", **block)(hcur, emb_next(), train)
            for idx in range(self.num_blocks + 1):
                hcur = jnp.concatenate([hcur, skips.pop().astype(hcur.dtype)], axis=-1)
                cout = mc * mult
                attn = idx == self.num_blocks and res in self.attn_resolutions
                hcur = UNetBlock_(cout, attention=attn, name=f"{tag}_block{idx}", **block)(hcur, emb_next(), train)
            if self.decoder_type == "skip" or level == 0:
                if self.decoder_type == "skip" and level < levels - 1:
                    aux = Conv2d_(0, 0, dt, up=True, resample_filter=rf, name=f"{tag}_aux_up")(aux)
                tmp = nn.silu(GroupNorm(1e-6, name=f"{tag}_aux_norm")(hcur))
                tmp = Conv2d_(self.in_channels, 3, dt, init_scale=self.init_zero_scale,
                             name=f"{tag}_aux_conv")(tmp)
                aux = tmp if aux is None else tmp + aux
        assert layer[0] == self.num_cond_layers, (layer[0], self.num_cond_layers)
        return aux.astype(jnp.float32)


def build(model_config, backend: str = "plain") -> SongUNet:
    """SongUNet from a `unet_config()`-style ConfigDict, on the `backend` execution path."""
    check_config(model_config)
    kw = {k: model_config.get(k, v) for k, v in DEFAULTS.items()}  # configs saved before a field existed
    kw["channel_mult"] = tuple(kw["channel_mult"])
    kw["attn_resolutions"] = tuple(kw["attn_resolutions"])
    kw["resample_filter"] = tuple(kw["resample_filter"])
    return SongUNet(image_size=int(model_config.image_size), in_channels=int(model_config.in_channels),
                    num_classes=int(model_config.num_classes), dtype=str(model_config.dtype),
                    backend=backend, **kw)
