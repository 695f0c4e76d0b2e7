"""Backbones: shapes/dtypes, analytic param counts, zero-init, conditioning, null labels, precision."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import networks
from imm_jax.networks import dit as dit_lib
from imm_jax.networks import embeddings


def _count(tree):
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _inputs(batch, size, channels, num_classes, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (batch, size, size, channels), jnp.float32) * 0.5
    t = jax.random.uniform(k2, (batch,), minval=0.1, maxval=0.99)
    s = t * jax.random.uniform(k3, (batch,))
    labels = jnp.arange(batch, dtype=jnp.int32) % max(num_classes, 1) if num_classes else None
    return x, 1000.0 * t, 1000.0 * s, labels


def _perturb(params, seed=1, scale=0.05):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
                                        for leaf, k in zip(leaves, keys)])


def _init(net, *args):
    return jax.jit(net.init)(jax.random.key(0), *args)["params"]


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
    params = _init(net, x, t, s, y)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    out = _apply(net, _perturb(params), x, t, s, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


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
    params = _perturb(_init(net, x, t, s, y))
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
    params = _perturb(_init(cond, x, t, s, y))
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
    params = _perturb(_init(net32, x, t, s, y), scale=0.1)
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
