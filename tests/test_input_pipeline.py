"""Input pipeline: IDX reading, Fashion-MNIST layout, determinism, epochs, resume, flips, sharding."""
import gzip
import os
import struct

import jax
import ml_collections
import numpy as np
import pytest

from imm_jax.training import input_pipeline as ip
from imm_jax.training import sharding as sh


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fake_fmnist(d, n=40, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    write_idx(os.path.join(d, "train-images-idx3-ubyte.gz"), imgs)
    write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"), labels)
    write_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"), imgs[:8])
    write_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), labels[:8])
    return imgs, labels


def config(source="synthetic", batch=16, **data):
    return ml_collections.ConfigDict(dict(
        seed=3, model=dict(num_classes=10, image_size=8, in_channels=1),
        data=dict(dict(source=source, batch_size=batch, random_flip=False, path="", synthetic_size=48, pad=2,
                       split="train"), **data)))


def mesh(n=8):
    return sh.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.devices()[:n])


def test_read_idx_and_fashion_mnist_layout(tmp_path):
    imgs, labels = make_fake_fmnist(str(tmp_path))
    np.testing.assert_array_equal(ip.read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), imgs)
    src = ip.fashion_mnist_source(config("fashion_mnist", path=str(tmp_path)).data)
    assert len(src) == 40 and src.num_classes == 10
    b = src.get(np.array([3, 0]), None)
    assert b["image"].shape == (2, 32, 32, 1) and b["image"].dtype == np.float32
    # 2-pixel border is background (-1); the interior is the image scaled to [-1, 1].
    assert np.all(b["image"][:, :2] == -1.0) and np.all(b["image"][:, :, -2:] == -1.0)
    np.testing.assert_allclose(b["image"][0, 2:30, 2:30, 0], imgs[3] / 127.5 - 1.0, rtol=0, atol=2e-7)  # float32 rounding
    np.testing.assert_array_equal(b["label"], labels[[3, 0]])


def test_missing_fashion_mnist_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(ip, "FASHION_MNIST_DIRS", (str(tmp_path / "debian"),))
    import tensorflow_datasets as tfds
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("none")))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        ip.fashion_mnist_source(config("fashion_mnist").data)
    assert "train-images-idx3-ubyte.gz + train-labels-idx1-ubyte.gz" in str(e.value)


def test_explicit_fashion_mnist_path_never_falls_back(tmp_path, monkeypatch):
    """--config.data.path that lacks the files is an error naming it, even when the Debian copy exists."""
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(0)
    for stem, arr, magic in (("train-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
                              b"\x00\x00\x08\x03"),
                             ("train-labels-idx1-ubyte", rng.integers(0, 10, 3, dtype=np.uint8), b"\x00\x00\x08\x01")):
        (debian / stem).write_bytes(magic + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes())
    monkeypatch.setattr(ip, "FASHION_MNIST_DIRS", (str(debian),))
    import tensorflow_datasets as tfds
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("none")))
    assert len(ip.fashion_mnist_source(config("fashion_mnist").data)) == 3  # no path: the Debian copy
    with pytest.raises(FileNotFoundError) as e:
        ip.fashion_mnist_source(config("fashion_mnist", path="/nonexistent").data)
    msg = str(e.value)
    assert "config.data.path='/nonexistent'" in msg and "train-images-idx3-ubyte.gz" in msg
    assert "data_dir='/nonexistent'" in msg and "leave it empty" in msg


def test_real_fashion_mnist_if_installed():
    if ip.find_fashion_mnist(None, "train") is None:
        pytest.skip("dataset-fashion-mnist not installed")
    src = ip.fashion_mnist_source(config("fashion_mnist").data)
    assert len(src) == 60000 and src.images.shape[1:] == (32, 32, 1)
    assert set(np.unique(src.labels)) == set(range(10))


def test_epochs_are_permutations_and_deterministic():
    c = config(batch=16)  # 48 items = 3 batches per epoch
    p1, p2 = ip.Pipeline(c, mesh()), ip.Pipeline(c, mesh())
    for epoch in range(2):
        idx = np.concatenate([p1.indices(3 * epoch + i) for i in range(3)])
        assert sorted(idx.tolist()) == list(range(48))
    assert not np.array_equal(np.concatenate([p1.indices(i) for i in range(3)]),
                              np.concatenate([p1.indices(i) for i in range(3, 6)]))
    for step in (0, 4, 7):
        np.testing.assert_array_equal(p1.indices(step), p2.indices(step))
        b1, b2 = p1.global_batch(step), p2.global_batch(step)
        np.testing.assert_array_equal(np.asarray(b1["image"]), np.asarray(b2["image"]))


def test_resume_sees_same_batches():
    c = config(batch=16, random_flip=True)
    p = ip.Pipeline(c, mesh())
    it = p.iterate(0)
    full = [next(it)[1] for _ in range(6)]
    it.close()
    it = ip.Pipeline(c, mesh()).iterate(4)
    s, b = next(it)
    it.close()
    assert s == 4
    np.testing.assert_array_equal(np.asarray(b["image"]), np.asarray(full[4]["image"]))
    np.testing.assert_array_equal(np.asarray(b["label"]), np.asarray(full[4]["label"]))


def test_random_flip_flips_whole_images():
    c0, c1 = config(batch=48), config(batch=48, random_flip=True)
    a = np.asarray(ip.Pipeline(c0, mesh()).global_batch(0)["image"])
    b = np.asarray(ip.Pipeline(c1, mesh()).global_batch(0)["image"])
    same = np.all(a == b, axis=(1, 2, 3))
    flipped = np.all(a[:, :, ::-1] == b, axis=(1, 2, 3))
    assert np.all(same | flipped) and 5 < flipped.sum() < 43


def test_global_batch_is_sharded_over_batch_axis():
    p = ip.Pipeline(config(batch=16), mesh())
    b = p.global_batch(0)
    assert b["image"].shape == (16, 8, 8, 1) and b["label"].dtype == np.int32
    shards = b["image"].addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (2, 8, 8, 1) for s in shards)
    assert p.rows == (0, 16)


def test_unknown_source():
    with pytest.raises(ValueError, match="config.data.source='nope'"):
        ip.make_source(config("nope"))


def test_tfds_source_on_mock_data():
    """The CIFAR-10 data path (data.source = "tfds"): random access, scaling to [-1, 1], int32 labels, and the
    Pipeline's batches drawn from it; on tfds' mock data (no download)."""
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=24):
        src = ip.TfdsSource("cifar10", "train", None, 10)
        ref = tfds.data_source("cifar10", split="train")
        assert len(src) == 24

        class Batched:  # tfds' mock binds __getitems__ without `self` (its bug); the real sources batch reads
            def __len__(self):
                return len(ref)

            def __getitems__(self, keys):
                return [ref[k] for k in keys]
        src.source = Batched()
        got = src.get(np.array([5, 0, 17]), None)
        want = np.stack([np.asarray(ref[i]["image"]) for i in (5, 0, 17)]).astype(np.float64) / 127.5 - 1
        assert got["image"].shape == (3, 32, 32, 3) and got["image"].dtype == np.float32
        np.testing.assert_allclose(got["image"], want, atol=1e-6)
        assert got["image"].min() >= -1 and got["image"].max() <= 1
        np.testing.assert_array_equal(got["label"], [ref[i]["label"] for i in (5, 0, 17)])
        assert got["label"].dtype == np.int32
        c = config("tfds", batch=8)
        c.model.update(dict(image_size=32, in_channels=3))
        c.data.update(dict(name="cifar10", pad=0))
        pipe = ip.Pipeline(c, mesh())
        pipe.source.source = Batched()
        batch = pipe.global_batch(0)
        assert batch["image"].shape == (8, 32, 32, 3) and np.asarray(batch["label"]).dtype == np.int32
