"""layers.linear / layers.Dense / layers.conv2d against NumPy, autodiff and flax, on every execution path.

Paths: "plain" (XLA autodiff: what TPU/GPU run), "cpu" (the hand-written XLA:CPU backwards around jnp.dot /
lax.conv_general_dilated, kernels switched off) and "kernel" (the "cpu" path with the CPU kernels of
imm_jax/kernels/cpu_dense.cc, where they are built).
"""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax.kernels import build, cpu_dense
from imm_jax.networks import layers


@pytest.fixture(params=["kernel", "cpu", "plain"])
def path(request):
    """The `backend` argument of the layers for this path (the kernels switched off for "cpu")."""
    if request.param == "kernel" and not cpu_dense.available():
        pytest.skip("no C++ compiler here: the CPU dense kernel is not built")
    context = build.switched_off() if request.param == "cpu" else contextlib.nullcontext()
    with context:
        assert cpu_dense.applies(jnp.zeros(3)) == (request.param != "cpu")
        yield "plain" if request.param == "plain" else "cpu"


@pytest.fixture(params=[(2, 5, 7), (6, 7), (2, 3, 4, 7)], ids=["tokens", "matrix", "4d"])
def operands(request):
    r = np.random.default_rng(0)
    shape = request.param
    x = jnp.asarray(r.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(r.normal(size=(shape[-1], 3)), jnp.float32)
    bias = jnp.asarray(r.normal(size=(3,)), jnp.float32)
    g = jnp.asarray(r.normal(size=shape[:-1] + (3,)), jnp.float32)
    return x, kernel, bias, g


def test_forward_matches_numpy(operands, path):
    x, kernel, bias, _ = operands
    ref = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    np.testing.assert_allclose(layers.linear(x, kernel, bias, path), ref, rtol=1e-5, atol=1e-5)


def test_gradients_match_numpy_and_autodiff(operands, path):
    x, kernel, bias, g = operands
    ours = jax.grad(lambda *a: jnp.sum(layers.linear(*a, path) * g), argnums=(0, 1, 2))(x, kernel, bias)
    auto = jax.grad(lambda x, k, b: jnp.sum((x @ k + b) * g), argnums=(0, 1, 2))(x, kernel, bias)
    x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, kernel, g))
    g2, x2 = g64.reshape(-1, 3), x64.reshape(-1, x64.shape[-1])
    numpy_grads = (g64 @ k64.T, x2.T @ g2, g2.sum(0))
    for a, b, c in zip(ours, auto, numpy_grads):
        assert a.shape == b.shape and float(np.max(np.abs(c))) > 1e-2
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["plain", "cpu"])
def test_dense_has_flax_dense_params_and_values(backend):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 6)), jnp.float32)
    init = nn.initializers.xavier_uniform()
    ours = layers.Dense(5, kernel_init=init, backend=backend)
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


@pytest.mark.parametrize("backend", ["plain", "cpu"])
def test_bfloat16_computes_in_dtype_with_float32_param_grads(backend):
    r = np.random.default_rng(2)
    x = jnp.asarray(r.normal(size=(2, 64, 8)), jnp.float32)
    layer = layers.Dense(4, dtype=jnp.bfloat16, backend=backend)
    p = layer.init(jax.random.key(0), x)
    assert layer.apply(p, x).dtype == jnp.bfloat16
    g = jax.grad(lambda p: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2))(p)
    ref = jax.grad(lambda p: jnp.sum(nn.Dense(4, dtype=jnp.float32).apply(p, x) ** 2))(p)
    for name in ("kernel", "bias"):
        assert g["params"][name].dtype == jnp.float32
        np.testing.assert_allclose(g["params"][name], ref["params"][name], rtol=0.05, atol=0.05)


def numpy_conv(x, kernel, pad):
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    k = kernel.shape[0]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    out = np.zeros(x.shape[:1] + (ho, wo, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += np.einsum("bhwc,cd->bhwd", xp[:, i:i + ho, j:j + wo], kernel[i, j])
    return out


def autodiff_conv(x, kernel, pad):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("k,pad", [(3, 1), (3, 2), (3, 0), (1, 0), (5, 2)])
def test_conv2d_values_and_gradients(k, pad, path):
    r = np.random.default_rng(k * 10 + pad)
    x = jnp.asarray(r.normal(size=(2, 6, 5, 3)), jnp.float32)
    kernel = jnp.asarray(r.normal(size=(k, k, 3, 4)), jnp.float32)
    y = layers.conv2d(x, kernel, pad, path)
    np.testing.assert_allclose(y, numpy_conv(x, kernel, pad), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(r.normal(size=y.shape), jnp.float32)
    ours = jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, pad, path) * g), argnums=(0, 1))(x, kernel)
    ref = jax.grad(lambda x, w: jnp.sum(autodiff_conv(x, w, pad) * g), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and float(jnp.max(jnp.abs(b))) > 1e-2
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # One directional derivative against central differences of the NumPy forward (float64).
    f = lambda x, w: np.sum(numpy_conv(x, w, pad) * np.asarray(g, np.float64))
    dx, dw = (r.normal(size=a.shape) for a in (x, kernel))
    x64, w64 = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    fd = (f(x64 + 1e-6 * dx, w64 + 1e-6 * dw) - f(x64 - 1e-6 * dx, w64 - 1e-6 * dw)) / 2e-6
    np.testing.assert_allclose(np.sum(np.asarray(ours[0], np.float64) * dx)
                               + np.sum(np.asarray(ours[1], np.float64) * dw), fd, rtol=1e-4)


@pytest.mark.parametrize("backend", ["plain", "cpu"])
def test_conv2d_bfloat16_keeps_dtypes(backend):
    r = np.random.default_rng(3)
    x = jnp.asarray(r.normal(size=(2, 8, 8, 4)), jnp.bfloat16)
    kernel = jnp.asarray(r.normal(size=(3, 3, 4, 4)) * 0.3, jnp.bfloat16)
    conv = lambda x, w: layers.conv2d(x, w, 1, backend)
    assert conv(x, kernel).dtype == jnp.bfloat16
    dx, dw = jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32) ** 2), argnums=(0, 1))(x, kernel)
    rx, rw = jax.grad(lambda x, w: jnp.sum(autodiff_conv(x, w, 1) ** 2), argnums=(0, 1))(
        x.astype(jnp.float32), kernel.astype(jnp.float32))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    for a, b in ((dx, rx), (dw, rw)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale, b / scale, atol=0.05)
