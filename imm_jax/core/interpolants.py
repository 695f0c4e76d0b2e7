"""Noise schedules and the DDIM interpolant (spec §1).

Two schedules, named by string:
  "fm"      OT flow matching:  alpha_t = 1 - t,          sigma_t = t
  "cosine"  trigonometric:     alpha_t = cos(pi t / 2),  sigma_t = sin(pi t / 2)

Times t are scalars or arrays in [0, 1]; every function broadcasts elementwise. JAX arrays (and
tracers) are computed with jax.numpy in their own dtype; Python floats and NumPy arrays with NumPy in
float64, which is what time grids and constants use. Data-shaped helpers take per-sample times of shape (B,)
and broadcast them over the trailing axes of x (B, ...).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("fm", "cosine")


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES} "
                         "('fm' = OT flow matching, 'cosine' = trigonometric).")
    return schedule


def _xp(*values):
    return jnp if any(isinstance(v, jax.Array) for v in values) else np


def alpha_sigma(t, schedule: str):
    """(alpha_t, sigma_t) of the schedule at times t."""
    check_schedule(schedule)
    xp = _xp(t)
    if schedule == "fm":
        return 1.0 - t, t
    half_pi_t = 0.5 * math.pi * t
    return xp.cos(half_pi_t), xp.sin(half_pi_t)


def logsnr(t, schedule: str):
    """lambda_t = 2 log(alpha_t / sigma_t); +inf at t = 0, -inf at t = 1 (fm)."""
    check_schedule(schedule)
    xp = _xp(t)
    if schedule == "fm":
        return 2.0 * (xp.log1p(-t) - xp.log(t))
    return -2.0 * xp.log(xp.tan(0.5 * math.pi * t))


def eta(t, schedule: str):
    """eta_t = sigma_t / alpha_t (noise-to-signal ratio), increasing in t."""
    check_schedule(schedule)
    xp = _xp(t)
    if schedule == "fm":
        return t / (1.0 - t)
    return xp.tan(0.5 * math.pi * t)


def t_from_eta(eta_value, schedule: str):
    """Inverse of `eta`: the time with sigma/alpha = eta_value (eta >= 0)."""
    check_schedule(schedule)
    xp = _xp(eta_value)
    if schedule == "fm":
        return eta_value / (1.0 + eta_value)
    return xp.arctan(eta_value) / (0.5 * math.pi)


def t_from_logsnr(lam, schedule: str):
    """Inverse of `logsnr`."""
    check_schedule(schedule)
    xp = _xp(lam)
    if schedule == "fm":
        return 1.0 / (1.0 + xp.exp(0.5 * lam))
    return xp.arctan(xp.exp(-0.5 * lam)) / (0.5 * math.pi)


def signal_noise_cross(s, t, schedule: str):
    """alpha_s sigma_t - alpha_t sigma_s, in a form exact for nearby s and t.

    fm: t - s;  cosine: sin(pi (t - s) / 2). Zero at s = t, positive for s < t.
    """
    check_schedule(schedule)
    xp = _xp(s, t)
    if schedule == "fm":
        return t - s
    return xp.sin(0.5 * math.pi * (t - s))


def expand_like(v, x):
    """Reshape per-sample values v (B,) to broadcast against x (B, ...)."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (jnp.ndim(x) - v.ndim))


def ddim(x_t, x, *, s, t, schedule: str):
    """DDIM interpolant: the point at target time s on the path through x_t (time t) and clean x.

    DDIM(x_t, x, s, t) = (alpha_s - alpha_t sigma_s / sigma_t) x + (sigma_s / sigma_t) x_t   (paper Eq. 11)

    Args:
      x_t: (B, ...) the sample at source time t.
      x: (B, ...) the clean sample (or its prediction).
      s: target time, scalar or (B,).
      t: source time, scalar or (B,); s <= t and t > 0.
    Returns:
      (B, ...) x_s. If x_t = alpha_t x + sigma_t eps, this equals alpha_s x + sigma_s eps.
    """
    a_s, sg_s = alpha_sigma(jnp.asarray(s), schedule)
    a_t, sg_t = alpha_sigma(jnp.asarray(t), schedule)
    ratio = sg_s / sg_t
    return expand_like(a_s - a_t * ratio, x) * x + expand_like(ratio, x_t) * x_t


def add_noise(x, noise, t, schedule: str):
    """Forward interpolation x_t = alpha_t x + sigma_t noise; noise already carries sigma_d."""
    a_t, sg_t = alpha_sigma(jnp.asarray(t), schedule)
    return expand_like(a_t, x) * x + expand_like(sg_t, x) * noise


def prior_noise(key, shape, sigma_d: float = 0.5, dtype=jnp.float32):
    """A draw from the prior N(0, sigma_d^2 I) (spec §1: sigma_d = 0.5, not a unit Gaussian)."""
    return sigma_d * jax.random.normal(key, shape, dtype)
