"""Time-embedding tuning (issue 8): per-layer conditioning in the networks, exact init, gradients only on
the new vectors, loss decrease, storage beside a checkpoint, the sampling API and its grid check."""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imm_jax
from imm_jax import networks
from imm_jax.core import sampling
from imm_jax.core.losses import IMMObjective
from imm_jax.inference import tuned_vectors, tuning
from imm_jax.training import checkpointing
from tiny_net import perturbed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # noqa: E402

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def model():
    config = tiny.get_config()
    net = networks.build(config.model)
    x = jnp.zeros((2,) + SHAPE)
    params = jax.jit(net.init)(jax.random.key(0), x, jnp.ones(2), jnp.ones(2), jnp.zeros(2, jnp.int32))["params"]
    objective = IMMObjective.from_config(config.imm, num_classes=10)
    return config, net, perturbed(params, seed=2, scale=0.05), objective


def tiny_unet(num_classes=0):
    return networks.unet_config(image_size=8, in_channels=1, num_classes=num_classes, model_channels=16,
                                channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)


# ------------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("family", ["dit", "unet"])
def test_cond_override_and_offset_reproduce_default_and_reach_every_layer(family, model):
    if family == "dit":
        _, net, params, _ = model
        num_classes = 10
    else:
        net = networks.build(tiny_unet())
        params = perturbed(jax.jit(net.init)(jax.random.key(1), jnp.zeros((2,) + SHAPE), jnp.ones(2),
                                             jnp.ones(2))["params"], seed=2, scale=0.05)
        num_classes = 0
    layers, width = networks.cond_layout(net)
    assert layers == (2 if family == "dit" else 10)  # DiT: 1 block + final layer; UNet: 2+1 enc, 2+2+... dec
    b = 70  # > 64 rows: XLA:CPU picks other matmul kernels there
    x = jax.random.normal(jax.random.key(3), (b,) + SHAPE)
    t_in, s_in = jnp.full((b,), 700.0), jnp.full((b,), 300.0)
    labels = jnp.arange(b, dtype=jnp.int32) % (num_classes + 1) if num_classes else None
    run = jax.jit(lambda kw: net.apply({"params": params}, x, t_in, s_in, labels, **kw))
    base = run({})
    zero = jnp.zeros((layers, width))
    np.testing.assert_array_equal(run(dict(cond_offset=zero)), base)
    # Replacing the time part by the model's own is the default path too: equal up to float32 rounding (two programs
    # fuse differently: 2.3e-6 seen on outputs up to 1.9; a 1% error in the vectors moves them by 1.6e-2).
    own = jax.jit(networks.time_condition, static_argnums=0)(net, params, x, t_in, s_in, labels)
    assert own.shape == (b, width)
    np.testing.assert_allclose(run(dict(cond_override=jnp.broadcast_to(own, (layers, b, width)))), base,
                               rtol=1e-5, atol=1e-5)

    # Every conditioned layer reads its own vector: perturbing only layer l changes the output.
    for layer in range(layers):
        out = run(dict(cond_offset=zero.at[layer].set(0.5)))
        assert float(jnp.max(jnp.abs(out - base))) > 1e-4, layer

    with pytest.raises(ValueError, match=r"cond_override must have shape"):
        net.apply({"params": params}, x, t_in, s_in, labels, cond_offset=jnp.zeros((layers + 1, width)))
    with pytest.raises(ValueError, match="not both"):
        net.apply({"params": params}, x, t_in, s_in, labels, cond_offset=zero, cond_override=zero)


def test_unet_override_refuses_class_conditional_but_offset_works():
    net = networks.build(tiny_unet(num_classes=3))
    x, t = jnp.zeros((2,) + SHAPE), jnp.ones(2)
    labels = jnp.array([0, 3], jnp.int32)
    params = net.init(jax.random.key(0), x, t, t, labels)["params"]
    layers, width = networks.cond_layout(net)
    with pytest.raises(ValueError, match="unconditional models only"):
        net.apply({"params": params}, x, t, t, labels, cond_override=jnp.zeros((layers, width)))
    zero = jnp.zeros((layers, width))
    np.testing.assert_array_equal(net.apply({"params": params}, x, t, t, labels, cond_offset=zero),
                                  net.apply({"params": params}, x, t, t, labels))


# ------------------------------------------------------------------------------------------ tuner math

def test_teacher_grid_contains_coarse_times_and_matches_a_fine_sampler(model):
    _, net, params, objective = model
    grid = sampling.time_grid("uniform", 3, schedule="fm", t_min=objective.t_min, t_max=objective.t_max)
    segs = tuning.teacher_segments(grid, 4)
    assert segs.shape == (3, 5)
    np.testing.assert_array_equal(segs[:, 0], grid[:-1])
    np.testing.assert_array_equal(segs[:, -1], grid[1:])
    np.testing.assert_allclose(np.diff(segs, axis=1), np.diff(grid)[:, None] / 4 * np.ones((1, 4)), atol=1e-15)
    # The teacher's state at each coarse time is the 12-step Euler sampler on the fine grid run up to it.
    labels = jnp.arange(8, dtype=jnp.int32)
    x_init = 0.5 * jax.random.normal(jax.random.key(4), (8,) + SHAPE)
    states = jax.jit(lambda: tuning.rollout(net, params, objective.param, x_init, grid, sampler="euler",
                                            labels=labels, substeps=4))()
    assert states.shape == (3, 8) + SHAPE
    fine = np.concatenate([segs[0], segs[1, 1:], segs[2, 1:]])
    for i in range(3):
        direct = sampling.generate(net, params, jax.random.key(0), (8,) + SHAPE, objective=objective,
                                   grid=fine[:4 * (i + 1) + 1], labels=labels, sampler="euler", noise=x_init)
        np.testing.assert_allclose(states[i], direct, rtol=0, atol=1e-6)
    assert tuning.TuneSettings(sampler="euler", steps=3).resolved_teacher == ("euler", 43)   # 129 >= 128 steps
    assert tuning.TuneSettings(sampler="pushforward", steps=4).resolved_teacher == ("pushforward", 4)


def test_trajectory_distances_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5, 4, 4, 2)).astype(np.float32), rng.normal(size=(3, 5, 4, 4, 2)).astype(np.float32)
    d = (a - b).reshape(3, 5, -1).astype(np.float64)
    np.testing.assert_allclose(tuning.trajectory_distance(a, b, "l2"), np.mean(d ** 2, -1), rtol=1e-5)
    np.testing.assert_allclose(tuning.trajectory_distance(a, b, "l1"), np.mean(np.abs(d), -1), rtol=1e-5)
    c = 0.00054 * np.sqrt(32)
    np.testing.assert_allclose(tuning.trajectory_distance(a, b, "pseudo_huber"),
                               np.sqrt(np.sum(d ** 2, -1) + c * c) - c, rtol=1e-5)
    np.testing.assert_allclose(tuning.trajectory_distance(a, b, "pseudo_huber", 2.0),
                               np.sqrt(np.sum(d ** 2, -1) + 4.0) - 2.0, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "pushforward"])
def test_untrained_vectors_reproduce_the_sampler_bit_for_bit(sampler, model):
    _, net, params, objective = model
    settings = tuning.TuneSettings(sampler=sampler, steps=3, batch_size=64, num_trajectories=64, cfg_scale=1.5)
    tuner = tuning.Tuner(net, params, objective, settings, image_shape=SHAPE, num_classes=10)
    e = tuner.zero_offsets()
    x_init, labels = tuner.draw(0, 64)
    gen = lambda **kw: jax.jit(lambda p: sampling.generate(
        net, p, jax.random.key(0), (64,) + SHAPE, objective=objective, grid=tuner.grid, labels=labels,
        cfg_scale=1.5, sampler=sampler, noise=x_init, **kw))(params)
    untuned = gen()
    np.testing.assert_array_equal(gen(cond_offset=e), untuned)
    # The student rollout the tuner differentiates (jax.checkpoint per step) ends on the same samples.
    student = jax.jit(lambda p, e: tuning.rollout(net, p, objective.param, x_init, jnp.asarray(tuner.grid, jnp.float32),
                                                  sampler=sampler, labels=labels, cfg_scale=1.5,
                                                  null_label=10, cond_offset=e, remat=True))(params, e)
    np.testing.assert_array_equal(student[-1], untuned)
    # e0 + 0 is the model's own time part at each step: as a replacement it gives the same samples here.
    e0 = tuner.initial_vectors()
    assert e0.shape == (3,) + networks.cond_layout(net)
    np.testing.assert_allclose(gen(cond_override=e0), untuned, rtol=0, atol=1e-6)


def test_gradients_reach_only_the_new_vectors_and_tuning_lowers_the_loss(model):
    _, net, params, objective = model
    settings = tuning.TuneSettings(sampler="euler", steps=2, teacher_steps=8, batch_size=16, num_trajectories=64,
                                   num_eval=32, num_steps=12, lr=1e-2, cfg_scale=1.5, log_every=4, loss="l2")
    tuner = tuning.Tuner(net, params, objective, settings, image_shape=SHAPE, num_classes=10)
    x, y = tuner.draw(0, 16)
    ref = tuner.references(x, y)
    assert ref.shape == (2, 16) + SHAPE
    e = tuner.zero_offsets()
    g = np.asarray(tuner.grad(e, tuner.params, x, y, ref))
    assert g.shape == e.shape and np.isfinite(g).all()
    assert (np.abs(g).max(axis=-1) > 0).all()  # every (step, layer) vector gets a gradient
    opt_state = tuner.optimizer.init(e)
    assert all(leaf.shape in ((), e.shape) for leaf in jax.tree.leaves(opt_state))  # optimiser holds e only
    before = jax.tree.map(np.asarray, tuner.params)
    e2, _, loss, per_step = tuner.step(jnp.array(e), opt_state, tuner.params, x, y, ref)
    assert per_step.shape == (2,) and np.isfinite(float(loss))
    assert not np.array_equal(np.asarray(e2), np.zeros(e.shape))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, tuner.params), before)

    # Sharded over 8 devices == one device.
    one = tuning.Tuner(net, params, objective, settings, image_shape=SHAPE, num_classes=10,
                       devices=jax.local_devices()[:1])
    assert len(tuner.devices) == 8
    np.testing.assert_allclose(np.asarray(one.grad(e, one.params, x, y, ref)), g, rtol=1e-4, atol=1e-9)

    logs = []
    tuned = tuning.tune(net, params, objective, settings, image_shape=SHAPE, num_classes=10, log=logs.append)
    m = tuned.meta
    assert m["eval_loss_after"] < 0.9 * m["eval_loss_before"], m
    assert tuned.offsets.shape == (2, 2, 32) and tuned.vectors.shape == (2, 2, 32)
    np.testing.assert_array_equal(tuned.vectors, np.asarray(tuner.initial_vectors()) + tuned.offsets)
    assert [d["step"] for d in logs if "train_loss" in d] == [4, 8, 12]
    assert m["grid"] == list(tuner.grid) and m["teacher"] == "euler" and m["teacher_steps"] == 8


def test_tuning_seeds_are_disjoint_from_sampling_seeds(model):
    _, net, params, objective = model
    settings = tuning.TuneSettings(steps=1, batch_size=8, num_trajectories=8, seed=0)
    tuner = tuning.Tuner(net, params, objective, settings, image_shape=SHAPE, num_classes=10)
    train_x, _ = tuner.draw(0, 8)
    eval_x, _ = tuner.draw(1, 8)
    # imm_jax.Sampler with seed 0: batch i uses fold_in(key(0), i) split into (noise, restart) keys.
    for i in range(4):
        k_noise, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), i))
        api_x = np.asarray(0.5 * jax.random.normal(k_noise, (8,) + SHAPE))
        assert not np.isclose(api_x[:, None], train_x[None]).all(axis=(2, 3, 4)).any()
    assert not np.array_equal(train_x, eval_x)


def np_group_mmd(x, y, w):
    """V-statistic MMD^2 with the Laplace kernel exp(-w max(|u - v|, 1e-8) / D) of two (M, ...) sets, float64."""
    x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    k = lambda a, b: np.exp(-w * np.maximum(np.linalg.norm(a[:, None] - b[None], axis=-1), 1e-8) / a.shape[1])
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def test_distributional_distance_matches_numpy_and_ignores_pairing():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 8, 4, 4, 1)).astype(np.float32)
    b = (a + rng.normal(scale=0.7, size=a.shape) + 0.3).astype(np.float32)
    w = np.array([3.0, 40.0], np.float32)
    got = np.asarray(tuning.distribution_distance(a, b, group=4, kernel_weights=w))
    want = [np.mean([np_group_mmd(a[i, g:g + 4], b[i, g:g + 4], w[i]) for g in (0, 4)]) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.asarray(tuning.distribution_distance(a, a, group=4, kernel_weights=w)).max() < 1e-7
    # pairing does not matter (a distributional objective), unlike the trajectory losses
    perm = b[:, [1, 0, 3, 2, 6, 4, 7, 5]]
    np.testing.assert_allclose(np.asarray(tuning.distribution_distance(a, perm, group=4, kernel_weights=w)), got,
                               rtol=1e-5)
    assert not np.allclose(tuning.trajectory_distance(a, perm, "l2"), tuning.trajectory_distance(a, b, "l2"))
    with pytest.raises(ValueError, match="divisible"):
        tuning.distribution_distance(a, b, group=3, kernel_weights=w)


def test_mmd_tuning_uses_the_models_kernel_groups_labels_and_lowers_the_loss(model):
    _, net, params, objective = model
    settings = tuning.TuneSettings(sampler="pushforward", steps=2, teacher_steps=8, batch_size=16,
                                   num_trajectories=64, num_eval=32, num_steps=12, lr=1e-2, cfg_scale=1.5,
                                   log_every=4, loss="mmd")
    tuner = tuning.Tuner(net, params, objective, settings, image_shape=SHAPE, num_classes=10)
    assert tuner.mmd_group == objective.particles == 4
    grid = tuner.grid
    np.testing.assert_allclose(tuner.kernel_weights,
                               [float(objective.kernel_weight(grid[i + 1], grid[i])) for i in range(2)], rtol=1e-6)
    x, y = tuner.draw(0, 16)
    assert all(len(set(y[g:g + 4])) == 1 for g in range(0, 16, 4))  # one label per group
    ref = tuner.references(x, y)
    e = tuner.zero_offsets()
    g = np.asarray(tuner.grad(e, tuner.params, x, y, ref))
    assert np.isfinite(g).all() and (np.abs(g).max(axis=-1) > 0).all()
    before = jax.tree.map(np.asarray, tuner.params)
    loss, per = tuner.loss(e, tuner.params, x, y, ref)
    states = tuning.rollout(net, tuner.params, tuner.param, jnp.asarray(x), jnp.asarray(grid, jnp.float32),
                            sampler="pushforward", labels=jnp.asarray(y), cfg_scale=1.5,
                            null_label=objective.null_label)
    want = [np.mean([np_group_mmd(np.asarray(states[i, k:k + 4]), ref[i, k:k + 4], tuner.kernel_weights[i])
                     for k in range(0, 16, 4)]) for i in range(2)]
    np.testing.assert_allclose(np.asarray(per), want, rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(float(loss), np.mean(want), rtol=2e-3, atol=1e-7)
    end = tuning.Tuner(net, params, objective, dataclasses.replace(settings, mmd_at="end"), image_shape=SHAPE,
                       num_classes=10)
    np.testing.assert_allclose(float(end.loss(e, end.params, x, y, ref)[0]), want[-1], rtol=2e-3, atol=1e-7)
    tuned = tuning.tune(net, params, objective, settings, image_shape=SHAPE, num_classes=10)
    assert tuned.meta["eval_loss_after"] < tuned.meta["eval_loss_before"], tuned.meta
    assert (tuned.meta["loss"], tuned.meta["mmd_group"], tuned.meta["mmd_at"]) == ("mmd", 4, "every")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, tuner.params), before)


def test_settings_validation():
    with pytest.raises(ValueError, match="'euler' for flow-matching"):
        tuning.TuneSettings(sampler="restart")
    with pytest.raises(ValueError, match="teacher_sampler"):
        tuning.TuneSettings(sampler="pushforward", teacher_sampler="heun")
    with pytest.raises(ValueError, match="loss"):
        tuning.TuneSettings(loss="l3")
    with pytest.raises(ValueError, match="mmd_group"):
        tuning.TuneSettings(loss="mmd", mmd_group=5, batch_size=64)
    with pytest.raises(ValueError, match="mmd_at"):
        tuning.TuneSettings(loss="mmd", mmd_at="middle")
    with pytest.raises(ValueError, match="Euler steps only"):
        sampling.ode(lambda x, t, e: x, jnp.zeros((1, 2)), np.array([1.0, 0.5]), heun=True,
                     per_step=jnp.zeros((1, 3)))


# ------------------------------------------------------------------------------------------ storage + API

def test_save_load_round_trip_and_sampling_api(tmp_path, model):
    config, net, params, objective = model
    step_dir = checkpointing.save_for_sampling(str(tmp_path / "ckpt"), params, config, step=7)
    settings = tuning.TuneSettings(sampler="pushforward", steps=2, teacher_steps=4, batch_size=8,
                                   num_trajectories=8, num_eval=8, num_steps=2, lr=1e-2, cfg_scale=1.5)
    tuned = tuning.tune(net, params, objective, settings, image_shape=SHAPE, num_classes=10)
    path = tuned_vectors.save(step_dir, tuned)
    assert path == os.path.join(step_dir, "tuned", "pushforward_2step_uniform")
    [back] = tuned_vectors.load_all(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(back.offsets, tuned.offsets)
    np.testing.assert_array_equal(back.vectors, tuned.vectors)
    assert back.meta == tuned.meta
    cfg, emas = checkpointing.restore_for_sampling(str(tmp_path / "ckpt"))  # the checkpoint still reads
    assert set(emas) == {"0.9", "0.5"}

    sampler = imm_jax.load(str(tmp_path / "ckpt"), tuned=True)
    plain = imm_jax.load(str(tmp_path / "ckpt"))
    labels = np.arange(8) % 10
    rng = jax.random.key(5)
    got = sampler.generate(rng, labels, steps=2, cfg_scale=1.5)
    want = sampling.generate(net, sampler.params, rng, (8,) + SHAPE, objective=objective,
                             grid=np.asarray(tuned.grid, np.float32), labels=labels, cfg_scale=1.5,
                             cond_offset=tuned.offsets)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    untuned = plain.generate(rng, labels, steps=2, cfg_scale=1.5)
    assert float(jnp.max(jnp.abs(got - untuned))) > 0
    np.testing.assert_array_equal(sampler.generate(rng, labels, steps=2, cfg_scale=1.5, tuned=False), untuned)
    # Zero offsets through the API: the untuned samples exactly.
    zero = tuned_vectors.TunedVectors(np.zeros_like(tuned.offsets), None, tuned.meta)
    np.testing.assert_array_equal(imm_jax.load(str(tmp_path / "ckpt"), tuned=zero).generate(
        rng, labels, steps=2, cfg_scale=1.5), untuned)
    imgs = imm_jax.sample(str(tmp_path / "ckpt"), 4, steps=2, tuned=True, labels=[1, 2, 3, 4])
    assert imgs.shape == (4, 8, 8, 1) and imgs.dtype == np.uint8

    # Another grid / step count / sampler -> a clear error.
    with pytest.raises(ValueError, match=r"no tuned vectors for pushforward 3 steps .* available: pushforward 2"):
        sampler.generate(rng, labels, steps=3)
    with pytest.raises(ValueError, match="no tuned vectors for pushforward 2 steps"):
        sampler.generate(rng, labels, steps=2, grid="edm")
    with pytest.raises(ValueError, match="sampler=.euler. does not fit this IMM model"):
        sampler.generate(rng, labels, steps=2, sampler="euler")
    with pytest.raises(ValueError, match="no tuned time embeddings are loaded"):
        plain.generate(rng, labels, steps=2, tuned=True)
    checkpointing.save_for_sampling(str(tmp_path / "empty"), params, config)
    with pytest.raises(FileNotFoundError, match="no tuned time embeddings are stored"):
        imm_jax.load(str(tmp_path / "empty"), tuned=True)
