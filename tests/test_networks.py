"""Backbones: shapes/dtypes, analytic param counts, zero-init, conditioning, null labels, precision."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import networks
from imm_jax.networks import dit as dit_lib
from imm_jax.networks import embeddings
from test_convert import np_down, np_up  # NumPy EDM resampling (NCHW), shared with the SongUNet reference


def _count(tree):
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _inputs(batch, size, channels, num_classes, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (batch, size, size, channels), jnp.float32) * 0.5
    t = jax.random.uniform(k2, (batch,), minval=0.1, maxval=0.99)
    s = t * jax.random.uniform(k3, (batch,))
    labels = jnp.arange(batch, dtype=jnp.int32) % max(num_classes, 1) if num_classes else None
    return x, 1000.0 * t, 1000.0 * s, labels


def _init(net, *args):
    """The module's own initialisation. An rbg key: threefry init compiles ~3x slower on XLA:CPU."""
    return jax.jit(net.init)(jax.random.key(0, impl="rbg"), *args)["params"]


def _random_params(net, *args, seed=0):
    """Non-degenerate params of the right structure without compiling init: kernels ~ N(0, 1/fan_in),
    norm scales 1 + noise, everything else small noise (zero-init layers become active)."""
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), *args))["params"]
    rs = np.random.RandomState(seed)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    leaves = []
    for path, leaf in flat:
        name = str(path[-1].key)
        std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.05
        base = 1.0 if name == "scale" else 0.0
        leaves.append(jnp.asarray(base + std * rs.standard_normal(leaf.shape), leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def _apply(net, params, *args):
    return jax.jit(net.apply)({"params": params}, *args)


def tiny_dit(**kw):
    fields = dict(variant=None, image_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2,
                  num_heads=2, patch_size=2)
    fields.update(kw)
    return networks.dit_config(**fields)


# ----------------------------------------------------------------------------------------------- DiT

@pytest.mark.parametrize("variant, count", [("S/2", 33_105_424), ("B/2", 131_091_472),
                                            ("L/2", 459_137_040), ("XL/2", 676_440_592)])
def test_dit_param_counts(variant, count):
    # Spec §6.2: 33.11M / 131.09M / 459.14M / 676.44M with the s embedder, pos-embed excluded.
    net = networks.build(networks.dit_config(variant, image_size=32, in_channels=4, num_classes=1000))
    x, t, s, y = _inputs(2, 32, 4, 1000)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s, y))
    assert set(shapes) == {"params"}  # no fixed pos-embed or other collections
    assert _count(shapes["params"]) == count
    assert round(count / 1e6, 2) == {"S/2": 33.11, "B/2": 131.09, "L/2": 459.14, "XL/2": 676.44}[variant]


def test_dit_xl_without_s_embedder_count():
    cfg = networks.dit_config("XL/2", image_size=32, in_channels=4, num_classes=1000, s_embed=False)
    net = networks.build(cfg)
    x, t, s, y = _inputs(2, 32, 4, 1000)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s, y))
    assert round(_count(shapes["params"]) / 1e6, 2) == 674.82


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_every_variant_output_shape(size, patch):
    cfg = networks.dit_config(f"{size}/{patch}", image_size=32, in_channels=4, num_classes=1000)
    dims = dit_lib.parse_variant(f"{size}/{patch}")
    assert dims["patch_size"] == patch
    net = networks.build(cfg)
    x, t, s, y = _inputs(2, 32, 4, 1000)
    out = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x, t, s, y)[0])
    assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.parametrize("patch", [2, 4, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_dit_runs_every_patch_size(patch, dtype):
    cfg = tiny_dit(patch_size=patch, image_size=16, dtype=dtype)
    net = networks.build(cfg)
    x, t, s, y = _inputs(3, 16, 4, 10)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s, y))
    chex.assert_trees_all_equal_dtypes(shapes, jax.tree.map(lambda a: jnp.zeros((), jnp.float32), shapes))
    out = _apply(net, _random_params(net, x, t, s, y), x, t, s, y)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_patch_layout_matches_numpy(patch):
    """With adaLN-Zero's zero modulation in every block and in the final layer, G(x) is patch embedding,
    position table, LayerNorm and the final linear: checked against a NumPy patchify / unpatchify written with
    explicit pixel indices (pixel (i p + u, j p + w, c) <-> token i g + j, feature (u p + w) C + c)."""
    size, c, d = 16, 3, 32
    cfg = tiny_dit(patch_size=patch, image_size=size, in_channels=c, hidden_size=d)
    net = networks.build(cfg)
    x, t, s, y = _inputs(2, size, c, 10)
    params = jax.tree.map(np.asarray, _random_params(net, x, t, s, y))
    for name in params:  # zero modulation everywhere: blocks are the identity, the final layer unmodulated
        for sub in ("adaLN_modulation",):
            if sub in params[name]:
                params[name][sub] = jax.tree.map(np.zeros_like, params[name][sub])
    g = size // patch
    xn = np.asarray(x, np.float64)
    wx = params["x_embedder"]["kernel"].astype(np.float64)          # (p, p, C, D)
    bx = params["x_embedder"]["bias"].astype(np.float64)
    wf = params["final_layer"]["linear"]["kernel"].astype(np.float64)  # (D, p * p * C)
    bf = params["final_layer"]["linear"]["bias"].astype(np.float64)
    pos = dit_lib.pos_embed_2d(d, g).astype(np.float64)
    want = np.zeros_like(xn)
    for b in range(xn.shape[0]):
        for i in range(g):
            for j in range(g):
                tok = bx + pos[i * g + j]
                for u in range(patch):
                    for w in range(patch):
                        tok = tok + xn[b, i * patch + u, j * patch + w] @ wx[u, w]
                tok = (tok - tok.mean()) / np.sqrt(tok.var() + 1e-6)
                out = tok @ wf + bf
                for u in range(patch):
                    for w in range(patch):
                        want[b, i * patch + u, j * patch + w] = out[(u * patch + w) * c:(u * patch + w + 1) * c]
    got = np.asarray(_apply(net, jax.tree.map(jnp.asarray, params), x, t, s, y))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dit_zero_at_init():
    net = networks.build(tiny_dit())
    x, t, s, y = _inputs(4, 8, 4, 10)
    params = _init(net, x, t, s, y)
    out = _apply(net, params, x, t, s, y)
    assert np.array_equal(np.asarray(out), np.zeros(x.shape, np.float32))
    # Zero-init: every adaLN modulation and the final linear are exactly zero.
    assert not np.any(np.asarray(params["final_layer"]["linear"]["kernel"]))
    assert not np.any(np.asarray(params["blocks_0"]["adaLN_modulation"]["kernel"]))
    assert params["y_embedder"]["embedding_table"].shape == (11, 32)


def test_dit_conditioning_dependence():
    net = networks.build(tiny_dit())
    x, t, s, y = _inputs(4, 8, 4, 10)
    params = _random_params(net, x, t, s, y)
    apply = jax.jit(lambda *a: net.apply({"params": params}, *a))
    base = apply(x, t, s, y)
    assert float(jnp.max(jnp.abs(base))) > 0
    # Changing only s, only t, or only the label changes the output of every sample.
    for args in [(x, t, s + 7.0, y), (x, t + 7.0, s, y), (x, t, s, (y + 1) % 10)]:
        diff = jnp.max(jnp.abs(apply(*args) - base), axis=(1, 2, 3))
        assert bool(jnp.all(diff > 1e-4)), diff
    # Per-sample independence: changing sample 0's s leaves the others unchanged.
    out = apply(x, t, s.at[0].add(7.0), y)
    np.testing.assert_array_equal(np.asarray(out[1:]), np.asarray(base[1:]))


def test_dit_null_label_is_unconditional_path():
    cond = networks.build(tiny_dit())
    uncond = networks.build(tiny_dit(num_classes=0))
    x, t, s, y = _inputs(4, 8, 4, 10)
    params = _random_params(cond, x, t, s, y)
    null = jnp.full((4,), 10, jnp.int32)
    # With the null row zeroed, the null class is exactly the unconditional network.
    table = params["y_embedder"]["embedding_table"].at[10].set(0.0)
    params = {**params, "y_embedder": {"embedding_table": table}}
    uncond_params = {k: v for k, v in params.items() if k != "y_embedder"}
    out_null = _apply(cond, params, x, t, s, null)
    out_uncond = _apply(uncond, uncond_params, x, t, s)
    np.testing.assert_allclose(np.asarray(out_null), np.asarray(out_uncond), rtol=1e-6, atol=1e-6)
    out_label = _apply(cond, params, x, t, s, y)
    assert float(jnp.max(jnp.abs(out_label - out_null))) > 1e-4


def test_dit_bfloat16_close_to_float32():
    cfg32, cfg16 = tiny_dit(), tiny_dit(dtype="bfloat16")
    net32, net16 = networks.build(cfg32), networks.build(cfg16)
    x, t, s, y = _inputs(4, 8, 4, 10)
    params = _random_params(net32, x, t, s, y)
    out32 = _apply(net32, params, x, t, s, y)
    out16 = _apply(net16, params, x, t, s, y)
    assert out16.dtype == jnp.float32
    # bf16 has an 8-bit mantissa (rel. 2^-8 = 0.4%) per op; 2 blocks -> a few percent of the scale.
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.03, rel


def test_dit_bad_inputs_raise():
    net = networks.build(tiny_dit())
    x, t, s, y = _inputs(2, 8, 4, 10)
    with pytest.raises(ValueError, match="labels"):
        net.init(jax.random.key(0), x, t, s, None)
    with pytest.raises(ValueError, match="NHWC"):
        net.init(jax.random.key(0), x[..., :3], t, s, y)
    with pytest.raises(ValueError, match="variant"):
        networks.dit_config("M/2")
    bad = networks.dit_config("S/2")
    bad.name = "resnet"
    with pytest.raises(ValueError, match="model.name"):
        networks.build(bad)


def test_pos_embed_matches_reference_formula():
    d, g = 16, 4
    pe = dit_lib.pos_embed_2d(d, g)
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for i in range(g):
        for j in range(g):
            want = np.concatenate([np.sin(j * omega), np.cos(j * omega),
                                   np.sin(i * omega), np.cos(i * omega)])
            np.testing.assert_allclose(pe[i * g + j], want, rtol=1e-6, atol=1e-7)


def test_dit_timestep_embedding_numpy():
    t = jnp.array([0.0, 3.5, 994.0])
    emb = np.asarray(embeddings.sinusoidal_embedding(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    args = np.asarray(t, np.float64)[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-5)


# ---------------------------------------------------------------------------------------------- UNet

from imm_jax.networks import unet as unet_lib  # noqa: E402


def tiny_unet(**kw):
    fields = dict(image_size=8, in_channels=3, num_classes=0, model_channels=16, channel_mult=(1, 2),
                  num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    fields.update(kw)
    return networks.unet_config(**fields)


def test_unet_param_counts_cifar():
    # Spec §6.1: 56,061,443 with the s path, 55,732,739 without (EDM DDPM++).
    x, t, s, _ = _inputs(2, 32, 3, 0)
    for s_embed, count in [(True, 56_061_443), (False, 55_732_739)]:
        net = networks.build(networks.unet_config(s_embed=s_embed))
        shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s))
        assert set(shapes) == {"params"}
        assert _count(shapes["params"]) == count
    out = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x, t, s)[0])
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_unet_cifar_layout_names():
    net = networks.build(networks.unet_config())
    x, t, s, _ = _inputs(1, 32, 3, 0)
    p = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s))["params"]
    # 16x16 blocks carry attention; 8x8 in0 carries attention, in1 does not (spec §6.1).
    assert "qkv" in p["enc_16x16_block0"] and "qkv" not in p["enc_32x32_block0"]
    assert "qkv" in p["dec_8x8_in0"] and "qkv" not in p["dec_8x8_in1"]
    assert "qkv" in p["dec_16x16_block4"] and "qkv" not in p["dec_16x16_block3"]
    assert p["dec_32x32_block0"]["conv0"]["kernel"].shape == (3, 3, 512, 256)
    assert p["dec_32x32_aux_conv"]["kernel"].shape == (3, 3, 256, 3)
    assert p["map_layer0_s"]["kernel"].shape == (128, 512)


@pytest.mark.parametrize("preset_kw", [
    dict(),
    dict(preset="ncsnpp"),
    dict(encoder_type="skip", decoder_type="skip"),
    dict(num_classes=5, dtype="bfloat16"),
], ids=["ddpmpp", "ncsnpp", "skip-skip", "cond-bf16"])
def test_tiny_unet_variants_run(preset_kw):
    cfg = tiny_unet(**preset_kw)
    net = networks.build(cfg)
    x, t, s, y = _inputs(2, 8, 3, cfg.num_classes)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s, y))
    chex.assert_trees_all_equal_dtypes(shapes, jax.tree.map(lambda a: jnp.zeros((), jnp.float32), shapes))
    out = _apply(net, _random_params(net, x, t, s, y), x, t, s, y)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)


def test_unet_near_zero_at_init_and_conditioning():
    cfg = tiny_unet(num_classes=5)
    net = networks.build(cfg)
    x, t, s, y = _inputs(4, 8, 3, 5)
    params = _init(net, x, t, s, y)
    out0 = _apply(net, params, x, t, s, y)
    # Output conv is xavier x 1e-5: near zero but not exactly zero.
    assert 0 < float(jnp.max(jnp.abs(out0))) < 1e-3
    params = _random_params(net, x, t, s, y)
    apply = jax.jit(lambda *a: net.apply({"params": params}, *a))
    base = apply(x, t, s, y)
    for args in [(x, t, s + 7.0, y), (x, t + 7.0, s, y), (x, t, s, (y + 1) % 5)]:
        diff = jnp.max(jnp.abs(apply(*args) - base), axis=(1, 2, 3))
        assert bool(jnp.all(diff > 1e-4)), diff


def test_unet_null_label_equals_unconditional():
    cond, uncond = networks.build(tiny_unet(num_classes=5)), networks.build(tiny_unet())
    x, t, s, y = _inputs(3, 8, 3, 5)
    params = _random_params(cond, x, t, s, y)
    # The null class is the zero one-hot: only map_label's bias (zero at init) reaches the network.
    params["map_label"]["bias"] = jnp.zeros_like(params["map_label"]["bias"])
    uncond_params = {k: v for k, v in params.items() if k != "map_label"}
    out_null = _apply(cond, params, x, t, s, jnp.full((3,), 5, jnp.int32))
    out_uncond = _apply(uncond, uncond_params, x, t, s)
    np.testing.assert_allclose(np.asarray(out_null), np.asarray(out_uncond), rtol=1e-6, atol=1e-6)


def test_unet_dropout_uses_rng():
    net = networks.build(tiny_unet(dropout=0.5))
    x, t, s, _ = _inputs(2, 8, 3, 0)
    params = _random_params(net, x, t, s)
    run = jax.jit(lambda k: net.apply({"params": params}, x, t, s, train=True, rngs={"dropout": k}))
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.max(jnp.abs(a - c))) > 1e-4
    det = _apply(net, params, x, t, s)
    assert float(jnp.max(jnp.abs(det - a))) > 1e-4


def test_unet_bfloat16_close_to_float32():
    net32, net16 = networks.build(tiny_unet()), networks.build(tiny_unet(dtype="bfloat16"))
    x, t, s, _ = _inputs(2, 8, 3, 0)
    params = _random_params(net32, x, t, s)
    out32, out16 = _apply(net32, params, x, t, s), _apply(net16, params, x, t, s)
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.03, rel  # bf16 8-bit mantissa: ~0.4% per op, a few percent end to end


@pytest.mark.parametrize("f", [(1, 1), (1, 3, 3, 1)])
def test_resampling_matches_numpy(f):
    x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
    nchw = x.transpose(0, 3, 1, 2).astype(np.float64)
    np.testing.assert_allclose(np.asarray(unet_lib.upsample(jnp.asarray(x), f)),
                               np_up(nchw, f).transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(unet_lib.downsample(jnp.asarray(x), f)),
                               np_down(nchw, f).transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_group_norm_matches_numpy():
    from imm_jax.networks import layers
    rs = np.random.RandomState(0)
    x = rs.randn(2, 4, 4, 16).astype(np.float32) * 3 + 1
    scale, bias = rs.randn(16).astype(np.float32), rs.randn(16).astype(np.float32)
    got = np.asarray(layers.group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 4, 1e-6))
    xg = x.astype(np.float64).reshape(2, 16, 4, 4)  # (n, hw, groups, c/g)
    mean, var = xg.mean(axis=(1, 3), keepdims=True), xg.var(axis=(1, 3), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unet_positional_embedding_numpy():
    t = jnp.array([0.0, 6.0, 994.0])
    emb = np.asarray(embeddings.sinusoidal_embedding(t, 8, endpoint=True, sin_first=True))
    freqs = (1 / 10000.0) ** (np.arange(4) / 3)  # endpoint=True: last frequency is 1/10000
    args = np.asarray(t, np.float64)[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], 1), atol=2e-5)


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_remat_keeps_params_and_gradients(family):
    make, k, ch = (tiny_dit, 10, 4) if family == "dit" else (
        lambda **kw: tiny_unet(dropout=0.3, channel_mult=(1,), attn_resolutions=(8,), **kw), 0, 3)
    nets = [networks.build(make(remat=r)) for r in (False, True)]
    x, t, s, y = _inputs(2, 8, ch, k)
    params = _random_params(nets[0], x, t, s, y)
    assert _paths_of(jax.eval_shape(lambda: nets[1].init(jax.random.key(0), x, t, s, y))["params"]) == \
        _paths_of(params)

    def grad(net):
        loss = lambda p: jnp.sum(net.apply({"params": p}, x, t, s, y, train=True,  # noqa: E731
                                           rngs={"dropout": jax.random.key(3)}) ** 2)
        return jax.jit(jax.grad(loss))(params)
    g0, g1 = grad(nets[0]), grad(nets[1])
    # Same math, differently fused float32 programs: agreement to rounding (1e-5 of each leaf's scale).
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


def _paths_of(tree):
    return sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def test_registry_is_explicit():
    assert set(networks.REGISTRY) == {"unet", "dit"}
    assert isinstance(networks.build(networks.unet_config()), unet_lib.SongUNet)
    assert isinstance(networks.build(networks.dit_config("S/2")), dit_lib.DiT)
    with pytest.raises(ValueError, match="unknown model field"):
        networks.unet_config(channels=3)


# ---------------------------------------------------------------------------------------- sharding

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from imm_jax.networks import partitioning  # noqa: E402


def test_leaf_partition_rules():
    spec = partitioning.leaf_partition_spec
    assert spec((1152,), fsdp_size=4) == P()                       # small: replicated
    assert spec((1152, 6912), fsdp_size=4) == P(None, "fsdp")       # largest divisible axis
    assert spec((4608, 1152), fsdp_size=4) == P("fsdp")
    assert spec((3, 3, 512, 256), fsdp_size=4) == P(None, None, "fsdp")
    assert spec((1001, 1152), fsdp_size=8) == P(None, "fsdp")        # 1001 not divisible
    assert spec((1001, 1001), fsdp_size=8) == P()                    # nothing divisible
    assert spec((1024, 1024), fsdp_size=1) == P()
    assert spec((512, 512), fsdp_size=2, min_size=2 ** 18) == P(None, "fsdp")  # ties -> later axis
    assert spec((511, 512), fsdp_size=2, min_size=2 ** 18) == P()  # 261,632 elements < 2^18


def test_partition_specs_xl_tree_and_sharded_apply_matches():
    # Full-size tree via eval_shape: every spec divides its dimension, large tensors are sharded.
    net = networks.build(networks.dit_config("XL/2"))
    x, t, s, y = _inputs(2, 32, 4, 1000)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s, y))["params"]
    specs = partitioning.param_partition_specs(shapes, fsdp_size=4)
    big = 0
    for leaf, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P))):
        if np.prod(leaf.shape) >= 2 ** 18:
            big += 1
            assert "fsdp" in tuple(spec), leaf.shape
            assert leaf.shape[tuple(spec).index("fsdp")] % 4 == 0
        else:
            assert spec == P()
    # per block: adaLN, qkv, proj, fc1, fc2; + t/s mlp_0 and mlp_2, label table, final adaLN
    assert big == 28 * 5 + 6

    # A tiny DiT sharded on a (data=2, fsdp=4) mesh computes the same output as unsharded.
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    net = networks.build(tiny_dit())
    x, t, s, y = _inputs(4, 8, 4, 10)
    params = _random_params(net, x, t, s, y)
    specs = partitioning.param_partition_specs(params, fsdp_size=4, min_size=256)
    assert any("fsdp" in tuple(sp) for sp in jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P)))
    sharded = jax.tree.map(lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp)), params, specs,
                           is_leaf=lambda v: isinstance(v, P))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    out = jax.jit(lambda p, *a: net.apply({"params": p}, *a))(sharded, xs, t, s, y)
    ref = _apply(net, params, x, t, s, y)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_full_size_init_and_bf16_cifar_unet_and_dit_s2():
    # Materialised real-size models: DiT-S/2 is exactly zero at init; bf16 trunk within 5% of float32
    # (relative L2) with random non-zero weights at full depth.
    for cfg, k, size, ch in [(networks.dit_config("S/2", image_size=32, in_channels=4, num_classes=1000), 1000,
                              32, 4), (networks.unet_config(), 0, 32, 3)]:
        net = networks.build(cfg)
        x, t, s, y = _inputs(2, size, ch, k)
        params = _init(net, x, t, s, y)
        assert _count(params) in (33_105_424, 56_061_443)
        out = _apply(net, params, x, t, s, y)
        if cfg.name == "dit":
            assert not np.any(np.asarray(out))
        params = _random_params(net, x, t, s, y)
        out32 = _apply(net, params, x, t, s, y)
        cfg16 = cfg.copy_and_resolve_references()
        cfg16.dtype = "bfloat16"
        out16 = _apply(networks.build(cfg16), params, x, t, s, y)
        rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
        print(f"{cfg.name} bf16 vs f32 relative L2: {rel:.4f}")
        assert bool(jnp.all(jnp.isfinite(out32))) and rel < 0.05, (cfg.name, rel)


def test_unet_config_saved_before_augment_dim_still_builds():
    """Checkpoints converted or trained before model.augment_dim existed keep loading (no augment embedding)."""
    import ml_collections
    cfg = networks.unet_config(image_size=8, in_channels=1, num_classes=0, model_channels=16, channel_mult=(1, 2),
                               num_blocks=1, attn_resolutions=(4,))
    old = cfg.to_dict()
    old.pop("augment_dim")
    net = networks.build(ml_collections.ConfigDict(old))
    assert net.augment_dim == 0 and net == networks.build(cfg)
