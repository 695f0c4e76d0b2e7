"""Attention (imm_jax.networks.layers.attention) on every execution path: "plain" (jax.nn.dot_product_attention,
what TPU/GPU run), "cpu" (the heads-major formulation with its hand-written backward, kernel switched off) and
"kernel" (the CPU kernel, imm_jax/kernels/cpu_attention.cc), against NumPy, autodiff of the plain formula and
finite differences."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax.kernels import cpu_attention
from imm_jax.networks import layers


def reference_attention(q, k, v):
    """Plain formula for autodiff: softmax(q k^T / sqrt(d)) v in (B, N, heads, d) layout, float32."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def numpy_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def attend(q, k, v, backend):
    return layers.attention(jnp.stack([q, k, v], axis=2), backend)


# (B, N, heads, head_dim): N not a multiple of the kernel's 6-row tile, head_dim below / not a multiple of its
# 16-column tile; the other paths also get an N the kernel refuses (7).
SHAPES = {"plain": [(2, 7, 3, 8), (2, 16, 3, 8), (1, 24, 2, 72)], "cpu": [(2, 7, 3, 8), (2, 16, 3, 8), (1, 24, 2, 72)],
          "kernel": [(2, 16, 3, 8), (1, 24, 2, 72)]}
CASES = [(path, shape) for path, shapes in SHAPES.items() for shape in shapes]


@pytest.fixture(params=CASES, ids=[f"{p}-{'x'.join(map(str, s))}" for p, s in CASES])
def case(request):
    path, shape = request.param
    if path == "kernel" and not cpu_attention.available():
        pytest.skip("no C++ compiler here: the CPU attention kernel is not built")
    r = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(r.normal(size=shape) * s, jnp.float32) for s in (1.5, 1.5, 1.0, 1.0))
    context = cpu_attention.switched_off() if path == "cpu" else contextlib.nullcontext()
    with context:
        if path != "plain":  # which of the two "cpu" formulations runs
            assert cpu_attention.applies(jnp.stack([q, k, v], axis=2)) == (path == "kernel")
        yield q, k, v, g, "plain" if path == "plain" else "cpu"


def test_forward_matches_numpy(case):
    q, k, v, _, backend = case
    np.testing.assert_allclose(attend(q, k, v, backend), numpy_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_gradients_match_autodiff(case):
    q, k, v, g, backend = case
    ours = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, backend) * g), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        assert float(jnp.max(jnp.abs(b))) > 1e-2  # non-trivial gradients
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_gradients_match_finite_differences(case):
    q, k, v, g, backend = case
    f = lambda q, k, v: np.sum(numpy_attention(q, k, v) * np.asarray(g, np.float64))
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, backend) * g), argnums=(0, 1, 2))(q, k, v)
    r = np.random.default_rng(1)
    for i, grad in enumerate(grads):
        args = [np.asarray(a, np.float64) for a in (q, k, v)]
        direction = r.normal(size=args[i].shape)
        plus, minus = list(args), list(args)
        plus[i] = args[i] + 1e-5 * direction
        minus[i] = args[i] - 1e-5 * direction
        fd = (f(*plus) - f(*minus)) / 2e-5
        np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * direction), fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["plain", "cpu"])
def test_bfloat16_keeps_dtype_and_is_close(backend):
    r = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(r.normal(size=(2, 16, 3, 8)) * s, jnp.float32) for s in (1.5, 1.5, 1.0, 1.0))
    bf = lambda a: a.astype(jnp.bfloat16)
    assert not cpu_attention.applies(jnp.stack([bf(q), bf(k), bf(v)], axis=2))  # the kernel is float32 only
    out = attend(bf(q), bf(k), bf(v), backend)
    assert out.dtype == jnp.bfloat16
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, backend).astype(jnp.float32) * g),
                     argnums=(0, 1, 2))(bf(q), bf(k), bf(v))
    ref = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, ref):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.1, atol=0.05)


def test_cudnn_only_on_the_gpu_path_for_half_precision():
    """cuDNN's fused attention is chosen on the "gpu" path for bfloat16/float16 with head size a multiple of 8
    up to 128; float32, other head sizes and the "plain"/"cpu" paths use XLA's implementation."""
    qkv = lambda d, dtype: jnp.zeros((2, 16, 3, 4, d), dtype)
    assert layers.attention_implementation(qkv(64, jnp.bfloat16), "gpu") == "cudnn"
    assert layers.attention_implementation(qkv(128, jnp.float16), "gpu") == "cudnn"
    assert layers.attention_implementation(qkv(64, jnp.float32), "gpu") is None
    assert layers.attention_implementation(qkv(72 + 4, jnp.bfloat16), "gpu") is None
    assert layers.attention_implementation(qkv(256, jnp.bfloat16), "gpu") is None
    assert layers.attention_implementation(qkv(64, jnp.bfloat16), "plain") is None
