"""The public sampling API: load, sample, determinism, EMA use, compile-once, chunked export."""
import os
import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import imm_jax
from imm_jax import networks
from imm_jax.core import sampling
from imm_jax.core.losses import IMMObjective
from imm_jax.inference import export
from imm_jax.training import checkpointing
from tiny_net import perturbed


def tiny_config():
    import tiny
    return tiny.get_config()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A sampling checkpoint with random (non-zero) EMA params for the tiny DiT."""
    config = tiny_config()
    net = networks.build(config.model)
    x = jnp.zeros((2, 8, 8, 1))
    params = jax.jit(net.init)(jax.random.key(0), x, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32))["params"]
    # DiT is zero-initialised at the output; perturb every leaf so samples depend on the network.
    params = perturbed(params, seed=1, scale=0.2)
    path = str(tmp_path_factory.mktemp("ckpt"))
    checkpointing.save_for_sampling(path, params, config)
    return path, config, net, params


def test_sample_shape_dtype_determinism(ckpt):
    path, *_ = ckpt
    a = imm_jax.sample(path, 10, steps=2, seed=3, batch_size=8)
    b = imm_jax.sample(path, 10, steps=2, seed=3, batch_size=8)
    c = imm_jax.sample(path, 10, steps=2, seed=4, batch_size=8)
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampler_matches_core_sampler_with_ema_params(ckpt):
    path, config, net, params = ckpt
    s = imm_jax.load(path)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int32)
    key = jax.random.key(11)
    x = s.generate(key, labels, steps=2, cfg_scale=1.5)
    obj = IMMObjective.from_config(config.imm, num_classes=config.model.num_classes)
    grid = sampling.time_grid("uniform", 2, schedule="fm", t_min=0.006, t_max=0.994)
    ref = sampling.generate(net, params, key, (8, 8, 8, 1), objective=obj, grid=grid, labels=jnp.asarray(labels),
                            cfg_scale=1.5)
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # uint8 decoding of model space [-1, 1].
    np.testing.assert_array_equal(s.decode(x), np.clip(np.asarray(x) * 127.5 + 128, 0, 255).astype(np.uint8))


def test_compiles_once_per_steps_and_batch(ckpt):
    path, *_ = ckpt
    s = imm_jax.load(path)
    s(8, steps=1, batch_size=8)
    s(8, steps=1, batch_size=8, seed=5)
    s(8, steps=1, batch_size=8, labels=[3] * 8)
    assert s.num_compiles == 1
    s(8, steps=2, batch_size=8)
    assert s.num_compiles == 2


def test_chunks_resume_to_identical_samples(ckpt, tmp_path):
    path, *_ = ckpt
    s = imm_jax.load(path)
    full = s(24, steps=1, batch_size=8, seed=2)
    tail = s(16, steps=1, batch_size=8, seed=2, start=8)
    np.testing.assert_array_equal(full[8:], tail)
    out = export.export_samples(path, str(tmp_path / "ex"), 24, chunk_size=8, batch_size=8, steps=1, seed=2,
                                sampler_obj=s)
    os.remove(tmp_path / "ex" / "chunks" / "00001.npz")  # as if interrupted
    export.export_samples(path, str(tmp_path / "ex"), 24, chunk_size=8, batch_size=8, steps=1, seed=2,
                          sampler_obj=s)
    data = np.load(out)  # the ADM evaluator layout: arr_0 uint8 NHWC
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (24, 8, 8, 1)
    np.testing.assert_array_equal(data["arr_0"], full)
    assert data["arr_1"].shape == (24,) and data["arr_1"].max() < 10
    assert os.path.exists(tmp_path / "ex" / "grid.png")


def test_presets_and_errors(ckpt):
    path, *_ = ckpt
    s = imm_jax.load(path)
    assert s(2, preset="cifar10-2step", batch_size=8).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="Unknown preset"):
        s(2, preset="cifar-3step")
    with pytest.raises(ValueError, match="labels must lie"):
        s(2, labels=[11, 0], batch_size=8)
    with pytest.raises(ValueError, match="EMA decay"):
        imm_jax.load(path, ema=0.123)


def test_which_ema_samples(tmp_path):
    """With a distinct params tree per decay (a real training run): the default is config.train.sample_ema when
    set, else the fastest decay; ema= picks one; an unknown decay is an error naming those present."""
    from imm_jax.training import train
    c = tiny_config()
    c.train.num_steps = 3  # ema_decays (0.9, 0.5)
    train.train_and_evaluate(c, str(tmp_path))
    _, emas = checkpointing.restore_for_sampling(str(tmp_path))
    assert sorted(emas) == ["0.5", "0.9"]
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(emas["0.5"]), leaves(emas["0.9"])))

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))

    default = imm_jax.load(str(tmp_path))
    assert default.ema == "0.5" and same(default.params, emas["0.5"])
    slow = imm_jax.load(str(tmp_path), ema=0.9)
    assert slow.ema == "0.9" and same(slow.params, emas["0.9"])
    with pytest.raises(ValueError, match=r"EMA decay 0.99 not in this checkpoint; it has \['0.5', '0.9'\]"):
        imm_jax.load(str(tmp_path), ema=0.99)
    from imm_jax.inference import api
    c.train.sample_ema = 0.9
    assert api._pick_ema(emas, None, c)[0] == "0.9"


def test_decode_crops_the_padding(ckpt):
    path, config, net, params = ckpt
    padded = config.copy_and_resolve_references()
    padded.data.pad = 2
    s = imm_jax.inference.api.Sampler(padded, params)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    full = np.floor(np.clip(x.astype(np.float64) * 127.5 + 128, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(s.decode(x), full[:, 2:6, 2:6])
    assert s(2, steps=1).shape == (2, 4, 4, 1)


def test_presets_set_the_papers_grids(ckpt):
    """cifar10-2step: the eta grid with eta(t_1) = 1.4, i.e. t_1 = 1.4 / 2.4 for OT-FM (eta = t / (1 - t))."""
    from imm_jax.inference import api
    path, config, net, params = ckpt
    opts = api.resolve_options(config, preset="cifar10-2step")
    assert (opts["steps"], opts["grid"], opts["mid_etas"], opts["cfg_scale"]) == (2, "etas", (1.4,), None)
    s = imm_jax.load(path)
    np.testing.assert_allclose(np.asarray(s.time_grid(2, opts["grid"], opts["mid_etas"])),
                               [0.994, 1.4 / 2.4, 0.006], rtol=1e-6)
    opts8 = api.resolve_options(config, preset="imagenet-8step")
    assert (opts8["steps"], opts8["grid"], opts8["cfg_scale"]) == (8, "uniform", 1.5)
    np.testing.assert_allclose(np.asarray(s.time_grid(8, "uniform")), np.linspace(0.994, 0.006, 9), rtol=1e-6)
    # the preset's grid is what sampling runs: same samples as the explicit arguments
    np.testing.assert_array_equal(s(4, preset="cifar10-2step", labels=[1] * 4),
                                  s(4, steps=2, grid="etas", mid_etas=(1.4,), cfg_scale=1.0, labels=[1] * 4))
