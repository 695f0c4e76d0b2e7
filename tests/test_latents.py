"""Latent shard format: writer, resumable finalisation, random-access reader, z sampling."""
import json
import os

import jax
import numpy as np
import pytest

from imm_jax import latents

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
