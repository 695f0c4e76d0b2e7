"""Latent shard format: writer, resumable finalisation, random-access reader, z sampling."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import imm_jax.inference.api
from imm_jax.io import latents

RAW_MEAN = np.array([0.86488, -0.27787343, 0.21616915, 0.3738409])
RAW_STD = np.array([4.85503674, 5.31922414, 3.93725398, 3.9870003])


def _data(n, seed=0, shape=(4, 4, 4)):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(n,) + shape).astype(np.float32) * 3
    std = rng.uniform(0.01, 0.2, size=(n,) + shape).astype(np.float32)
    labels = rng.integers(0, 10, size=(n,)).astype(np.int32)
    return mean, std, labels


def _write_all(path, mean, std, labels, shard_size, storage_dtype="float32", skip=()):
    for k, (a, b) in enumerate(latents.shard_ranges(len(labels), shard_size)):
        if k not in skip:
            latents.write_shard(path, k, a, mean[a:b], std[a:b], labels[a:b], storage_dtype)


def test_shard_ranges():
    assert latents.shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert latents.shard_ranges(8, 4) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        latents.shard_ranges(8, 0)


def test_write_finalize_read(tmp_path):
    mean, std, labels = _data(11)
    path = str(tmp_path / "lat")
    _write_all(path, mean, std, labels, 4, skip=(1,))
    assert latents.shard_is_done(path, 0) and not latents.shard_is_done(path, 1)
    assert not latents.finalize(path, 11, 4)  # shard 1 missing
    with pytest.raises(FileNotFoundError, match="encode_latents"):
        latents.LatentShards(path)
    latents.write_shard(path, 1, 4, mean[4:8], std[4:8], labels[4:8])
    assert latents.finalize(path, 11, 4, metadata={"source": "test"})
    ds = latents.LatentShards(path)
    assert len(ds) == 11 and ds.latent_shape == (4, 4, 4) and ds.metadata == {"source": "test"}
    for i in (0, 3, 4, 7, 8, 10):
        item = ds[i]
        assert item["mean"].shape == item["std"].shape == (4, 4, 4)
        assert item["mean"].dtype == np.float32 and isinstance(item["label"], int)
        np.testing.assert_array_equal(item["mean"], mean[i])
        np.testing.assert_array_equal(item["std"], std[i])
        assert item["label"] == labels[i]
    np.testing.assert_array_equal(ds[-1]["mean"], mean[10])
    with pytest.raises(IndexError):
        ds[11]
    idx = [10, 0, 5, 5, 2]
    batch = ds.get_batch(idx)
    np.testing.assert_array_equal(batch["mean"], mean[idx])
    np.testing.assert_array_equal(batch["std"], std[idx])
    np.testing.assert_array_equal(batch["label"], labels[idx])
    np.testing.assert_array_equal(ds.labels, labels)
    assert sorted(f for f in os.listdir(path) if "tmp" in f) == []


def test_float16_storage(tmp_path):
    mean, std, labels = _data(6, seed=1)
    path = str(tmp_path / "lat16")
    _write_all(path, mean, std, labels, 3, storage_dtype="float16")
    assert latents.finalize(path, 6, 3)
    ds = latents.LatentShards(path)
    assert np.load(os.path.join(path, "shard-00000.mean.npy")).dtype == np.float16
    assert ds[5]["mean"].dtype == np.float32
    np.testing.assert_allclose(ds[5]["mean"], mean[5], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="storage_dtype"):
        latents.write_shard(path, 0, 0, mean, std, labels, "bfloat16")


def test_plan_mismatch_and_corruption_fail_loudly(tmp_path):
    mean, std, labels = _data(8, seed=2)
    path = str(tmp_path / "lat")
    _write_all(path, mean, std, labels, 4)
    with pytest.raises(ValueError, match="different dataset size"):
        latents.finalize(path, 8, 3)  # shard 0 was written with shard_size 4
    assert latents.finalize(path, 8, 4)
    np.save(os.path.join(path, "shard-00001.mean.npy"), mean[:3])  # truncated shard
    ds = latents.LatentShards(path)
    assert ds[0]["label"] == labels[0]
    with pytest.raises(ValueError, match="corrupt"):
        ds[5]
    index = json.load(open(os.path.join(path, "index.json")))
    index["format"] = "something-else"
    json.dump(index, open(os.path.join(path, "index.json"), "w"))
    with pytest.raises(ValueError, match="format"):
        latents.LatentShards(path)


def test_sample_latents_formula():
    mean, std, _ = _data(3, seed=3)
    key = jax.random.key(7)
    got = np.asarray(latents.sample_latents(key, mean, std))
    eps = np.asarray(jax.random.normal(key, mean.shape))
    want = ((mean + std * eps) - RAW_MEAN) / RAW_STD * 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32
    # Fresh noise per key, and the noise really is std-scaled.
    other = np.asarray(latents.sample_latents(jax.random.key(8), mean, std))
    assert not np.allclose(got, other)
    zero = np.asarray(latents.sample_latents(key, mean, np.zeros_like(std)))
    np.testing.assert_allclose(zero, (mean - RAW_MEAN) / RAW_STD * 0.5, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The pre-encoding tool end to end (tiny random VAE, generated JPEGs / mocked TFDS) -> LatentShards.

from PIL import Image  # noqa: E402

from imm_jax.networks import vae  # noqa: E402
from imm_jax.tools import encode_latents  # noqa: E402

TINY = vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


def test_center_crop_arr_matches_adm_steps():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(70, 150, 3), dtype=np.uint8))  # W=150, H=70
    got = encode_latents.center_crop_arr(img, 16)
    # min side 70 >= 32: BOX halve to (75, 35), then to (37, 17); 17 < 32 stops; BICUBIC to short side 16.
    ref = img.resize((75, 35), Image.BOX).resize((37, 17), Image.BOX)
    ref = np.asarray(ref.resize((round(37 * 16 / 17), 16), Image.BICUBIC))  # (35 wide, 16 high)
    assert ref.shape == (16, 35, 3)
    np.testing.assert_array_equal(got, ref[:, 9:25])
    small = encode_latents.center_crop_arr(Image.fromarray(rng.integers(0, 256, (5, 9), np.uint8)), 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8  # grayscale upsampled to RGB


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path, TINY, vae.random_params(TINY, seed=3, norm_noise=0.2))
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    sizes = {"n02": [(20, 30), (40, 17)], "n01": [(16, 16), (33, 50), (64, 64)], "n03": [(18, 25), (30, 30)]}
    for cls, shapes in sizes.items():
        os.makedirs(root / cls)
        for j, (h, w) in enumerate(shapes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            if j == 1:
                Image.fromarray(arr[..., 0]).save(root / cls / f"img{j}.png")  # grayscale PNG
            else:
                Image.fromarray(arr).save(root / cls / f"img{j}.JPEG", quality=95)
    (root / "n01" / "notes.txt").write_text("not an image")
    return str(root)


def test_encode_folder_end_to_end_and_resume(tmp_path, tiny_vae_dir, image_folder, capsys):
    out = str(tmp_path / "lat")
    args = ["--source=folder", f"--data_dir={image_folder}", f"--vae={tiny_vae_dir}", f"--out={out}",
            "--resolution=16", "--per_device_batch=1", "--shard_size=3", "--workers=2"]
    assert encode_latents.main(args) == 0
    ds = latents.LatentShards(out)
    assert len(ds) == 7
    # classes sorted: n01 (3 images) -> 0, n02 (2) -> 1, n03 (2) -> 2
    assert [ds[i]["label"] for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert ds[6]["mean"].shape == ds[6]["std"].shape == (8, 8, 4)
    assert ds.metadata["resolution"] == 16 and ds.metadata["classes"] == ["n01", "n02", "n03"]
    # Stored moments are the VAE posterior of the ADM-cropped image.
    module, params = vae.load_pretrained(tiny_vae_dir)
    src = encode_latents.FolderSource(image_folder)
    crops = np.stack([encode_latents.center_crop_arr(src.load(i)[0], 16) for i in (1, 4)])
    mean, std = vae.encode_images(module, params, crops)
    np.testing.assert_allclose(ds.get_batch([1, 4])["mean"], np.asarray(mean), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds.get_batch([1, 4])["std"], np.asarray(std), rtol=1e-4, atol=1e-5)
    assert float(np.min(std)) > 0

    # The training input pipeline reads these shards: z = normalize(mean + std * eps), labels as stored.
    from imm_jax.training import input_pipeline
    src = input_pipeline.LatentSource(out, num_classes=3)
    batch = src.get([6, 0, 3], np.random.default_rng(0))
    assert len(src) == 7 and batch["image"].shape == (3, 8, 8, 4) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["label"], [2, 0, 1])
    got = ds.get_batch([6, 0, 3])
    eps = (batch["image"] / 0.5 * RAW_STD + RAW_MEAN - got["mean"]) / got["std"]
    assert np.all(np.isfinite(eps)) and 0.5 < eps.std() < 1.5  # really resampled with std-scaled noise

    # Resume: drop shard 1 and the index; only shard 1 is redone, the others are untouched.
    os.remove(os.path.join(out, "shard-00001.json"))
    os.remove(os.path.join(out, "index.json"))
    before = os.stat(os.path.join(out, "shard-00000.mean.npy")).st_mtime_ns
    capsys.readouterr()
    assert encode_latents.main(args) == 0
    log = capsys.readouterr().out
    assert "2 already done, 1 to encode (3 images)" in log and "wrote shard 1 " in log
    assert os.stat(os.path.join(out, "shard-00000.mean.npy")).st_mtime_ns == before
    ds2 = latents.LatentShards(out)
    np.testing.assert_allclose(ds2[4]["mean"], ds[4]["mean"], rtol=1e-5, atol=1e-6)


def test_latent_training_writes_decoded_grids(tmp_path, tiny_vae_dir, image_folder):
    """A latent model trained with config.vae.path gets sample grids decoded through the VAE (16x16 RGB)."""
    from imm_jax.io import images
    from imm_jax import networks
    from imm_jax.training import train
    from test_config import load
    out = str(tmp_path / "lat")
    assert encode_latents.main(["--source=folder", f"--data_dir={image_folder}", f"--vae={tiny_vae_dir}",
                                f"--out={out}", "--resolution=16", "--per_device_batch=1", "--shard_size=4"]) == 0
    c = load("tiny")
    c.model = networks.dit_config(None, image_size=8, in_channels=4, num_classes=3, hidden_size=32, depth=1,
                                  num_heads=2, patch_size=4)
    c.data.update(dict(source="latents", path=out, random_flip=False))
    c.train.update(dict(num_steps=2, sample_every=2))
    c.sample.update(dict(steps=(1,), grid_size=3))
    with c.unlocked():
        c.vae = ml_collections.ConfigDict(dict(path=tiny_vae_dir, dtype="float32"))
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step00000002_1step.png"))
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1, 3)  # 3 decoded 16x16 RGB images on a 2x2 grid, border 1
    # the grid holds what the public decoding of the same latents gives
    sampler = imm_jax.inference.api.Sampler(c, jax.device_get(result["state"].ema[1]), vae_path=tiny_vae_dir)
    want = sampler(3, steps=1, labels=np.arange(3) % 3, seed=42, batch_size=3)
    diff = np.abs(images.make_grid(want, 2).astype(np.int16) - grid)
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
    # Without a usable VAE path the error comes before any sampling, saying what to pass.
    ema = jax.device_get(result["state"].ema[1])
    with c.unlocked():
        c.vae.path = ""
    no_vae = imm_jax.inference.api.Sampler(c, ema)
    with pytest.raises(ValueError, match="pass vae_path=<local diffusers directory"):
        no_vae(3, steps=1)
    hub = imm_jax.inference.api.Sampler(c, ema, vae_path="stabilityai/sd-vae-ft-ema")
    with pytest.raises(FileNotFoundError, match="looks like a model-hub name: imm_jax never downloads"):
        hub(3, steps=1)
    assert no_vae.num_compiles == hub.num_compiles == 0
    # and a training run with a wrong config.vae.path stops at start-up
    from imm_jax.training import config_validation
    with c.unlocked():
        c.vae.path = str(tmp_path / "no-vae")
    with pytest.raises(config_validation.ConfigError, match="is not a local diffusers VAE directory"):
        config_validation.validate(c, num_devices=1)


def test_encode_tfds_mock_two_hosts(tmp_path, tiny_vae_dir, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = str(tmp_path / "lat")
    base = ["--source=tfds", "--tfds_name=imagenet2012", "--split=train", f"--vae={tiny_vae_dir}",
            f"--out={out}", "--resolution=16", "--per_device_batch=1", "--shard_size=2", "--workers=1",
            "--num_hosts=2", "--storage_dtype=float16"]
    with tfds.testing.mock_data(num_examples=5):
        ref = tfds.data_source("imagenet2012", split="train", download=False)
        want_labels = [int(ref[i]["label"]) for i in range(5)]
        assert encode_latents.main(base + ["--host_index=1"]) == 0  # shard 1 of 0..2
        assert not os.path.exists(os.path.join(out, "index.json"))
        assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == ["shard-00001.json"]
        assert encode_latents.main(base + ["--finalize_only"]) == 1
        assert encode_latents.main(base + ["--host_index=0"]) == 0  # shards 0 and 2; writes the index
    assert "wrote" in capsys.readouterr().out
    ds = latents.LatentShards(out)
    assert len(ds) == 5 and ds.index["storage_dtype"] == "float16"
    assert [ds[i]["label"] for i in range(5)] == want_labels
    assert ds[4]["mean"].shape == (8, 8, 4) and ds[4]["mean"].dtype == np.float32
    assert ds.metadata["source"] == "tfds"
