"""Building the CPU kernels (imm_jax/kernels/build.py): the fallback to plain JAX when they cannot be built,
the environment switches, and a network that uses both kernels against `build.switched_off()`."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import networks
from imm_jax.kernels import build, cpu_attention, cpu_dense


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)

KERNELS = pytest.mark.parametrize("kernel", [cpu_attention, cpu_dense], ids=["attention", "dense"])


@KERNELS
def test_falls_back_with_a_warning_when_it_cannot_be_built(kernel, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("IMM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert kernel.available.__wrapped__() is False
    assert "plain-JAX path" in caplog.text


@KERNELS
@pytest.mark.parametrize("switch", ["own", "all"])
def test_switches_turn_it_off(kernel, switch, monkeypatch):
    monkeypatch.setenv(kernel.ENV_SWITCH if switch == "own" else build.ENV_ALL, "0")
    assert kernel.available.__wrapped__() is False


@pytest.mark.skipif(not (cpu_attention.available() and cpu_dense.available()),
                    reason="no C++ compiler here: the CPU kernels are not built")
def test_dit_uses_both_kernels_with_the_same_output():
    config = networks.dit_config(None, image_size=8, in_channels=1, num_classes=3, patch_size=2, hidden_size=32,
                                 depth=2, num_heads=2)
    net = networks.build(config)
    x = jnp.asarray(_normal((2, 8, 8, 1)))
    t, s, y = jnp.array([0.9, 0.5]), jnp.array([0.1, 0.2]), jnp.array([0, 2])
    params = net.init(jax.random.PRNGKey(0), x, t, s, y)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(_normal(p.shape, 4)), params)  # adaLN-Zero is zero
    apply = lambda p: net.apply(p, x, t, s, y)
    text = jax.jit(apply).lower(params).as_text()
    assert "imm_matmul" in text and "imm_attention_forward" in text
    with build.switched_off():
        lowered = jax.jit(lambda p: net.apply(p, x, t, s, y)).lower(params)
        assert "imm_matmul" not in lowered.as_text() and "imm_attention" not in lowered.as_text()
        reference = apply(params)
    np.testing.assert_allclose(apply(params), reference, rtol=1e-5, atol=1e-5)
