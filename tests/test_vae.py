"""SD-VAE (kl-f8 AutoencoderKL) in Flax: architecture, loader, normalisation, and parity with diffusers."""
import os

import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from imm_jax.networks import vae

TINY = vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny_params():
    return vae.random_params(TINY, seed=0, norm_noise=0.3)


def test_kl_f8_param_count_and_shapes():
    shapes = vae.param_shapes(vae.KL_F8)
    # diffusers' AutoencoderKL with the sd-vae-ft-ema config has 83,653,863 parameters.
    assert vae.count_params(shapes) == 83_653_863
    assert shapes["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 128)
    assert shapes["encoder"]["conv_out"]["kernel"].shape == (3, 3, 512, 8)
    assert shapes["quant_conv"]["kernel"].shape == (1, 1, 8, 8)
    assert shapes["post_quant_conv"]["kernel"].shape == (1, 1, 4, 4)
    assert shapes["decoder"]["conv_in"]["kernel"].shape == (3, 3, 4, 512)
    assert shapes["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].shape == (512, 512)
    assert set(shapes["decoder"]["up_blocks_0"]) == {"resnets_0", "resnets_1", "resnets_2", "upsamplers_0"}
    assert "upsamplers_0" not in shapes["decoder"]["up_blocks_3"]
    assert "downsamplers_0" not in shapes["encoder"]["down_blocks_3"]
    # Full-size encode/decode shapes at 256x256, traced only.
    m = vae.AutoencoderKL(vae.KL_F8)
    img = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    mean, std = jax.eval_shape(lambda p, x: m.apply({"params": p}, x, method=m.encode), shapes, img)
    assert mean.shape == std.shape == (2, 32, 32, 4)
    out = jax.eval_shape(lambda p, z: m.apply({"params": p}, z, method=m.decode), shapes, mean)
    assert out.shape == (2, 256, 256, 3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_shapes_and_dtypes(tiny_params, dtype):
    m = vae.AutoencoderKL(TINY, dtype=vae.compute_dtype(dtype))
    imgs = jax.random.randint(jax.random.key(2), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)

    @jax.jit
    def round_trip(p, imgs):
        mean, std = vae.encode_images(m, p, imgs)
        out = vae.decode_to_uint8(m, p, vae.normalize_latents(mean))
        raw = m.apply({"params": p}, mean, method=m.decode)
        return mean, std, out, raw

    mean, std, out, raw = round_trip(tiny_params, imgs)
    assert mean.shape == std.shape == (2, 8, 8, 4)
    assert mean.dtype == std.dtype == jnp.float32
    assert bool(jnp.all(std > 0)) and bool(jnp.all(jnp.isfinite(mean)))
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.uint8
    assert raw.dtype == jnp.float32 and raw.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(raw)))
    # decode_to_uint8 = quantise(decode(denormalize(normalize(mean)))) = quantise(decode(mean)) up to rounding.
    diff = np.abs(np.asarray(out, np.int32) - np.asarray(vae.vae_output_to_uint8(raw), np.int32))
    assert diff.max() <= (1 if dtype == "float32" else 8) and diff.mean() < 0.5
    # Params stay float32 whatever the compute dtype.
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(tiny_params))


def test_bfloat16_close_to_float32(tiny_params):
    imgs = jax.random.randint(jax.random.key(3), (1, 16, 16, 3), 0, 256).astype(jnp.uint8)
    m32 = vae.AutoencoderKL(TINY)
    m16 = vae.AutoencoderKL(TINY, dtype=jnp.bfloat16)
    a = jax.jit(lambda p, x: vae.encode_images(m32, p, x)[0])(tiny_params, imgs)
    b = jax.jit(lambda p, x: vae.encode_images(m16, p, x)[0])(tiny_params, imgs)
    rel = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    assert 0 < rel < 0.1  # bf16 really is used, and stays close


def test_normalisation_constants_and_inverse():
    # spec §6.3: x = (z - raw_mean) / raw_std * 0.5
    z = np.random.default_rng(0).normal(size=(3, 2, 2, 4)).astype(np.float32) * 5
    want = (z - np.array([0.86488, -0.27787343, 0.21616915, 0.3738409])) / np.array(
        [4.85503674, 5.31922414, 3.93725398, 3.9870003]) * 0.5
    np.testing.assert_allclose(np.asarray(vae.normalize_latents(z)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vae.denormalize_latents(vae.normalize_latents(z))), z,
                               rtol=1e-5, atol=1e-5)


def test_output_quantisation():
    x = jnp.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    got = np.asarray(vae.vae_output_to_uint8(x))
    np.testing.assert_array_equal(got, [0, 0, 127, 254, 255, 255])  # floor((x/2+1/2).clip(0,1)*255)


def test_load_bf16_weights(tmp_path, tiny_params):
    # Official VAE exports may store bfloat16; load_pretrained widens them to float32 params.
    vae.save_pretrained(tmp_path, TINY, tiny_params)
    sd = safetensors.numpy.load_file(tmp_path / vae.WEIGHTS_NAME)
    safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()},
                                tmp_path / vae.WEIGHTS_NAME)
    _, params = vae.load_pretrained(tmp_path)
    want = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), tiny_params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)
    assert all(np.asarray(a).dtype == np.float32 for a in jax.tree_util.tree_leaves(params))


def test_load_synthetic_diffusers_dir(tmp_path, tiny_params):
    vae.save_pretrained(tmp_path, TINY, tiny_params)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    sd = safetensors.numpy.load_file(tmp_path / vae.WEIGHTS_NAME)
    # Torch layouts and names.
    assert sd["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
    assert sd["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
    assert "encoder.down_blocks.0.downsamplers.0.conv.bias" in sd
    assert "decoder.up_blocks.0.resnets.0.conv_shortcut.weight" not in sd  # 64 -> 64
    assert sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].shape == (32, 64, 1, 1)
    assert len(sd) == len(jax.tree_util.tree_leaves(tiny_params))
    module, params = vae.load_pretrained(tmp_path, dtype="float32")
    assert module.config == TINY
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           params, tiny_params)


def test_legacy_attention_names(tiny_params):
    sd = vae.state_dict_from_params(tiny_params)
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    params = vae.params_from_state_dict(legacy, TINY)
    np.testing.assert_array_equal(params["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
                                  tiny_params["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"])


def test_missing_key_and_wrong_shape_fail_loudly(tiny_params):
    sd = vae.state_dict_from_params(tiny_params)
    missing = dict(sd)
    del missing["decoder.up_blocks.0.resnets.1.norm2.weight"]
    with pytest.raises(ValueError, match=r"missing.*decoder\.up_blocks\.0\.resnets\.1\.norm2\.weight"):
        vae.params_from_state_dict(missing, TINY)
    bad = dict(sd)
    bad["encoder.conv_out.weight"] = np.zeros((8, 64, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"encoder\.conv_out\.weight.*shape"):
        vae.params_from_state_dict(bad, TINY)
    extra = dict(sd)
    extra["encoder.unexpected.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match=r"does not use.*encoder\.unexpected\.weight"):
        vae.params_from_state_dict(extra, TINY)
    with pytest.raises(ValueError, match="mismatch|shape"):  # a full-size checkpoint vs a tiny config
        vae.params_from_state_dict(sd, vae.VAEConfig(block_out_channels=(32, 32), layers_per_block=1,
                                                     norm_num_groups=8))


def test_config_json_validation(tmp_path):
    cfg = vae.KL_F8.to_diffusers()
    assert vae.VAEConfig.from_diffusers(cfg) == vae.KL_F8
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        vae.VAEConfig.from_diffusers({**cfg, "down_block_types": ["CrossAttnDownBlock2D"] * 4})
    with pytest.raises(FileNotFoundError, match="config.json"):
        vae.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        vae.compute_dtype("float8")


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers (optional `parity` extra: torch==2.13.0, diffusers, safetensors).

def _diffusers_parity(config: vae.VAEConfig, image_size: int, tmp_path, seed=0):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in config.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():  # non-trivial norm parameters and biases
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    ref.eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    module, params = vae.load_pretrained(tmp_path)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(2, 3, image_size, image_size)).astype(np.float32)
    f = image_size // config.downsample_factor
    z = rng.normal(size=(2, config.latent_channels, f, f)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_std = dist.mean.numpy(), dist.std.numpy()
        ref_dec = ref.decode(torch.from_numpy(z)).sample.numpy()
    enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
    dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
    mean, std = enc(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    out = dec(params, jnp.asarray(z.transpose(0, 2, 3, 1)))
    errs = {
        "mean": float(np.max(np.abs(np.asarray(mean).transpose(0, 3, 1, 2) - ref_mean))),
        "std": float(np.max(np.abs(np.asarray(std).transpose(0, 3, 1, 2) - ref_std))),
        "decode": float(np.max(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref_dec))),
    }
    print(f"parity max abs errors ({config.block_out_channels}, {image_size}px): {errs}")
    return errs


@pytest.mark.slow
def test_parity_with_diffusers_tiny(tmp_path):
    cfg = vae.VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32)
    errs = _diffusers_parity(cfg, 32, tmp_path)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.slow
def test_parity_with_diffusers_kl_f8(tmp_path):
    errs = _diffusers_parity(vae.KL_F8, 64, tmp_path)
    assert max(errs.values()) < 1e-4, errs
