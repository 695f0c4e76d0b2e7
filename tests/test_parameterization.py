"""f_{s,t} parameterisations: NumPy references, boundary identity, ideal targets reproduce DDIM, CFG."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from imm_jax.core.parameterization import Parameterization

RNG = np.random.default_rng(1)
CASES = [("identity", "fm"), ("identity", "cosine"), ("simple_edm", "fm"), ("simple_edm", "cosine"),
         ("euler_fm", "fm")]
SIGMA_D = 0.5


def ab(t, schedule):
    return (1 - t, t) if schedule == "fm" else (np.cos(np.pi * t / 2), np.sin(np.pi * t / 2))


def ref_coeffs(f_type, schedule, s, t):
    a_s, s_s = ab(s, schedule)
    a_t, s_t = ab(t, schedule)
    if f_type == "identity":
        return s_s / s_t, a_s - a_t * s_s / s_t
    if f_type == "simple_edm":
        n2 = a_t ** 2 + s_t ** 2
        return (a_t * a_s + s_t * s_s) / n2, -(a_s * s_t - a_t * s_s) * SIGMA_D / np.sqrt(n2)
    return np.ones_like(t), -(t - s) * SIGMA_D


def ideal_g(f_type, schedule, x, eps, t):
    """The network output that makes f the exact DDIM map (spec §2 table)."""
    a_t, s_t = ab(t, schedule)
    bc = lambda v: v[:, None, None, None]
    if f_type == "identity":
        return x
    if f_type == "simple_edm":
        return (bc(a_t) * eps - bc(s_t) * x) / (SIGMA_D * bc(np.sqrt(a_t ** 2 + s_t ** 2)))
    return (eps - x) / SIGMA_D


def const_net(g):
    g = jnp.asarray(g, jnp.float32)
    return lambda x_in, t_in, s_in, labels: g


@pytest.mark.parametrize("f_type,schedule", CASES)
def test_coefficients_match_numpy(f_type, schedule):
    p = Parameterization(f_type=f_type, schedule=schedule, sigma_d=SIGMA_D)
    t = RNG.uniform(0.05, 0.99, 32)
    s = t * RNG.uniform(0, 1, 32)
    c_skip, c_out = p.c_skip_out(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    ref_skip, ref_out = ref_coeffs(f_type, schedule, s, t)
    np.testing.assert_allclose(c_skip, ref_skip, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(c_out, ref_out, rtol=2e-5, atol=1e-6)
    a_t, s_t = ab(t, schedule)
    np.testing.assert_allclose(p.c_in(jnp.asarray(t, jnp.float32)), 1 / (SIGMA_D * np.sqrt(a_t ** 2 + s_t ** 2)),
                               rtol=1e-5)


@pytest.mark.parametrize("f_type,schedule", CASES)
def test_boundary_and_ideal_target(f_type, schedule):
    p = Parameterization(f_type=f_type, schedule=schedule, sigma_d=SIGMA_D)
    b = 5
    x = RNG.normal(size=(b, 4, 4, 2))
    eps = SIGMA_D * RNG.normal(size=(b, 4, 4, 2))
    t = RNG.uniform(0.1, 0.99, b)
    s = t * RNG.uniform(0, 0.9, b)
    a_t, s_t = ab(t, schedule)
    a_s, s_s = ab(s, schedule)
    bc = lambda v: v[:, None, None, None]
    x_t = bc(a_t) * x + bc(s_t) * eps
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    # f_{s,s} = identity whatever G is.
    junk = RNG.normal(size=x.shape)
    np.testing.assert_allclose(p.apply(const_net(junk), f32(x_t), f32(t), f32(t)), x_t, rtol=1e-5, atol=1e-5)
    # The ideal G reproduces DDIM(x_t, x, s, t) = alpha_s x + sigma_s eps.
    out = p.apply(const_net(ideal_g(f_type, schedule, x, eps, t)), f32(x_t), f32(s), f32(t))
    np.testing.assert_allclose(out, bc(a_s) * x + bc(s_s) * eps, rtol=1e-4, atol=2e-5)


def test_network_inputs_and_time_conditioning():
    seen = {}

    def net(x_in, t_in, s_in, labels):
        seen.update(x_in=x_in, t_in=t_in, s_in=s_in)
        return jnp.zeros_like(x_in)

    x_t = jnp.ones((2, 2, 2, 1))
    s, t = jnp.array([0.1, 0.2]), jnp.array([0.5, 0.9])
    Parameterization(temb="s").apply(net, x_t, s, t)
    np.testing.assert_allclose(seen["t_in"], [500, 900], rtol=1e-6)
    np.testing.assert_allclose(seen["s_in"], [100, 200], rtol=1e-6)
    a, sg = 1 - np.array([0.5, 0.9]), np.array([0.5, 0.9])
    np.testing.assert_allclose(seen["x_in"][:, 0, 0, 0], 1 / (0.5 * np.sqrt(a ** 2 + sg ** 2)), rtol=1e-6)
    Parameterization(temb="stride").apply(net, x_t, s, t)
    np.testing.assert_allclose(seen["s_in"], [400, 700], rtol=1e-5)


def test_cfg_applies_to_raw_output():
    def net(x_in, t_in, s_in, labels):  # G depends on the label only
        return jnp.broadcast_to(labels.astype(jnp.float32)[:, None, None, None], x_in.shape)

    p = Parameterization(f_type="euler_fm")
    x_t = jnp.zeros((2, 1, 1, 1))
    s, t = jnp.array([0.2, 0.2]), jnp.array([0.6, 0.6])
    labels = jnp.array([3, 7])
    out = p.apply(net, x_t, s, t, labels, cfg_scale=1.5, null_label=10)
    g = 10 + 1.5 * (labels - 10.0)  # G(null) + w (G(c) - G(null))
    np.testing.assert_allclose(out[:, 0, 0, 0], -(0.6 - 0.2) * 0.5 * g, rtol=1e-5)
    # w = 1 is plain conditional sampling, one network pass on the batch (not the doubled batch of guidance).
    batches = []
    counting = lambda x_in, t_in, s_in, lab: batches.append(x_in.shape[0]) or net(x_in, t_in, s_in, lab)
    out1 = p.apply(counting, x_t, s, t, labels, cfg_scale=1.0, null_label=10)
    np.testing.assert_allclose(out1[:, 0, 0, 0], -(0.4) * 0.5 * labels, rtol=1e-5)
    assert batches == [2]
    # w = 0 is unconditional sampling: G(null) for every label.
    out0 = p.apply(net, x_t, s, t, labels, cfg_scale=0.0, null_label=10)
    np.testing.assert_allclose(out0[:, 0, 0, 0], -(0.4) * 0.5 * np.full(2, 10.0), rtol=1e-5)
    with pytest.raises(ValueError, match="null_label"):
        p.apply(net, x_t, s, t, labels, cfg_scale=2.0)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="OT-FM schedule only"):
        Parameterization(f_type="euler_fm", schedule="cosine")
    with pytest.raises(ValueError, match="Unknown f_type"):
        Parameterization(f_type="edm")
    with pytest.raises(ValueError, match="temb"):
        Parameterization(temb="t")
    for bad in (0.0, -0.5):  # zero too: c_in = 1 / (sigma_d ...) would divide by it
        with pytest.raises(ValueError, match="sigma_d must be positive"):
            Parameterization(sigma_d=bad)


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_identity_map_at_time_zero_is_finite(schedule):
    # f_{0,0} with the identity parameterisation: sigma_0 / sigma_0 is 0 / 0, the map's limit is the identity.
    p = Parameterization(f_type="identity", schedule=schedule, sigma_d=SIGMA_D)
    skip, out = p.c_skip_out(jnp.zeros(3), jnp.zeros(3))
    np.testing.assert_array_equal(np.asarray(skip), np.ones(3))
    np.testing.assert_array_equal(np.asarray(out), np.zeros(3))


@pytest.mark.parametrize("time", [0.0, 0.5])
def test_identity_map_at_t_equal_s_has_finite_gradients(time):
    # The inner guard of sigma_s / sigma_t keeps the unselected branch finite, so gradients through the map's
    # coefficients (in s and t) stay finite where t = s.
    p = Parameterization(f_type="identity", schedule="fm", sigma_d=SIGMA_D)
    coeff_sum = lambda s, t: sum(c.sum() for c in p.c_skip_out(s, t))
    gs, gt = jax.grad(coeff_sum, argnums=(0, 1))(jnp.full(3, time), jnp.full(3, time))
    assert np.isfinite(np.asarray(gs)).all() and np.isfinite(np.asarray(gt)).all()
