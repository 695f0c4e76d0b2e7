"""Time-dependent kernels and the grouped MMD estimator (spec §3.2, §3.3, §10).

Samples are flattened to D = prod(trailing dims) elements. With kernel weight w~ = 1/|c_out(s,t)|:
  Laplace  k(x, y) = exp(-w~ max(||x - y||, 1e-8) / D)
  RBF      k(x, y) = exp(-w~ ||x - y||^2 / (2 D))
Distances come from direct differences (the Gram expansion cancels to 0 in float32 for the nearly
identical online/target particles), and sqrt(max(sum_sq, 1e-16)) keeps the gradient finite where two
particles coincide (the diagonal).

The estimator per group is the biased V-statistic over all M^2 pairs, diagonal included (paper Eq. 67):
  MMD^2 = mean_jk [k(yt_j, yt_k) + k(yr_j, yr_k) - 2 k(yt_j, yr_k)].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KERNELS = ("laplace", "rbf")
DIST_EPS = 1e-8


def pairwise_sq_dists(a, b):
    """(M, D), (N, D) -> (M, N) squared Euclidean distances from direct differences, float32."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    diff = a[:, None, :] - b[None, :, :]
    return jnp.sum(diff * diff, axis=-1)


def kernel_matrix(a, b, weight, kernel: str = "laplace"):
    """(M, D), (N, D), scalar weight w~ -> (M, N) kernel values."""
    d = a.shape[-1]
    sq = pairwise_sq_dists(a, b)
    if kernel == "laplace":
        return jnp.exp(-weight * jnp.sqrt(jnp.maximum(sq, DIST_EPS ** 2)) / d)
    if kernel == "rbf":
        return jnp.exp(-weight * sq / (2.0 * d))
    raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")


def _group_terms(y_t, y_r, weight, kernel):
    k_tt = jnp.mean(kernel_matrix(y_t, y_t, weight, kernel))
    k_rr = jnp.mean(kernel_matrix(y_r, y_r, weight, kernel))
    k_tr = jnp.mean(kernel_matrix(y_t, y_r, weight, kernel))
    return k_tt, k_rr, k_tr


def grouped_mmd_terms(y_t, y_r, *, kernel_weight, kernel: str = "laplace"):
    """Mean kernel values per group: (k_tt, k_rr, k_tr), each (G,).

    y_t, y_r: (G, M, ...) particles; kernel_weight: (G,) w~ per group.
    """
    if kernel not in KERNELS:
        raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
    if y_t.shape != y_r.shape or y_t.ndim < 2:
        raise ValueError(f"y_t and y_r must both be (G, M, ...); got {y_t.shape} and {y_r.shape}.")
    g, m = y_t.shape[:2]
    flat_t = y_t.reshape(g, m, -1)
    flat_r = y_r.reshape(g, m, -1)
    weight = jnp.broadcast_to(jnp.asarray(kernel_weight, jnp.float32), (g,))
    return jax.vmap(lambda a, b, w: _group_terms(a, b, w, kernel))(flat_t, flat_r, weight)


def grouped_mmd(y_t, y_r, *, kernel_weight, kernel: str = "laplace"):
    """Per-group squared MMD (V-statistic), shape (G,). See module docstring."""
    k_tt, k_rr, k_tr = grouped_mmd_terms(y_t, y_r, kernel_weight=kernel_weight, kernel=kernel)
    return k_tt + k_rr - 2.0 * k_tr
