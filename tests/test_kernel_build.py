"""Building the CPU kernels (imm_jax/kernels/build.py): the fallback to plain JAX when they cannot be built,
and the environment switches."""
import logging

import pytest

from imm_jax.kernels import build, cpu_attention, cpu_dense

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
