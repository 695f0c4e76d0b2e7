"""EDM augmentation (imm_jax.training.augment) against a NumPy reference written from EDM's algorithm (NCHW,
data-dependent margin, zero insertion + np.convolve, explicit affine_grid / grid_sample), closed-form identities
of the transforms, the draw statistics, and the pipeline inside the train step's loss (p = 0, gradients; resume in
the slow tests)."""
import math

import jax
import numpy as np
import pytest

from imm_jax.training import augment

HZ = np.asarray(augment.SYM6, np.float64)
EDM = dict(augment.EDM_CIFAR_OPS)


# ------------------------------------------------------------------------------------- NumPy reference

def T(tx, ty):
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def S(sx, sy):
    return np.diag([sx, sy, 1.0])


def R(th):
    return np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])


def up1d(v):
    z = np.zeros(2 * len(v) - 1)
    z[::2] = v
    return np.convolve(z, HZ)[5:5 + 2 * len(v)]


def down1d(v):
    return np.correlate(np.pad(v, 5), HZ, "valid")[::2]


def grid_sample(img, theta, out_h, out_w):
    """torch affine_grid + grid_sample (bilinear, zeros, align_corners=False) of one (C, H, W) image."""
    c, h, w = img.shape
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            xn, yn = (2 * j + 1) / out_w - 1, (2 * i + 1) / out_h - 1
            gx, gy = theta[0] @ [xn, yn, 1], theta[1] @ [xn, yn, 1]
            ix, iy = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2
            x0, y0 = math.floor(ix), math.floor(iy)
            for yy, wy in ((y0, y0 + 1 - iy), (y0 + 1, iy - y0)):
                for xx, wx in ((x0, x0 + 1 - ix), (x0 + 1, ix - x0)):
                    if 0 <= xx < w and 0 <= yy < h:
                        out[:, i, j] += wy * wx * img[:, yy, xx]
    return out


def np_augment(images, params, pipe, margin="edm"):
    """EDM's AugmentPipe.__call__ on NHWC `images` with the drawn `params`; margin 'edm' (the batch's) or 'max'."""
    x = np.asarray(images, np.float64).transpose(0, 3, 1, 2).copy()
    n, c, h, w = x.shape
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    labels = [[] for _ in range(n)]
    for b in range(n):
        if "xflip" in p:
            if p["xflip"][b] == 1:
                x[b] = x[b][:, :, ::-1]
            labels[b].append(p["xflip"][b])
        if "yflip" in p:
            if p["yflip"][b] == 1:
                x[b] = x[b][:, ::-1, :]
            labels[b].append(p["yflip"][b])
        if "rotate_int" in p:
            k = p["rotate_int"][b]
            if k in (1, 2):
                x[b] = x[b][:, :, ::-1]
            if k in (2, 3):
                x[b] = x[b][:, ::-1, :]
            if k in (1, 3):
                x[b] = x[b].transpose(0, 2, 1)
            labels[b] += [float(k in (1, 2)), float(k in (2, 3))]
        if "translate_int_x" in p:
            tx = int(np.round(p["translate_int_x"][b] * w * pipe.translate_int_max))
            ty = int(np.round(p["translate_int_y"][b] * h * pipe.translate_int_max))
            src = x[b].copy()
            for yy in range(h):
                for xx in range(w):
                    sx = w - 1 - abs(w - 1 - (xx - tx) % (2 * w - 2))
                    sy = h - 1 - abs(h - 1 - (yy + ty) % (2 * h - 2))
                    x[b, :, yy, xx] = src[:, sy, sx]
            labels[b] += [tx / (w * pipe.translate_int_max), ty / (h * pipe.translate_int_max)]
    G = np.stack([np.eye(3)] * n)
    geometric = False
    for b in range(n):
        if "scale" in p:
            s = 2 ** (p["scale"][b] * pipe.scale_std)
            G[b] = G[b] @ S(1 / s, 1 / s)
            labels[b].append(p["scale"][b])
        if "rotate_frac" in p:
            G[b] = G[b] @ R(p["rotate_frac"][b])  # EDM: rotate2d_inv(-w)
            labels[b] += [math.cos(p["rotate_frac"][b]) - 1, math.sin(p["rotate_frac"][b])]
        if "aniso" in p:
            s, r = 2 ** (p["aniso"][b] * pipe.aniso_std), p["aniso_angle"][b]
            G[b] = G[b] @ R(-r) @ S(1 / s, s) @ R(r)
            labels[b] += [p["aniso"][b] * math.cos(r), p["aniso"][b] * math.sin(r)]
        if "translate_frac_x" in p:
            G[b] = G[b] @ T(-p["translate_frac_x"][b] * w * pipe.translate_frac_std,
                            -p["translate_frac_y"][b] * h * pipe.translate_frac_std)
            labels[b] += [p["translate_frac_x"][b], p["translate_frac_y"][b]]
        geometric = geometric or any(k in p for k in ("scale", "rotate_frac", "aniso", "translate_frac_x"))
    if geometric:
        x, G = _np_warp(x, G, margin)
    return x.transpose(0, 2, 3, 1), np.asarray(labels, np.float64).reshape(n, -1)


def _np_warp(x, G, margin):
    n, c, h, w = x.shape
    pad = len(HZ) // 4
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if margin == "edm":
        corners = np.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]]).T
        pts = (G @ corners)[:, :2, :].transpose(1, 0, 2).reshape(2, -1)
        m = np.concatenate([-pts, pts]).max(axis=1) + np.array([pad * 2 - cx, pad * 2 - cy] * 2)
        m = np.minimum(np.maximum(m, 0), [w - 1, h - 1] * 2)
        mx0, my0, mx1, my1 = np.ceil(m).astype(int)
    else:
        mx0 = mx1 = w - 1
        my0 = my1 = h - 1
    x = np.pad(x, ((0, 0), (0, 0), (my0, my1), (mx0, mx1)), mode="reflect")
    G = np.stack([T((mx0 - mx1) / 2, (my0 - my1) / 2) @ g for g in G])
    x = np.apply_along_axis(up1d, 3, x)
    x = np.apply_along_axis(up1d, 2, x)
    G = np.stack([T(-0.5, -0.5) @ S(2, 2) @ g @ S(0.5, 0.5) @ T(0.5, 0.5) for g in G])
    out_h, out_w = (h + 2 * pad) * 2, (w + 2 * pad) * 2
    G = np.stack([S(2 / x.shape[3], 2 / x.shape[2]) @ g @ S(out_w / 2, out_h / 2) for g in G])
    x = np.stack([grid_sample(x[b], G[b], out_h, out_w) for b in range(n)])
    x = np.apply_along_axis(down1d, 3, x)[:, :, :, pad:-pad]
    x = np.apply_along_axis(down1d, 2, x)[:, :, pad:-pad, :]
    return x, G


def _images(n=4, h=8, w=8, c=2, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, h, w, c)).astype(np.float32)


def _params(pipe, n, seed=1):
    return {k: np.asarray(v) for k, v in augment.draw(pipe, jax.random.key(seed), n).items()}


# ------------------------------------------------------------------------------------------------ tests

def test_filter_is_the_orthonormal_sym6_lowpass():
    assert len(HZ) == 12 and abs(HZ.sum() - math.sqrt(2)) < 1e-12 and abs((HZ ** 2).sum() - 1) < 1e-12
    for m in (1, 2, 3, 4, 5):  # orthogonal to its even shifts
        assert abs(HZ[2 * m:] @ HZ[:-2 * m]) < 1e-12


@pytest.mark.parametrize("op", sorted(augment.LABEL_WIDTH))
def test_each_operation_matches_numpy_reference(op):
    pipe = augment.AugmentPipe(p=1.0, **{op: 1.0}, translate_int_max=0.25)
    x = _images(n=5, seed=2)
    params = _params(pipe, 5, seed=3)
    got_x, got_l = augment.apply(pipe, x, params)
    ref_x, ref_l = np_augment(x, params, pipe, margin="max")
    assert got_l.shape == (5, augment.LABEL_WIDTH[op]) == ref_l.shape
    np.testing.assert_allclose(np.asarray(got_l), ref_l, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_x), ref_x, rtol=0, atol=2e-5)
    assert not np.allclose(np.asarray(got_x), x, atol=1e-3)  # the operation did something


def test_edm_cifar_pipeline_matches_numpy_reference_and_edm_margin():
    pipe = augment.AugmentPipe(p=0.6, **EDM)
    assert pipe.label_dim == 9 and pipe.ops == ("xflip", "yflip", "scale", "rotate_frac", "aniso",
                                                 "translate_frac")
    x = _images(n=6, h=8, w=8, c=3, seed=4)
    params = _params(pipe, 6, seed=5)
    got_x, got_l = augment.apply(pipe, x, params)
    ref_x, ref_l = np_augment(x, params, pipe, margin="max")
    np.testing.assert_allclose(np.asarray(got_l), ref_l, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_x), ref_x, rtol=0, atol=2e-5)
    # EDM pads by the batch's own margin; the fixed (H-1, W-1) margin differs only by the filter's border.
    edm_x, _ = np_augment(x, params, pipe, margin="edm")
    assert np.abs(edm_x - ref_x).max() < 5e-3, np.abs(edm_x - ref_x).max()


def test_closed_form_identities():
    """Zero parameters are the identity; a quarter turn is rot90 (counter-clockwise as displayed); a whole-pixel translation is a shift; a 2x
    scale reads the input at half the distance from the centre (interior of a smooth image)."""
    pipe = augment.AugmentPipe(p=1.0, **EDM)
    n, h = 2, 16
    yy, xx = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    smooth = np.stack([np.cos(2 * np.pi * xx / h) * np.sin(2 * np.pi * yy / h + 0.3),
                       np.cos(2 * np.pi * (xx + 2 * yy) / (2 * h))], -1)
    x = np.stack([smooth, -smooth]).astype(np.float32)
    zero = {k: np.zeros((n,), np.int32 if k in ("xflip", "yflip") else np.float32)
            for k in _params(pipe, n)}
    got, labels = augment.apply(pipe, x, zero)
    np.testing.assert_allclose(np.asarray(got), x, atol=1e-5)
    assert np.all(np.asarray(labels) == 0)
    quarter = dict(zero, rotate_frac=np.full((n,), np.pi / 2, np.float32))
    got = np.asarray(augment.apply(pipe, x, quarter)[0])
    # (approximate: sym6 is not symmetric, so filtering does not commute with the turn; measured 0.040)
    np.testing.assert_allclose(got, np.rot90(x, 1, axes=(1, 2)), atol=5e-2)
    assert np.abs(got - np.rot90(x, 3, axes=(1, 2))).max() > 1.0  # and the turn has the right direction
    shift = dict(zero, translate_frac_x=np.full((n,), 2 / (h * pipe.translate_frac_std), np.float32))
    got = np.asarray(augment.apply(pipe, x, shift)[0])
    np.testing.assert_allclose(got[:, :, 2:], x[:, :, :-2], atol=1e-4)  # content moves right by 2 pixels
    twice = dict(zero, scale=np.full((n,), 1 / pipe.scale_std, np.float32))  # s = 2
    got = np.asarray(augment.apply(pipe, x, twice)[0])
    c = (h - 1) / 2
    for i, j in [(4, 4), (6, 9), (10, 5)]:  # output (i, j) reads input at the centre + half the offset
        si, sj = c + (i - c) / 2, c + (j - c) / 2
        i0, j0 = int(np.floor(si)), int(np.floor(sj))
        fi, fj = si - i0, sj - j0
        want = ((1 - fi) * (1 - fj) * x[:, i0, j0] + (1 - fi) * fj * x[:, i0, j0 + 1]
                + fi * (1 - fj) * x[:, i0 + 1, j0] + fi * fj * x[:, i0 + 1, j0 + 1])
        np.testing.assert_allclose(got[:, i, j], want, atol=3e-2)


def test_draws_follow_the_probabilities():
    n, p = 20000, 0.3
    pipe = augment.AugmentPipe(p=p, **EDM)
    d = _params(pipe, n, seed=7)
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(d["xflip"].mean() - 0.5) < 0.02  # multiplier 1e8: every sample gets a fair coin
    assert abs(d["yflip"].mean() - p / 2) < tol
    for k in ("scale", "rotate_frac", "aniso", "translate_frac_x"):
        assert abs((d[k] != 0).mean() - p) < tol, k
    assert np.array_equal(d["translate_frac_x"] != 0, d["translate_frac_y"] != 0)  # one gate for both axes
    assert abs((d["aniso_angle"] != 0).mean() - pipe.aniso_rotate_prob) < 0.02  # independent of the gate
    on = d["rotate_frac"][d["rotate_frac"] != 0]
    assert on.min() >= -np.pi and on.max() <= np.pi and abs(np.mean(np.abs(on)) - np.pi / 2) < 0.05
    assert abs(np.std(d["scale"][d["scale"] != 0]) - 1) < 0.05
    # a pure function of the key
    again = _params(pipe, n, seed=7)
    assert all(np.array_equal(d[k], again[k]) for k in d)
    assert not augment.AugmentPipe(p=0.0, **EDM).active


def test_sharded_augmentation_equals_single_device():
    from jax.sharding import NamedSharding, PartitionSpec as P
    pipe = augment.AugmentPipe(p=0.5, **EDM)
    x = _images(n=16, h=8, w=8, c=1, seed=9)
    fn = jax.jit(lambda im, k: augment.augment(pipe, im, k))
    ref = fn(x, jax.random.key(3))
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    got = fn(xs, jax.random.key(3))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # batch-parallel: the compiled program moves no images between devices
    hlo = fn.lower(xs, jax.random.key(3)).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo, [l for l in hlo.splitlines() if "all-" in l][:5]


def test_config_validation_messages():
    from imm_jax.training import config_validation
    from test_config import load

    def errors(**kw):
        c = load("tiny", "augment")
        for k, v in kw.items():
            node, *path = k.split("__")
            target = getattr(c, node)
            for part in path[:-1]:
                target = getattr(target, part)
            setattr(target, path[-1], v)
        with pytest.raises(ValueError) as e:
            config_validation.validate(c, num_devices=1)
        return str(e.value)

    config_validation.validate(load("tiny", "augment"), num_devices=1)
    assert "leak" in errors(model__augment_dim=0) and "augment_dim=9" in errors(model__augment_dim=0)
    assert "width 9" in errors(model__augment_dim=4)
    assert "only ever see zero labels" in errors(data__augment_p=0.0)
    assert "must be in [0, 1]" in errors(data__augment_p=1.5)
    assert "unknown operations ['shear']" in errors(data__augment_ops__shear=1.0)
    c = load("tiny")
    c.model.augment_dim = 9
    with pytest.raises(ValueError, match="only the DDPM\\+\\+ UNet"):
        config_validation.validate(c, num_devices=1)


def test_train_loss_with_augmentation_p0_and_gradients():
    """The train step's loss augments (and at p = 0 is the plain IMM loss), and the augment embedding gets
    gradients. Sharding is checked on the pieces: the augmentation (test_sharded_augmentation_equals_single_device)
    and the train step (test_train), both plain jit over the global batch."""
    from imm_jax.core import losses
    from imm_jax.training import input_pipeline, sharding, train
    from test_config import load

    c = load("tiny", "augment")
    tr = train.Trainer(c, mesh=sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))
    params = tr.init().params
    batch = input_pipeline.Pipeline(c, tr.mesh).global_batch(0)
    key = jax.random.key(0)
    off = load("tiny", "augment")
    off.data.augment_p = 0.0
    loss_aug = lambda p: train.make_loss_fn(c, tr.net, tr.objective)(p, batch, key, 0)[0]

    def losses_and_grad(p):
        plain = losses.imm_loss(tr.net, p, batch["image"], batch["label"], key, objective=tr.objective,
                                train=True, step=0)[0]
        loss_off = train.make_loss_fn(off, tr.net, tr.objective)(p, batch, key, 0)[0]
        aug, grads = jax.value_and_grad(loss_aug)(p)
        return aug, loss_off, plain, grads["map_augment"]["kernel"]
    aug, loss_off, plain, grad = jax.jit(losses_and_grad)(params)
    # The augmentation changes the loss ...
    assert float(aug) != float(loss_off)
    # ... at p = 0 the loss is the unaugmented one (same images, no augmentation label) ...
    assert float(plain) == float(loss_off)
    # ... and the augmentation labels reach the network through a trained embedding.
    assert np.abs(np.asarray(grad)).max() > 0


@pytest.mark.slow
def test_resume_is_bit_exact_with_augmentation(tmp_path):
    from test_config import load
    from test_train import run_killed_and_resumed

    _, resumed, ref, got = run_killed_and_resumed(lambda: load("tiny", "augment"), tmp_path)
    assert resumed["final_step"] == 6 and sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert all(got[s] == ref[s] for s in ref), (got, ref)
