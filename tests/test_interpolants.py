"""Schedules and DDIM against NumPy float64 references and the spec's identities."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from imm_jax.core import interpolants as I

RNG = np.random.default_rng(0)


def ref_alpha_sigma(t, schedule):
    if schedule == "fm":
        return 1 - t, t
    return np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_schedule_functions_match_numpy(schedule):
    t = RNG.uniform(0.01, 0.99, 64)
    a, s = ref_alpha_sigma(t, schedule)
    tj = jnp.asarray(t, jnp.float32)
    aj, sj = I.alpha_sigma(tj, schedule)
    np.testing.assert_allclose(aj, a, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(sj, s, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(I.logsnr(tj, schedule), 2 * np.log(a / s), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(I.eta(tj, schedule), s / a, rtol=1e-5)
    np.testing.assert_allclose(I.t_from_eta(jnp.asarray(s / a, jnp.float32), schedule), t, rtol=1e-5)
    np.testing.assert_allclose(I.t_from_logsnr(jnp.asarray(2 * np.log(a / s), jnp.float32), schedule),
                               t, rtol=1e-5)
    # NumPy inputs are computed in float64.
    assert I.eta(t, schedule).dtype == np.float64
    np.testing.assert_allclose(I.eta(t, schedule), s / a, rtol=1e-13)
    np.testing.assert_allclose(I.signal_noise_cross(t * 0.5, t, schedule),
                               ref_alpha_sigma(t * 0.5, schedule)[0] * s - a * ref_alpha_sigma(t * 0.5, schedule)[1],
                               rtol=1e-12)


def test_eta_max_matches_spec():
    assert I.eta(0.994, "fm") == pytest.approx(165.6667, rel=1e-5)
    assert I.eta(0.996, "cosine") == pytest.approx(159.15, rel=1e-3)


def test_unknown_schedule_is_clear():
    with pytest.raises(ValueError, match="Unknown schedule"):
        I.alpha_sigma(0.5, "linear")


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_ddim_reference_and_identities(schedule):
    b = 6
    x = RNG.normal(size=(b, 4, 4, 3))
    eps = 0.5 * RNG.normal(size=(b, 4, 4, 3))
    t = RNG.uniform(0.3, 0.99, b)
    r = t * RNG.uniform(0.3, 1.0, b)
    s = r * RNG.uniform(0.0, 1.0, b)
    at, st = ref_alpha_sigma(t, schedule)
    ar, sr = ref_alpha_sigma(r, schedule)
    as_, ss = ref_alpha_sigma(s, schedule)
    bc = lambda v: v[:, None, None, None]
    x_t = bc(at) * x + bc(st) * eps
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    # Paper Eq. 11 against NumPy.
    ref = bc(as_ - at * ss / st) * x + bc(ss / st) * x_t
    out = I.ddim(f32(x_t), f32(x), s=f32(s), t=f32(t), schedule=schedule)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
    # x_r from DDIM equals alpha_r x + sigma_r eps (same eps as x_t).
    x_r = I.ddim(f32(x_t), f32(x), s=f32(r), t=f32(t), schedule=schedule)
    np.testing.assert_allclose(x_r, bc(ar) * x + bc(sr) * eps, rtol=1e-5, atol=2e-6)
    # Self-consistency: t -> r -> s equals t -> s.
    via_r = I.ddim(x_r, f32(x), s=f32(s), t=f32(r), schedule=schedule)
    np.testing.assert_allclose(via_r, out, rtol=1e-5, atol=3e-6)
    # add_noise is the forward interpolation.
    np.testing.assert_allclose(I.add_noise(f32(x), f32(eps), f32(t), schedule), x_t, rtol=1e-5, atol=2e-6)


def test_prior_noise_scale():
    n = I.prior_noise(jax.random.key(0), (20000,), sigma_d=0.5)
    assert n.dtype == jnp.float32
    assert abs(float(jnp.std(n)) - 0.5) < 0.01
    n2 = I.prior_noise(jax.random.key(0), (100,), sigma_d=1.5)
    np.testing.assert_allclose(n2, 3.0 * I.prior_noise(jax.random.key(0), (100,), sigma_d=0.5), rtol=1e-6)
