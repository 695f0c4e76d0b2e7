"""layers.linear / layers.Dense (hand-written backward) against NumPy, autodiff and flax.linen.Dense."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax.networks import layers


@pytest.fixture(params=[(2, 5, 7), (6, 7), (2, 3, 4, 7)], ids=["tokens", "matrix", "4d"])
def operands(request):
    r = np.random.default_rng(0)
    shape = request.param
    x = jnp.asarray(r.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(r.normal(size=(shape[-1], 3)), jnp.float32)
    bias = jnp.asarray(r.normal(size=(3,)), jnp.float32)
    g = jnp.asarray(r.normal(size=shape[:-1] + (3,)), jnp.float32)
    return x, kernel, bias, g


def test_forward_matches_numpy(operands):
    x, kernel, bias, _ = operands
    ref = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    np.testing.assert_allclose(layers.linear(x, kernel, bias), ref, rtol=1e-5, atol=1e-5)


def test_gradients_match_numpy_and_autodiff(operands):
    x, kernel, bias, g = operands
    ours = jax.grad(lambda *a: jnp.sum(layers.linear(*a) * g), argnums=(0, 1, 2))(x, kernel, bias)
    auto = jax.grad(lambda x, k, b: jnp.sum((x @ k + b) * g), argnums=(0, 1, 2))(x, kernel, bias)
    x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, kernel, g))
    g2, x2 = g64.reshape(-1, 3), x64.reshape(-1, x64.shape[-1])
    numpy_grads = (g64 @ k64.T, x2.T @ g2, g2.sum(0))
    for a, b, c in zip(ours, auto, numpy_grads):
        assert a.shape == b.shape and float(np.max(np.abs(c))) > 1e-2
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_has_flax_dense_params_and_values():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 6)), jnp.float32)
    init = nn.initializers.xavier_uniform()
    ours = layers.Dense(5, kernel_init=init)
    ref = nn.Dense(5, kernel_init=init)
    p_ours = ours.init(jax.random.key(3), x)
    p_ref = ref.init(jax.random.key(3), x)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_ref)
    jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)
    p = jax.tree.map(lambda a: a + 0.1, p_ref)  # non-zero bias
    np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x))))(p)
    g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref.apply(p, x))))(p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_ours, g_ref)


def test_bfloat16_computes_in_dtype_with_float32_param_grads():
    r = np.random.default_rng(2)
    x = jnp.asarray(r.normal(size=(2, 64, 8)), jnp.float32)
    layer = layers.Dense(4, dtype=jnp.bfloat16)
    p = layer.init(jax.random.key(0), x)
    assert layer.apply(p, x).dtype == jnp.bfloat16
    g = jax.grad(lambda p: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2))(p)
    ref = jax.grad(lambda p: jnp.sum(nn.Dense(4, dtype=jnp.float32).apply(p, x) ** 2))(p)
    for name in ("kernel", "bias"):
        assert g["params"][name].dtype == jnp.float32
        np.testing.assert_allclose(g["params"][name], ref["params"][name], rtol=0.05, atol=0.05)
