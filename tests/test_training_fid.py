"""FID during training (config.eval) and the flow-matching objective in the trainer, on the tiny config.

The Inception network is replaced by a cheap stand-in extractor (a fixed random projection of the pixels):
the plumbing (which params, which samples, which reference, when, where logged) is what is tested here;
the real extractor and the FID formula have their own tests in test_evaluation.py.
"""
import json
import os

import jax
import numpy as np
import pytest
import scipy.linalg

import imm_jax
from imm_jax.core import losses, sampling
from imm_jax.evaluation import in_training
from imm_jax.inference import api
from imm_jax.io import images
from imm_jax.training import config_validation, input_pipeline, train
from test_config import load


class ProjectionExtractor:
    """FeatureExtractor's interface; features = pixels (scaled to [0, 1]) times a fixed (D, 5) matrix."""
    name = "projection-test"

    def __init__(self, dim: int):
        self.w = np.random.default_rng(0).normal(size=(dim, 5))

    def iter_features(self, batches, *, total=None, progress=True):
        for b in batches:
            yield self(b)

    def __call__(self, images, *, progress=False):
        return np.asarray(images, np.float64).reshape(len(images), -1) / 255.0 @ self.w


def numpy_fid(f1, f2):
    """Fréchet distance of two feature sets, straight from the definition (scipy's sqrtm)."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def fid_config():
    c = load("tiny")
    c.train.num_steps = 6
    c.eval.update(dict(every=3, num_samples=12, steps=(1, 2), batch_size=8, ref_images=40))
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fid_during_training_is_logged_and_matches_a_numpy_recomputation(tmp_path, capsys):
    c = fid_config()
    extractor = ProjectionExtractor(8 * 8 * 1)
    out = train.train_and_evaluate(c, str(tmp_path), fid_extractor=extractor)
    printed = capsys.readouterr().out
    assert "step 3 | FID of 12 samples at 1, 2 step(s)..." in printed  # said before the (long) evaluation
    assert "step 6 | fid_1step" in printed
    rows = [r for r in read_metrics(tmp_path) if "fid_1step" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(np.isfinite(r["fid_1step"]) and np.isfinite(r["fid_2step"]) for r in rows)
    assert rows[0]["fid_1step"] != rows[1]["fid_1step"]  # evaluated on the params of that step

    # The reference: the first 40 images of the data source's test split, cached in the workdir.
    src = input_pipeline.make_source(c)  # synthetic: the same pool for every split
    ref_imgs = np.clip(np.round((src.get(np.arange(40), None)["image"] + 1) * 127.5), 0, 255).astype(np.uint8)
    assert os.path.isfile(tmp_path / "fid_ref_stats.npz")

    # The samples: the fastest EMA (as the training grids), the configured sampler/grid/CFG, 12 of them in
    # batches of 8 with noise and labels from config.eval.seed by imm_jax.sample's convention (batch i: noise
    # from fold_in(key(seed), i), labels from fold_in(fold_in(key(seed), 2**31 - 1), i)); recomputed here
    # through sampling.generate.
    params = out["state"].ema[1]  # ema_decays (0.9, 0.5): the fastest
    net, objective = train.build_network(c), train.build_objective(c)
    base = jax.random.key(int(c.eval.seed))
    for steps in (1, 2):
        grid = sampling.time_grid("uniform", steps, schedule="fm", t_min=c.imm.t_min, t_max=c.imm.t_max)
        imgs = []
        for i in range(2):
            key = jax.random.fold_in(base, i)
            labels = np.asarray(jax.random.randint(jax.random.fold_in(jax.random.fold_in(base, 2**31 - 1), i),
                                                   (8,), 0, 10), np.int32)
            x = sampling.generate(net, params, key, (8, 8, 8, 1), objective=objective, grid=grid, labels=labels,
                                  cfg_scale=float(c.sample.cfg_scale), sampler="pushforward")
            imgs.append(np.clip(np.asarray(x) * 127.5 + 128.0, 0, 255).astype(np.uint8))
        imgs = np.concatenate(imgs)[:12]
        want = numpy_fid(extractor(imgs), extractor(ref_imgs))
        np.testing.assert_allclose(rows[1][f"fid_{steps}step"], want, rtol=1e-6)


def test_in_training_samples_are_what_imm_jax_sample_draws(tmp_path):
    """One convention: the monitor's samples (trainer mesh, params passed per call) equal the public
    Sampler's from the same params, seed and batch size; with random params, so labels and noise matter."""
    c = fid_config()
    trainer = train.Trainer(c)
    leaves, tree = jax.tree.flatten(trainer.init().params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [np.asarray(a) + 0.3 * rng.normal(size=a.shape).astype(np.float32)
                                       for a in leaves])
    monitor = in_training.TrainingFID(c, str(tmp_path), api.Sampler(c, mesh=trainer.mesh),
                                      extractor=ProjectionExtractor(8 * 8 * 1))
    public = api.Sampler(c, params)
    for steps in (1, 2):
        got = monitor.samples(jax.device_put(params, trainer.state_shardings.params), steps)
        want = public(12, steps=steps, seed=int(c.eval.seed), batch_size=8)
        assert got.shape == (12, 8, 8, 1) and got.dtype == np.uint8
        # the trainer's mesh shards params and batch differently: float rounding may move a pixel by one level
        diff = np.abs(got.astype(np.int16) - want)
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (diff.max(), np.mean(diff > 0))
    other = public(12, steps=1, seed=int(c.eval.seed), batch_size=8, labels=[3] * 12)
    assert np.mean(other != monitor.samples(params, 1)) > 0.1  # the labels drawn matter


def test_reference_images_crop_nothing_and_read_the_test_split(tmp_path):
    idx = tmp_path / "fmnist"
    idx.mkdir()
    rng = np.random.default_rng(3)
    test_imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    for stem, arr, magic in (("t10k-images-idx3-ubyte", test_imgs, b"\x00\x00\x08\x03"),
                             ("t10k-labels-idx1-ubyte", rng.integers(0, 10, 7, dtype=np.uint8), b"\x00\x00\x08\x01")):
        dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (idx / stem).write_bytes(magic + dims + arr.tobytes())
    c = load("fashion_mnist")
    c.data.path = str(idx)
    c.eval.ref_images = 5
    got = in_training.reference_images(c)
    np.testing.assert_array_equal(got, test_imgs[:5, :, :, None])  # unpadded, in order, exact bytes
    assert c.data.pad == 2 and c.data.split == "train"  # the training config is left alone
    # samples are cropped by the same padding before comparison
    padded = np.full((1, 32, 32, 1), -1.0, np.float32)
    padded[:, 2:30, 2:30] = 1.0
    assert images.to_uint8(padded, 2).shape == (1, 28, 28, 1) and images.to_uint8(padded, 2).min() == 255


def test_eval_config_errors_say_what_to_fix():
    c = load("tiny")
    c.eval.update(dict(every=5, steps=(0,), num_samples=1))
    with pytest.raises(config_validation.ConfigError) as e:
        config_validation.validate(c, num_devices=1)
    assert "config.eval.num_samples=1" in str(e.value) and "config.eval.steps=(0,)" in str(e.value)
    c = load("tiny")
    c.eval.every = 5
    c.data.source = "latents"
    c.data.path = "/nonexistent"
    with pytest.raises(config_validation.ConfigError) as e:
        config_validation.validate(c, num_devices=1)
    assert "needs config.vae.path" in str(e.value) and "cannot be read from its latents" in str(e.value)
    c = load("tiny")
    c.train.eval_every = 5
    with pytest.raises(config_validation.ConfigError, match="moved to config.eval.every"):
        config_validation.validate(c, num_devices=1)


# ----------------------------------------------------------------------------- objective = fm

def fm_config():
    c = load("tiny")
    c.imm.objective = "fm"
    c.sample.sampler = "euler"
    return c


def test_fm_objective_trains_with_the_flow_matching_loss(tmp_path):
    c = fm_config()
    tr = train.Trainer(c, mesh=None)
    state = tr.init()
    params = jax.device_get(state.params)
    batch = input_pipeline.Pipeline(c, tr.mesh).global_batch(0)
    key = jax.random.fold_in(state.rng, 0)
    want, imm = jax.jit(lambda p: [loss(tr.net, p, batch["image"], batch["label"], key, objective=tr.objective)[0]
                                   for loss in (losses.fm_loss, losses.imm_loss)])(params)
    _, m = tr.train_step(state, batch)
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
    assert abs(float(m["loss"]) - float(imm)) > 1e-3  # not the IMM loss

    out = train.train_and_evaluate(c, str(tmp_path))
    assert out["final_step"] == 6 and np.isfinite(out["last_metrics"]["loss"])
    sampler = imm_jax.load(str(tmp_path))
    imgs = sampler(4, steps=2, labels=[0, 1, 2, 3])  # the config's sampler (euler) by default
    x = sampler.generate(jax.random.key(0), [0, 1, 2, 3], steps=2)
    y = sampler.generate(jax.random.key(0), [0, 1, 2, 3], steps=2, sampler="euler")
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert imgs.shape == (4, 8, 8, 1) and imgs.dtype == np.uint8
    with pytest.raises(ValueError, match="does not fit this FM model"):
        sampler(4, steps=2, sampler="pushforward")


def test_objective_and_sampler_must_agree():
    c = fm_config()
    c.sample.sampler = "pushforward"
    with pytest.raises(config_validation.ConfigError, match="--config.sample.sampler=euler"):
        config_validation.validate(c, num_devices=1)
    c = load("tiny")
    c.sample.sampler = "heun"
    with pytest.raises(config_validation.ConfigError, match="integrates a flow-matching velocity"):
        config_validation.validate(c, num_devices=1)
    c = load("tiny")
    c.imm.objective = "ddpm"
    with pytest.raises(config_validation.ConfigError, match="use 'imm' or 'fm'"):
        config_validation.validate(c, num_devices=1)
