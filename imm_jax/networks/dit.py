"""DiT (Peebles & Xie) with IMM's two-time conditioning (spec §6.2).

G(x, t_in, s_in, y) for NHWC latents:
  tokens = PatchEmbed(x) + pos_embed                  (pos_embed: fixed 2-D sin-cos, a constant, not a param)
  c      = t_embedder(t_in) + s_embedder(s_in) + y_embedder(y)       (float32)
  tokens = adaLN-Zero blocks(tokens, c)
  out    = FinalLayer(tokens, c) -> unpatchify -> (B, H, W, C) float32

Sizes by name, `variant` = "{S,B,L,XL}/{2,4,8}"; explicit hidden_size/depth/num_heads/patch_size override.
Param names mirror the official torch names so the converter is a table (see `imm_jax.io.convert`):
  x_embedder.kernel (p, p, C, D) + bias; t_embedder/s_embedder.mlp_0|mlp_2; y_embedder.embedding_table
  (num_classes + 1, D); blocks_i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation};
  final_layer.{adaLN_modulation, linear}.

Precision: params float32; tokens, attention and MLP matmuls in `model.dtype`; LayerNorm statistics,
modulation (shift/scale/gate), softmax and the whole conditioning path in float32.
"""
from __future__ import annotations

import functools

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.networks import embeddings, layers

# name -> (depth, hidden_size, num_heads), as in DiT Table 1.
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)


def parse_variant(variant: str) -> dict[str, int]:
    """"XL/2" -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)."""
    try:
        size, patch = variant.split("/")
        depth, hidden, heads = DIT_SIZES[size]
        patch = int(patch)
        if patch not in PATCH_SIZES:
            raise KeyError(patch)
    except (ValueError, KeyError):
        raise ValueError(f"model.variant must look like 'S/2' with size in {list(DIT_SIZES)} and patch in "
                         f"{list(PATCH_SIZES)}, got {variant!r}") from None
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)


def pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT fixed 2-D sin-cos position embedding, (grid_size**2, embed_dim) float32.

    Token index i*grid_size + j (row i, column j) gets [sin(j w), cos(j w), sin(i w), cos(i w)],
    each block embed_dim/4 wide, w_k = 10000^(-k / (embed_dim/4)).
    """
    if embed_dim % 4:
        raise ValueError(f"DiT hidden_size must be divisible by 4 for the 2-D position embedding, "
                         f"got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    pos = np.arange(grid_size, dtype=np.float64)
    ang = pos[:, None] * omega[None, :]                              # (G, quarter)
    one_d = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)       # (G, embed_dim/2)
    col = np.broadcast_to(one_d[None, :, :], (grid_size, grid_size, embed_dim // 2))
    row = np.broadcast_to(one_d[:, None, :], (grid_size, grid_size, embed_dim // 2))
    return np.concatenate([col, row], axis=-1).reshape(grid_size * grid_size, embed_dim).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x (B, N, D) * (1 + scale) + shift, with shift/scale (B, D)."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


class Attention(nn.Module):
    """timm Attention(qkv_bias=True): fused qkv Linear, softmax(QK^T/sqrt(d)) V, proj Linear."""
    num_heads: int
    dtype: Any
    backend: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        dense = functools.partial(layers.Dense, dtype=self.dtype, kernel_init=_xavier, backend=self.backend)
        qkv = dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        out = layers.attention(qkv, self.backend).reshape(b, n, d)
        return dense(d, name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""
    hidden: int
    dtype: Any
    backend: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        dense = functools.partial(layers.Dense, dtype=self.dtype, kernel_init=_xavier, backend=self.backend)
        h = nn.gelu(dense(self.hidden, name="fc1")(x), approximate=True)
        return dense(d, name="fc2")(h)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> Linear, as reshape + matmul (kernel stored HWIO (p, p, C, D)).

    x (B, H, W, C) -> (B, (H/p) * (W/p), D) in `dtype`, tokens in row-major patch order.
    """
    patch_size: int
    hidden_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p, d = self.patch_size, self.hidden_size
        # Xavier over the flattened (p*p*C, D) matrix, as DiT's initialize_weights does.
        kernel = self.param("kernel", nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3), (p, p, c, d), jnp.float32)
        bias = self.param("bias", _zeros, (d,), jnp.float32)
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        return jnp.dot(patches, kernel.reshape(p * p * c, d).astype(self.dtype)) + bias.astype(self.dtype)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. x (B, N, D) trunk dtype; c_act = SiLU(c) (B, D) float32."""
    num_heads: int
    mlp_ratio: float
    dtype: Any
    backend: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array, c_act: jax.Array) -> jax.Array:
        d = x.shape[-1]
        mod = embeddings.dense32(6 * d, "adaLN_modulation", kernel_init=_zeros)(c_act)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(layers.layer_norm(x), shift_msa, scale_msa).astype(self.dtype)
        h = Attention(self.num_heads, self.dtype, self.backend, name="attn")(h)
        x = x + (gate_msa[:, None, :] * h).astype(x.dtype)
        h = modulate(layers.layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
        h = Mlp(int(d * self.mlp_ratio), self.dtype, self.backend, name="mlp")(h)
        return x + (gate_mlp[:, None, :] * h).astype(x.dtype)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear to p*p*C_out, all zero-initialised; float32 output."""
    patch_size: int
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, c_act: jax.Array) -> jax.Array:
        d = x.shape[-1]
        mod = embeddings.dense32(2 * d, "adaLN_modulation", kernel_init=_zeros)(c_act)
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = modulate(layers.layer_norm(x), shift, scale)
        return embeddings.dense32(self.patch_size ** 2 * self.out_channels, "linear",
                                  kernel_init=_zeros)(h)


class DiT(nn.Module):
    """IMM DiT backbone; see the module docstring. Fields are the resolved model config values."""
    image_size: int
    in_channels: int
    num_classes: int
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    s_embed: bool = True
    dtype: str = "float32"
    remat: bool = False
    backend: str = "plain"  # execution path of the layers (imm_jax.networks.layers)

    def setup_checks(self, x: jax.Array):
        b, h, w, c = x.shape
        if (h, w, c) != (self.image_size, self.image_size, self.in_channels):
            raise ValueError(f"DiT expects NHWC input (B, {self.image_size}, {self.image_size}, "
                             f"{self.in_channels}) from model.image_size/in_channels, got {x.shape}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def num_cond_layers(self) -> int:
        """Layers that read the conditioning vector: the `depth` blocks, then the final layer."""
        return self.depth + 1

    @nn.compact
    def __call__(self, x, t_in, s_in, labels=None, train: bool = False, cond_override=None,
                 cond_offset=None):
        """G (B, H, W, C) float32; see the module docstring.

        cond_override: None (default path), or float32 (L, D) / (L, B, D) with L = `num_cond_layers`,
        D = hidden_size: layer l reads SiLU(cond_override[l] + y_embedder(labels)) instead of
        SiLU(t_embedder(t_in) + s_embedder(s_in) + y_embedder(labels)); the time embedders are then
        skipped (t_in/s_in unused).
        cond_offset: same shapes, additive instead: layer l reads
        SiLU(t_embedder(t_in) + s_embedder(s_in) + cond_offset[l] + y_embedder(labels)); a zero offset
        reproduces the default path exactly. At most one of the two.
        The time part t_embedder + s_embedder is sown as ("intermediates", "time_cond") (B, D) when that
        collection is mutable.
        """
        del train  # DiT uses no dropout (labels are dropped outside the model).
        self.setup_checks(x)
        layers.check_backend(self.backend)
        dtype = layers.compute_dtype(self.dtype)
        b = x.shape[0]
        p, d = self.patch_size, self.hidden_size
        g = self.image_size // p
        labels = embeddings.check_labels(labels, self.num_classes, b, "DiT")

        tokens = PatchEmbed(p, d, dtype, name="x_embedder")(x)
        tokens = tokens + jnp.asarray(pos_embed_2d(d, g), dtype)[None]

        if cond_override is not None and cond_offset is not None:
            raise ValueError("DiT: pass cond_override or cond_offset, not both")
        if cond_override is None:
            c = embeddings.TimestepEmbedder(d, name="t_embedder")(t_in)
            if self.s_embed:
                c = c + embeddings.TimestepEmbedder(d, name="s_embedder")(s_in)
            self.sow("intermediates", "time_cond", c)
        if cond_override is None and cond_offset is None:
            if self.num_classes:
                c = c + embeddings.LabelEmbedder(self.num_classes, d, name="y_embedder")(labels)
            c_act = embeddings.silu_materialised(c, self.backend)
            layer_conds = [c_act] * (self.depth + 1)
        else:
            if cond_override is not None:
                e = embeddings.check_cond_override(cond_override, self.num_cond_layers, b, d, "DiT")
                times = [e[i] for i in range(self.depth + 1)]
            else:
                e = embeddings.check_cond_override(cond_offset, self.num_cond_layers, b, d, "DiT")
                times = [c + e[i] for i in range(self.depth + 1)]
            y = (embeddings.LabelEmbedder(self.num_classes, d, name="y_embedder")(labels)
                 if self.num_classes else None)
            layer_conds = [embeddings.silu_materialised(ti if y is None else ti + y, self.backend)
                           for ti in times]

        block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            tokens = block_cls(self.num_heads, self.mlp_ratio, dtype, self.backend, name=f"blocks_{i}")(
                tokens, layer_conds[i])

        out = FinalLayer(p, self.in_channels, name="final_layer")(tokens, layer_conds[self.depth])
        out = out.reshape(b, g, g, p, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, self.image_size, self.image_size, self.in_channels).astype(jnp.float32)


def resolve_dims(model_config) -> dict[str, Any]:
    """Resolved DiT dims: the variant's values, overridden by any explicit non-None field."""
    dims = parse_variant(model_config.variant) if model_config.get("variant") else {}
    for key in ("hidden_size", "depth", "num_heads", "patch_size"):
        value = model_config.get(key)
        if value is not None:
            dims[key] = int(value)
    missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if k not in dims]
    if missing:
        raise ValueError(f"DiT config needs model.variant (e.g. 'S/2') or explicit {missing}")
    return dims


def build(model_config, backend: str = "plain") -> DiT:
    """DiT module from a `dit_config()`-style ConfigDict, on the `backend` execution path."""
    dims = resolve_dims(model_config)
    return DiT(image_size=int(model_config.image_size), in_channels=int(model_config.in_channels),
               num_classes=int(model_config.num_classes), mlp_ratio=float(model_config.mlp_ratio),
               s_embed=bool(model_config.s_embed), dtype=str(model_config.dtype),
               remat=bool(model_config.get("remat", False)), backend=backend, **dims)

