"""TPU and GPU programs, lowered on this CPU machine with `jax.export`: the sharded IMM train step and the sampler
of a DiT (float32 and bfloat16 compute) and a DDPM++ UNet (with EDM augmentation in the step), on a mesh of the 8 fake devices. They must lower and
contain no CPU custom call: the CPU backend (C++ kernels, XLA:CPU backward passes) never reaches an accelerator.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import networks
from imm_jax.inference import api
from imm_jax.kernels import cpu_attention, cpu_dense
from imm_jax.networks import layers
from imm_jax.training import train
from test_config import load

PLATFORMS = ("tpu", "cuda")
CPU_TARGET = re.compile(r"imm_(attention|matmul|conv2d)")


def model_config(kind: str):
    c = load("tiny")
    c.data.batch_size = 32  # 8 devices x one group of 4
    if kind == "unet":
        c.model = networks.unet_config(image_size=8, in_channels=1, num_classes=10, model_channels=16,
                                       channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), num_heads=2,
                                       dropout=0.1, augment_dim=9)
        c.data.augment_p = 0.5  # EDM augmentation inside the step
    elif kind == "dit_bf16":
        c.model.dtype = "bfloat16"
        c.imm.min_gap, c.imm.temb, c.imm.a = 1e-4, "stride", 2.0
    return c


def custom_call_targets(exported) -> set:
    """Names of the custom calls in an exported program's StableHLO."""
    found = re.findall(r'custom_call @([\w.$]+)|call_target_name = "([^"]+)"', exported.mlir_module())
    return {a or b for a, b in found}


def export_train_step(config, platform: str, backend: str):
    trainer = train.Trainer(config, backend=backend)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    m = config.model
    b, size, ch = int(config.data.batch_size), int(m.image_size), int(m.in_channels)
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, ch), jnp.float32, sharding=trainer.batch_sharding),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=trainer.batch_sharding)}
    return trainer, jax.export.export(trainer.train_step, platforms=[platform])(state, batch)


# The UNet for CUDA adds nothing the UNet for TPU and the DiTs for CUDA do not check (the same "plain" layers; CUDA's
# own lowering is the attention's, which the DiTs exercise), at ~15 s: slow.
CASES = [(k, p) for k in ("dit", "dit_bf16", "unet") for p in PLATFORMS if (k, p) != ("unet", "cuda")]


@pytest.mark.parametrize("kind, platform", CASES + [pytest.param("unet", "cuda", marks=pytest.mark.slow)])
def test_train_step_and_sampler_lower_for_accelerators_without_cpu_calls(kind, platform):
    config = model_config(kind)
    backend = layers.backend_for_export([platform])
    assert backend == "plain"
    trainer, exported = export_train_step(config, platform, backend)
    assert exported.platforms == (platform,)
    assert exported.nr_devices == 8
    # the batch stays sharded over the data axis of the 8-device mesh
    assert re.search(r'tensor<32x8x8x1xf32> \{sdy.sharding = #sdy.sharding<@mesh, \[\{"data"', exported.mlir_module())
    targets = custom_call_targets(exported)
    assert not any(CPU_TARGET.search(t) for t in targets), targets

    params = trainer.init().params
    sampler = api.Sampler(config, params, backend=backend)
    batch = 16
    program = sampler._program(2, batch, "pushforward", guided=True)
    grid = jnp.asarray(sampler.time_grid(2), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sampler._batch_sharding)
    exported_s = jax.export.export(program, platforms=[platform])(
        sampler.params, jax.random.key(0), labels, grid, jnp.float32(1.5))
    assert exported_s.out_avals[0].shape == (batch, 8, 8, 1)
    targets = custom_call_targets(exported_s)
    assert not any(CPU_TARGET.search(t) for t in targets), targets


def test_networks_pick_the_path_of_their_devices():
    cpu = jax.devices("cpu")
    assert layers.backend_for(cpu) == "cpu"
    assert networks.build(load("tiny").model, devices=cpu).backend == "cpu"
    assert train.Trainer(load("tiny")).net.backend == "cpu"

    class Fake:
        def __init__(self, platform):
            self.platform = platform
    assert layers.backend_for([Fake("gpu")] * 2) == "gpu"
    assert layers.backend_for([Fake("tpu")]) == "plain"
    assert layers.backend_for_export(["cpu"]) == "cpu" and layers.backend_for_export(["cpu", "tpu"]) == "plain"
    with pytest.raises(ValueError, match="backend must be one of"):
        networks.build(load("tiny").model, backend="metal")


@pytest.mark.skipif(not (cpu_dense.available() and cpu_attention.available()),
                    reason="no C++ compiler here: the CPU kernels are not built")
def test_the_cpu_path_cannot_be_exported_for_an_accelerator():
    """The check above can fail: the CPU path bakes the kernels into the program (custom calls, and the
    custom_partitioning callbacks that shard them), which jax.export refuses for another platform."""
    with pytest.raises((ValueError, NotImplementedError), match="custom call|host_callbacks"):
        export_train_step(model_config("dit"), "tpu", "cpu")


def test_plain_and_cpu_paths_compute_the_same_network():
    """Same params, same inputs: the DiT and UNet on the "plain" and "cpu" paths agree to float32 rounding."""
    for kind in ("dit", "unet"):
        c = model_config(kind)
        plain = networks.build(c.model, backend="plain")
        cpu = networks.build(c.model, backend="cpu")
        r = np.random.default_rng(0)
        x = jnp.asarray(r.normal(size=(4, 8, 8, 1)), jnp.float32)
        t = jnp.asarray([100.0, 400.0, 700.0, 990.0], jnp.float32)
        labels = jnp.asarray([0, 3, 10, 7], jnp.int32)
        params = jax.jit(functools.partial(train.init_params, plain, c))(jax.random.key(1))  # op by op: 3x slower
        params = jax.tree.map(lambda p: p + 0.02 * jnp.asarray(r.normal(size=p.shape), p.dtype), params)
        out_p = plain.apply({"params": params}, x, t, 0.5 * t, labels)
        out_c = cpu.apply({"params": params}, x, t, 0.5 * t, labels)
        assert float(jnp.max(jnp.abs(out_p))) > 1e-2
        np.testing.assert_allclose(out_p, out_c, rtol=2e-5, atol=2e-5)
