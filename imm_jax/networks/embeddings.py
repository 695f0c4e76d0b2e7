"""Time and label embeddings shared by the backbones.

Everything here runs in float32 whatever the trunk dtype: IMM must tell apart times t and r that differ
by a few float32 ulps at t ~ 1 (spec §10), so the sinusoids and the time MLPs use float32 compute with
`jax.lax.Precision.HIGHEST` (on TPU the default float32 matmul is a single bf16 pass).

Two sinusoid conventions exist in the official code (spec §13.11) and both are provided:
  * DDPM++ (EDM `PositionalEmbedding`, endpoint=True, then flipped): `[sin, cos]`,
    freqs_i = (1/max_positions)^(i/(half-1)).
  * DiT (`TimestepEmbedder`): `[cos, sin]`, freqs_i = (1/max_period)^(i/half).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def sinusoid_frequencies(num_channels: int, *, max_positions: float = 10000.0,
                         endpoint: bool = False) -> np.ndarray:
    """Frequencies (num_channels // 2,) float32: (1/max_positions)^(i / (half - endpoint))."""
    if num_channels % 2 or num_channels < 2 + 2 * int(endpoint):
        raise ValueError(f"sinusoid embedding size must be even and >= {2 + 2 * int(endpoint)}, "
                         f"got {num_channels}")
    half = num_channels // 2
    exponents = np.arange(half, dtype=np.float64) / (half - (1 if endpoint else 0))
    return ((1.0 / max_positions) ** exponents).astype(np.float32)


def sinusoidal_embedding(x: jax.Array, num_channels: int, *, max_positions: float = 10000.0,
                         endpoint: bool = False, sin_first: bool = False) -> jax.Array:
    """Sinusoidal features of scalar inputs.

    Args:
      x: (B,) time inputs (e.g. 1000 t), any float dtype; computed in float32.
      num_channels: output width (even).
      endpoint: EDM's `endpoint` flag (last frequency exactly 1/max_positions).
      sin_first: `[sin, cos]` (DDPM++ after its flip) instead of `[cos, sin]` (DiT).
    Returns:
      (B, num_channels) float32.
    """
    freqs = jnp.asarray(sinusoid_frequencies(num_channels, max_positions=max_positions,
                                             endpoint=endpoint))
    args = x.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = (jnp.sin(args), jnp.cos(args)) if sin_first else (jnp.cos(args), jnp.sin(args))
    return jnp.concatenate(parts, axis=-1)


def fourier_embedding(x: jax.Array, freqs: np.ndarray, *, sin_first: bool = False) -> jax.Array:
    """Random-Fourier features (NCSN++): `[cos, sin](2 pi x freqs)` (or `[sin, cos]`), float32 (B, 2F)."""
    args = x.astype(jnp.float32)[:, None] * (2.0 * np.pi * jnp.asarray(freqs, jnp.float32))[None, :]
    parts = (jnp.sin(args), jnp.cos(args)) if sin_first else (jnp.cos(args), jnp.sin(args))
    return jnp.concatenate(parts, axis=-1)


def fourier_frequencies(num_channels: int, scale: float, seed: int) -> np.ndarray:
    """Fixed random frequencies (num_channels // 2,) for `fourier_embedding`.

    EDM stores these as a buffer drawn at construction. Here they are a deterministic constant of
    (seed, scale) so that they stay outside the trainable params (no weight decay, no optimizer state).
    """
    if num_channels % 2:
        raise ValueError(f"fourier embedding size must be even, got {num_channels}")
    return (np.random.RandomState(seed).standard_normal(num_channels // 2) * scale).astype(np.float32)


def dense32(features: int, name: str, *, kernel_init: Callable | None = None,
            use_bias: bool = True) -> nn.Dense:
    """A float32, highest-precision Dense layer for the conditioning path."""
    return nn.Dense(features, use_bias=use_bias, dtype=jnp.float32, param_dtype=jnp.float32,
                    precision=HIGHEST,
                    kernel_init=kernel_init or nn.initializers.xavier_uniform(), name=name)


class TimestepEmbedder(nn.Module):
    """DiT time embedder: `[cos, sin]` sinusoid (frequency_size) -> Linear -> SiLU -> Linear.

    Param names follow the official checkpoints: `mlp_0` and `mlp_2` (torch `mlp.0`, `mlp.2`).
    Input (B,) time inputs; output (B, hidden_size) float32.
    """
    hidden_size: int
    frequency_size: int = 256
    max_period: float = 10000.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = nn.initializers.normal(stddev=0.02)
        h = sinusoidal_embedding(t, self.frequency_size, max_positions=self.max_period)
        h = dense32(self.hidden_size, "mlp_0", kernel_init=init)(h)
        h = nn.silu(h)
        return dense32(self.hidden_size, "mlp_2", kernel_init=init)(h)


class LabelEmbedder(nn.Module):
    """DiT label table with num_classes + 1 rows; row `num_classes` is the learned null (CFG) token.

    Input (B,) int labels in [0, num_classes]; output (B, hidden_size) float32.
    """
    num_classes: int
    hidden_size: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        table = self.param("embedding_table", nn.initializers.normal(stddev=0.02),
                           (self.num_classes + 1, self.hidden_size), jnp.float32)
        return jnp.take(table, labels.astype(jnp.int32), axis=0)


def check_labels(labels, num_classes: int, batch: int, model: str):
    """Validates the labels argument against the model's num_classes; returns int32 labels or None."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError(f"{model}: labels were given but model.num_classes == 0 (unconditional); "
                             "pass labels=None or set model.num_classes")
        return None
    if labels is None:
        raise ValueError(f"{model}: model.num_classes == {num_classes} needs labels of shape ({batch},); "
                         f"use index {num_classes} for the null (unconditional) class")
    labels = jnp.asarray(labels)
    if labels.shape != (batch,):
        raise ValueError(f"{model}: labels must have shape ({batch},) (integer class ids), "
                         f"got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{model}: labels must be integer class ids (null = {num_classes}), "
                         f"got dtype {labels.dtype}; convert one-hot labels with argmax")
    return labels.astype(jnp.int32)


def check_cond_override(cond_override, num_layers: int, batch: int, width: int, model: str) -> jax.Array:
    """Validates a per-layer conditioning override; returns it float32 as (L, B, width).

    Accepted shapes: (L, width), one vector per layer shared by the batch, or (L, B, width). Shared
    vectors are broadcast over the batch so that every layer sees the same shapes as on the default path
    (a (1, width) matmul may round differently from a (B, width) one).
    """
    e = jnp.asarray(cond_override)
    if e.ndim == 2:
        e = e[:, None, :]
    if e.ndim != 3 or e.shape[0] != num_layers or e.shape[2] != width or e.shape[1] not in (1, batch):
        raise ValueError(f"{model}: cond_override must have shape ({num_layers}, {width}) or "
                         f"({num_layers}, {batch}, {width}) (one conditioning vector per layer that reads "
                         f"it), got {jnp.shape(cond_override)}")
    return jnp.broadcast_to(e.astype(jnp.float32), (num_layers, batch, width))


def silu_materialised(c: jax.Array, backend: str = "plain") -> jax.Array:
    """SiLU of a materialised conditioning vector (the shared one, or one layer's own).

    On the "cpu" path an optimisation barrier comes first: XLA:CPU evaluates exp/divide with approximations
    whose last bits depend on how the surrounding elementwise ops are fused, and the barrier gives this SiLU
    the same fusion on the default path and on the per-layer (`cond_override` / `cond_offset`) path, so
    equal inputs give bit-equal outputs there. Other backends fuse freely.
    """
    return nn.silu(jax.lax.optimization_barrier(c) if backend == "cpu" else c)
