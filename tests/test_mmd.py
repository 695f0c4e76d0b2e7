"""Kernels and the grouped V-statistic MMD: NumPy loop reference, properties, numerics."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from imm_jax.core import mmd

RNG = np.random.default_rng(2)


def ref_grouped_mmd(yt, yr, w, kernel):
    g, m = yt.shape[:2]
    yt = yt.reshape(g, m, -1).astype(np.float64)
    yr = yr.reshape(g, m, -1).astype(np.float64)
    d = yt.shape[-1]
    out = np.zeros(g)
    for i in range(g):
        def k(a, b):
            dist = np.linalg.norm(a - b)
            if kernel == "laplace":
                return np.exp(-w[i] * max(dist, 1e-8) / d)
            return np.exp(-w[i] * dist ** 2 / (2 * d))
        tot = 0.0
        for j in range(m):
            for l in range(m):
                tot += k(yt[i, j], yt[i, l]) + k(yr[i, j], yr[i, l]) - 2 * k(yt[i, j], yr[i, l])
        out[i] = tot / m ** 2
    return out


@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_matches_python_loop(kernel):
    yt = RNG.normal(size=(5, 4, 3, 3, 2))
    yr = yt + 0.3 * RNG.normal(size=yt.shape)
    w = RNG.uniform(0.5, 20, 5)
    out = mmd.grouped_mmd(jnp.asarray(yt, jnp.float32), jnp.asarray(yr, jnp.float32),
                          kernel_weight=jnp.asarray(w, jnp.float32), kernel=kernel)
    assert out.shape == (5,)
    np.testing.assert_allclose(out, ref_grouped_mmd(yt, yr, w, kernel), rtol=1e-4, atol=1e-6)


def test_properties():
    yt = jnp.asarray(RNG.normal(size=(6, 4, 8)), jnp.float32)
    yr = jnp.asarray(RNG.normal(size=(6, 4, 8)), jnp.float32)
    w = jnp.full((6,), 3.0)
    base = mmd.grouped_mmd(yt, yr, kernel_weight=w)
    np.testing.assert_allclose(mmd.grouped_mmd(yt, yt, kernel_weight=w), 0.0, atol=1e-6)
    assert np.all(np.asarray(base) >= -1e-6)
    np.testing.assert_allclose(mmd.grouped_mmd(yr, yt, kernel_weight=w), base, rtol=1e-5)
    perm_t, perm_r = RNG.permutation(4), RNG.permutation(4)
    np.testing.assert_allclose(mmd.grouped_mmd(yt[:, perm_t], yr[:, perm_r], kernel_weight=w), base, rtol=1e-5)
    # Includes the diagonal: one particle per group gives 2 - 2 k(yt, yr), not 0.
    one = mmd.grouped_mmd(yt[:, :1], yr[:, :1], kernel_weight=w)
    dist = np.linalg.norm(np.asarray(yt[:, 0] - yr[:, 0]), axis=-1)
    np.testing.assert_allclose(one, 2 - 2 * np.exp(-3.0 * dist / 8), rtol=1e-5)


def test_gradient_finite_with_coincident_particles():
    yt = jnp.zeros((2, 4, 16))  # every pair coincides: distance exactly zero
    yr = jnp.zeros((2, 4, 16)).at[0, 1].set(0.1)
    grad = jax.grad(lambda a: jnp.sum(mmd.grouped_mmd(a, yr, kernel_weight=jnp.ones(2))))(yt)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_small_distance_not_lost_in_float32():
    d = 4096
    a = jnp.asarray(RNG.normal(size=(1, d)), jnp.float32)
    delta = np.zeros((1, d), np.float32)
    delta[0, 0] = 6.5e-4
    b = a + jnp.asarray(delta)
    sq = mmd.pairwise_sq_dists(a, b)
    np.testing.assert_allclose(np.sqrt(sq), 6.5e-4, rtol=1e-3)
    # The Gram expansion would give ~0 here; direct differences keep the kernel below 1.
    k = mmd.kernel_matrix(a, b, 4096.0 * 1000.0)
    np.testing.assert_allclose(k, np.exp(-1000.0 * 6.5e-4), rtol=1e-3)


def test_bad_input_is_clear():
    with pytest.raises(ValueError, match="Unknown kernel"):
        mmd.grouped_mmd(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), kernel_weight=1.0, kernel="energy")
    with pytest.raises(ValueError, match="must both be"):
        mmd.grouped_mmd(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3, 3)), kernel_weight=1.0)
    with pytest.raises(ValueError, match="must both be"):
        mmd.grouped_mmd(jnp.zeros((4,)), jnp.zeros((4,)), kernel_weight=1.0)


def test_scalar_particles_are_one_dimensional_samples():
    # (G, M) particles (no trailing dims, D = 1) are valid input, the same as (G, M, 1).
    yt = RNG.normal(size=(3, 4))
    yr = RNG.normal(size=(3, 4))
    w = RNG.uniform(0.5, 5, 3)
    out = mmd.grouped_mmd(jnp.asarray(yt, jnp.float32), jnp.asarray(yr, jnp.float32),
                          kernel_weight=jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(out, ref_grouped_mmd(yt[..., None], yr[..., None], w, "laplace"), rtol=1e-4, atol=1e-6)
