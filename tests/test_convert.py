"""Official-checkpoint converter: key mapping, layouts vs NumPy forwards from torch-layout tensors, file readers.

The synthetic state_dicts below are generated from the EDM SongUNet / DiT constructor logic (names and
torch shapes), independently of imm_jax.io.convert's mapping code.
"""
import io
import json
import math
import pickle
import os
import struct
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import config_files, networks
from imm_jax.io import architecture, convert
from imm_jax.networks import embeddings, unet as unet_lib

SQ = math.sqrt(0.5)


# --------------------------------------------------------------------- official-layout generators

def edm_unet_state(rs, cfg, zeros=False):
    """(state_dict in torch layout, module order) for an EDM SongUNet + IMM s path.

    Every encoder (standard | skip | residual) and decoder (standard | skip) type, either resample filter; with
    the Fourier embedding the state has no frequency buffers (imm_jax derives them, see np_unet).
    zeros=True gives zero-stride views instead of random values (full-size key/shape checks, no memory)."""
    sd, order = {}, []
    mc, img, cin0 = cfg.model_channels, cfg.image_size, cfg.in_channels
    noise, emb = mc * cfg.channel_mult_noise, mc * cfg.channel_mult_emb
    f = np.asarray(cfg.resample_filter, np.float64)
    filt = (np.outer(f, f) / f.sum() ** 2)[None, None].astype(np.float32)

    def w(*shape, fan_in):
        if zeros:
            return np.broadcast_to(np.float32(0), shape)
        return (rs.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def lin(name, i, o):
        sd[name + ".weight"], sd[name + ".bias"] = w(o, i, fan_in=i), w(o, fan_in=10)

    def conv(name, i, o, k):
        sd[name + ".weight"], sd[name + ".bias"] = w(o, i, k, k, fan_in=i * k * k), w(o, fan_in=10)

    def norm(name, c):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + w(c, fan_in=100), w(c, fan_in=100)

    def block(name, i, o, up=False, down=False, attn=False):
        norm(name + ".norm0", i)
        conv(name + ".conv0", i, o, 3)
        lin(name + ".affine", emb, o)
        norm(name + ".norm1", o)
        conv(name + ".conv1", o, o, 3)
        if up or down:
            sd[name + ".conv0.resample_filter"] = filt
        if o != i or up or down:
            conv(name + ".skip", i, o, 1)
            if up or down:
                sd[name + ".skip.resample_filter"] = filt
        if attn:
            norm(name + ".norm2", o)
            conv(name + ".qkv", o, 3 * o, 1)
            conv(name + ".proj", o, o, 1)
        order.append(("block", name, dict(i=i, o=o, up=up, down=down, attn=attn)))

    if cfg.num_classes:
        lin("map_label", cfg.num_classes, noise)
    lin("map_layer0", noise, emb)
    lin("map_layer1", emb, emb)
    lin("map_layer0_s", noise, emb)
    lin("map_layer1_s", emb, emb)
    cout, caux, skips = cin0, cin0, []
    for level, mult in enumerate(cfg.channel_mult):
        res = img >> level
        if level == 0:
            conv(f"enc.{res}x{res}_conv", cout, mc, 3)
            order.append(("conv", f"enc.{res}x{res}_conv", {}))
            cout = mc
        else:
            block(f"enc.{res}x{res}_down", cout, cout, down=True)
            if cfg.encoder_type == "skip":  # the input image, filtered down, enters each level by a 1x1 conv
                sd[f"enc.{res}x{res}_aux_down.resample_filter"] = filt
                conv(f"enc.{res}x{res}_aux_skip", caux, cout, 1)
                order += [("aux_down", f"enc.{res}x{res}_aux_down", {}), ("aux_skip", f"enc.{res}x{res}_aux_skip", {})]
            elif cfg.encoder_type == "residual":  # a strided 3x3 conv chain from the input, averaged in
                conv(f"enc.{res}x{res}_aux_residual", caux, cout, 3)
                sd[f"enc.{res}x{res}_aux_residual.resample_filter"] = filt
                order.append(("aux_residual", f"enc.{res}x{res}_aux_residual", {}))
                caux = cout
        skips.append(cout)
        for idx in range(cfg.num_blocks):
            cin, cout = cout, mc * mult
            block(f"enc.{res}x{res}_block{idx}", cin, cout, attn=res in cfg.attn_resolutions)
            skips.append(cout)
    for level in reversed(range(len(cfg.channel_mult))):
        mult, res = cfg.channel_mult[level], img >> level
        if level == len(cfg.channel_mult) - 1:
            block(f"dec.{res}x{res}_in0", cout, cout, attn=True)
            block(f"dec.{res}x{res}_in1", cout, cout)
        else:
            block(f"dec.{res}x{res}_up", cout, cout, up=True)
        for idx in range(cfg.num_blocks + 1):
            cin, cout = cout + skips.pop(), mc * mult
            block(f"dec.{res}x{res}_block{idx}", cin, cout,
                  attn=idx == cfg.num_blocks and res in cfg.attn_resolutions)
        if cfg.decoder_type == "skip" or level == 0:  # skip: every level adds an output, upsampled on the way
            if cfg.decoder_type == "skip" and level < len(cfg.channel_mult) - 1:
                sd[f"dec.{res}x{res}_aux_up.resample_filter"] = filt
                order.append(("aux_up", f"dec.{res}x{res}_aux_up", {}))
            norm(f"dec.{res}x{res}_aux_norm", cout)
            conv(f"dec.{res}x{res}_aux_conv", cout, cin0, 3)
            order.append(("out", f"dec.{res}x{res}_aux", {}))
    return sd, order


def mae_pos_embed(d, g):
    """MAE get_2d_sincos_pos_embed, written from its definition (meshgrid(w, h), first half from grid[0])."""
    gh, gw = np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, g, g)

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)


def official_dit_state(rs, img, c, d, depth, p, k, mlp_ratio=4.0, zeros=False):
    def w(*shape):
        if zeros:
            return np.broadcast_to(np.float32(0), shape)
        return (rs.standard_normal(shape) / np.sqrt(shape[-1] if len(shape) > 1 else 10)).astype(np.float32)

    hid = int(d * mlp_ratio)
    sd = {"x_embedder.proj.weight": w(d, c, p, p) * 2, "x_embedder.proj.bias": w(d),
          "pos_embed": mae_pos_embed(d, img // p)[None].astype(np.float32),
          "y_embedder.embedding_table.weight": w(k + 1, d) * 3,
          "final_layer.linear.weight": w(p * p * c, d), "final_layer.linear.bias": w(p * p * c),
          "final_layer.adaLN_modulation.1.weight": w(2 * d, d), "final_layer.adaLN_modulation.1.bias": w(2 * d)}
    for e in ("t_embedder", "s_embedder"):
        sd.update({f"{e}.mlp.0.weight": w(d, 256), f"{e}.mlp.0.bias": w(d),
                   f"{e}.mlp.2.weight": w(d, d), f"{e}.mlp.2.bias": w(d)})
    for i in range(depth):
        for name, (o, n) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (hid, d),
                             "mlp.fc2": (d, hid), "adaLN_modulation.1": (6 * d, d)}.items():
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = w(o, n), w(o)
    return sd


# ---------------------------------------------------------------------------- NumPy forwards (NCHW)

def silu(x):
    return x / (1 + np.exp(-x))


def np_conv(x, w, b, pad):
    n, c, h, wd = x.shape
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    out = np.zeros((n, w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + ho, j:j + wo], w[:, :, i, j])
    return out + b[None, :, None, None]


def np_gn(x, wt, b, eps=1e-6):
    n, c, h, w = x.shape
    g = min(32, c // 4)
    xg = x.reshape(n, g, -1)
    xg = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
    return xg.reshape(x.shape) * wt[None, :, None, None] + b[None, :, None, None]


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_down(v, f, pad=None):
    """Depthwise stride-2 filtering by f f^T / sum(f)^2, zero padding (len(f) - 1) // 2 (or pad): EDM's down."""
    f = np.asarray(f, np.float64)
    k, pad = len(f), (len(f) - 1) // 2 if pad is None else pad
    filt = np.outer(f, f) / f.sum() ** 2
    vp = np.pad(v, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (vp.shape[2] - k) // 2 + 1, (vp.shape[3] - k) // 2 + 1
    return sum(filt[a, b] * vp[:, :, a:a + 2 * ho:2, b:b + 2 * wo:2] for a in range(k) for b in range(k))


def np_up(v, f):
    """Depthwise stride-2 transposed filtering by 4 f f^T / sum(f)^2, cropped by (len(f) - 1) // 2: EDM's up."""
    f = np.asarray(f, np.float64)
    k, pad = len(f), (len(f) - 1) // 2
    filt = 4 * np.outer(f, f) / f.sum() ** 2
    n, c, h, w = v.shape
    full = np.zeros((n, c, 2 * (h - 1) + k, 2 * (w - 1) + k))
    for a in range(k):  # every input pixel scatters the filter at twice its position
        for b in range(k):
            full[:, :, a:a + 2 * h:2, b:b + 2 * w:2] += filt[a, b] * v
    return full[:, :, pad:pad + 2 * h, pad:pad + 2 * w]


def np_block(sd, name, x, emb, heads, up=False, down=False, attn=False, filt=(1, 1), **_):
    g = lambda k: sd[f"{name}.{k}"].astype(np.float64)  # noqa: E731

    def resample(v):
        if up:
            v = np_up(v, filt)
        if down:
            v = np_down(v, filt)
        return v

    orig = x
    h = np_conv(resample(silu(np_gn(x, g("norm0.weight"), g("norm0.bias")))), g("conv0.weight"),
                g("conv0.bias"), 1)
    h = h + (emb @ g("affine.weight").T + g("affine.bias"))[:, :, None, None]
    h = np_conv(silu(np_gn(h, g("norm1.weight"), g("norm1.bias"))), g("conv1.weight"), g("conv1.bias"), 1)
    if f"{name}.skip.weight" in sd:
        orig = np_conv(resample(orig), g("skip.weight"), g("skip.bias"), 0)
    x = (h + orig) * SQ
    if attn:
        n, c, hh, ww = x.shape
        qkv = np_conv(np_gn(x, g("norm2.weight"), g("norm2.bias")), g("qkv.weight"), g("qkv.bias"), 0)
        qkv = qkv.reshape(n * heads, c // heads, 3, hh * ww)  # EDM's interleaved layout
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        wts = np_softmax(np.einsum("ncq,nck->nqk", q, k / np.sqrt(c // heads)), axis=2)
        a = np.einsum("nqk,nck->ncq", wts, v).reshape(n, c, hh, ww)
        x = (np_conv(a, g("proj.weight"), g("proj.bias"), 0) + x) * SQ
    return x


def np_unet(sd, order, x, t_in, s_in, labels, cfg, augment_labels=None):
    g = lambda k: sd[k].astype(np.float64)  # noqa: E731
    half = cfg.model_channels * cfg.channel_mult_noise // 2

    def pe(t, seed_offset=0):
        if cfg.embedding_type == "fourier":  # EDM's FourierEmbedding: [cos, sin](2 pi f t), f ~ N(0, scale^2)
            freqs = embeddings.fourier_frequencies(2 * half, cfg.fourier_scale, cfg.fourier_seed + seed_offset)
            # phases reach ~1e5 rad (scale 16, t ~ 1e3): formed in float32 as EDM does (outer product of float32
            # t and 2 pi f), else their rounding (~6e-3 rad) alone exceeds the tolerance
            a = (np.asarray(t, np.float32)[:, None] * (2 * np.pi * freqs).astype(np.float32)).astype(np.float64)
        else:
            a = np.asarray(t, np.float64)[:, None] * (1 / 10000) ** (np.arange(half) / (half - 1))
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)  # [cos, sin] flipped by IMM's SongUNet

    emb = pe(t_in)
    if cfg.num_classes:
        onehot = np.eye(cfg.num_classes + 1)[labels][:, :cfg.num_classes]  # null -> zero vector
        emb = emb + (onehot * np.sqrt(cfg.num_classes)) @ g("map_label.weight").T + g("map_label.bias")
    if augment_labels is not None:  # EDM's map_augment: bias-free, added beside the label
        emb = emb + np.asarray(augment_labels, np.float64) @ g("map_augment.weight").T
    emb = silu(emb @ g("map_layer0.weight").T + g("map_layer0.bias")) @ g("map_layer1.weight").T + g("map_layer1.bias")
    emb_s = silu(pe(s_in, 1) @ g("map_layer0_s.weight").T + g("map_layer0_s.bias"))
    emb = silu(emb + emb_s @ g("map_layer1_s.weight").T + g("map_layer1_s.bias"))
    filt = tuple(cfg.resample_filter)
    skips, h, aux, out = [], x, x, None
    for kind, name, kw in order:
        if kind == "conv":
            h = np_conv(h, g(name + ".weight"), g(name + ".bias"), 1)
            skips.append(h)
        elif kind == "block":
            if name.startswith("dec.") and "_block" in name:
                h = np.concatenate([h, skips.pop()], axis=1)
            h = np_block(sd, name, h, emb, cfg.num_heads, filt=filt, **kw)
            if name.startswith("enc."):
                skips.append(h)
        elif kind == "aux_down":
            aux = np_down(aux, filt)
        elif kind == "aux_skip":
            h = skips[-1] = h + np_conv(aux, g(name + ".weight"), g(name + ".bias"), 0)
        elif kind == "aux_residual":  # fused: 3x3 conv padded by 1 + filter pad, then the unpadded stride-2 filter
            r = np_conv(aux, g(name + ".weight"), np.zeros(sd[name + ".bias"].shape), 1 + (len(filt) - 1) // 2)
            r = np_down(r, filt, pad=0) + g(name + ".bias")[None, :, None, None]
            h = skips[-1] = aux = (h + r) / np.sqrt(2)
        elif kind == "aux_up":
            out = np_up(out, filt)
        else:
            tmp = silu(np_gn(h, g(name + "_norm.weight"), g(name + "_norm.bias")))
            tmp = np_conv(tmp, g(name + "_conv.weight"), g(name + "_conv.bias"), 1)
            out = tmp if out is None else tmp + out
    return out


def np_dit(sd, x, t_in, s_in, labels, p, heads):
    g = lambda k: sd[k].astype(np.float64)  # noqa: E731
    n, c, hgt, _ = x.shape
    gs, d = hgt // p, sd["x_embedder.proj.bias"].shape[0]
    patches = x.reshape(n, c, gs, p, gs, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, gs * gs, c * p * p)
    tok = patches @ g("x_embedder.proj.weight").reshape(d, -1).T + g("x_embedder.proj.bias") + g("pos_embed")

    def temb(t, e):
        freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
        a = np.asarray(t, np.float64)[:, None] * freqs
        h = np.concatenate([np.cos(a), np.sin(a)], axis=1) @ g(f"{e}.mlp.0.weight").T + g(f"{e}.mlp.0.bias")
        return silu(h) @ g(f"{e}.mlp.2.weight").T + g(f"{e}.mlp.2.bias")

    cond = temb(t_in, "t_embedder") + temb(s_in, "s_embedder") + g("y_embedder.embedding_table.weight")[labels]

    def ln(v):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)

    def lin(v, name):
        return v @ g(name + ".weight").T + g(name + ".bias")

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        sm, cm, gm, sp, cp, gp = np.split(lin(silu(cond), f"blocks.{i}.adaLN_modulation.1"), 6, axis=1)
        h = ln(tok) * (1 + cm[:, None]) + sm[:, None]
        qkv = lin(h, f"blocks.{i}.attn.qkv").reshape(n, -1, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        att = np_softmax(qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * (d // heads) ** -0.5, axis=-1) @ qkv[2]
        tok = tok + gm[:, None] * lin(att.transpose(0, 2, 1, 3).reshape(n, -1, d), f"blocks.{i}.attn.proj")
        h = ln(tok) * (1 + cp[:, None]) + sp[:, None]
        tok = tok + gp[:, None] * lin(gelu(lin(h, f"blocks.{i}.mlp.fc1")), f"blocks.{i}.mlp.fc2")
        i += 1
    shift, scale = np.split(lin(silu(cond), "final_layer.adaLN_modulation.1"), 2, axis=1)
    out = lin(ln(tok) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    out = out.reshape(n, gs, gs, p, p, c)
    return np.einsum("nhwpqc->nchpwq", out).reshape(n, c, gs * p, gs * p)


# --------------------------------------------------------------------------------------- fixtures

def tiny_unet_cfg(num_classes=3, **kw):
    fields = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), num_heads=2,
                  dropout=0.0)
    return networks.unet_config(image_size=8, in_channels=3, num_classes=num_classes, **{**fields, **kw})


def tiny_dit_cfg():
    return networks.dit_config(None, image_size=8, in_channels=4, num_classes=5, hidden_size=32, depth=2,
                               num_heads=2, patch_size=2)


def _inputs(rs, n, size, c, k):
    x = rs.standard_normal((n, size, size, c)).astype(np.float32)
    t = rs.uniform(100, 990, n).astype(np.float32)
    s = (t * rs.uniform(0, 1, n)).astype(np.float32)
    labels = np.arange(n, dtype=np.int32) % (k + 1) if k else None  # includes the null index k
    return x, t, s, labels


def _paths(tree):
    return {tuple(str(k.key) for k in p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant", [
    dict(),
    dict(preset="ncsnpp"),  # Fourier embedding, (1, 3, 3, 1) filter, residual encoder
    dict(encoder_type="skip", decoder_type="skip", channel_mult=(1, 2, 2)),  # 3 levels: the aux chains compound
    dict(encoder_type="residual", decoder_type="skip", resample_filter=(1, 3, 3, 1), channel_mult=(1, 2, 2)),
], ids=["ddpmpp", "ncsnpp", "skip-skip", "residual-skip-fir"])
def test_unet_every_key_consumed_and_forward_matches_numpy(variant):
    cfg = tiny_unet_cfg(**variant)
    rs = np.random.RandomState(0)
    sd, order = edm_unet_state(rs, cfg)
    wrapped = {"model." + k: v for k, v in sd.items()}  # IMMPrecond-style prefix
    params = convert.convert_state_dict(wrapped, cfg)
    net = networks.build(cfg)
    x, t, s, y = _inputs(rs, 4, 8, 3, 3)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s, y))["params"]
    assert _paths(params) == _paths(shapes)
    ours = np.asarray(jax.jit(net.apply)({"params": params}, x, t, s, y))
    ref = np_unet(sd, order, x.transpose(0, 3, 1, 2).astype(np.float64), t, s, y, cfg).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())


def test_unet_augment_embedding_converts_and_matches_numpy():
    cfg = networks.unet_config(image_size=8, in_channels=3, num_classes=3, model_channels=16, channel_mult=(1, 2),
                               num_blocks=1, attn_resolutions=(4,), num_heads=2, dropout=0.0, augment_dim=9)
    rs = np.random.RandomState(3)
    sd, order = edm_unet_state(rs, cfg)
    sd["map_augment.weight"] = (rs.standard_normal((16, 9)) / 3).astype(np.float32)
    params = convert.convert_state_dict(sd, cfg)
    np.testing.assert_array_equal(np.asarray(params["map_augment"]["kernel"]), sd["map_augment.weight"].T)
    assert architecture.from_shapes(sd)["model.augment_dim"] == 9
    net = networks.build(cfg)
    x, t, s, y = _inputs(rs, 3, 8, 3, 3)
    a = rs.standard_normal((3, 9)).astype(np.float32)
    ours = np.asarray(net.apply({"params": params}, x, t, s, y, augment_labels=a))
    ref = np_unet(sd, order, x.transpose(0, 3, 1, 2).astype(np.float64), t, s, y, cfg, a).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # No label (sampling) is the zero label, as in EDM; a missing embedding refuses labels.
    none = np.asarray(net.apply({"params": params}, x, t, s, y))
    zero = np.asarray(net.apply({"params": params}, x, t, s, y, augment_labels=np.zeros((3, 9), np.float32)))
    np.testing.assert_array_equal(none, zero)
    assert np.abs(none - ours).max() > 1e-3 * np.abs(ours).max()
    with pytest.raises(ValueError, match="augment_dim"):
        networks.build(tiny_unet_cfg()).init(jax.random.key(0), x, t, s, y, augment_labels=a)


def test_unet_attention_block_layout_matches_numpy():
    # One 2-head attention block with a channel change (1x1 skip): conv, linear, qkv de-interleave.
    cfg = tiny_unet_cfg()
    rs = np.random.RandomState(1)
    sd, _ = edm_unet_state(rs, cfg)
    params = convert.convert_state_dict(sd, cfg)["enc_4x4_block0"]
    x = rs.standard_normal((2, 4, 4, 16)).astype(np.float32)
    emb = rs.standard_normal((2, 64)).astype(np.float32)
    block = unet_lib.UNetBlock(32, jnp.float32, attention=True, num_heads=2, skip_scale=SQ)
    ours = np.asarray(block.apply({"params": params}, x, emb, False))
    ref = np_block(sd, "enc.4x4_block0", x.transpose(0, 3, 1, 2).astype(np.float64), emb.astype(np.float64),
                   2, attn=True).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    # The converted qkv kernel is really reordered: q of head 1 comes from EDM rows 1*16*3 + 3*c + 0.
    w = sd["enc.4x4_block0.qkv.weight"][:, :, 0, 0]
    np.testing.assert_array_equal(params["qkv"]["kernel"][0, 0][:, 16 + 5], w[1 * 48 + 3 * 5 + 0])
    np.testing.assert_array_equal(params["qkv"]["kernel"][0, 0][:, 32 + 2], w[0 * 48 + 3 * 2 + 1])


def test_dit_every_key_consumed_and_forward_matches_numpy():
    cfg = tiny_dit_cfg()
    rs = np.random.RandomState(2)
    sd = official_dit_state(rs, 8, 4, 32, 2, 2, 5)
    params = convert.convert_state_dict(sd, cfg)
    net = networks.build(cfg)
    x, t, s, y = _inputs(rs, 6, 8, 4, 5)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, s, y))["params"]
    assert _paths(params) == _paths(shapes)
    assert params["y_embedder"]["embedding_table"].shape == (6, 32)
    ours = np.asarray(jax.jit(net.apply)({"params": params}, x, t, s, y))
    ref = np_dit(sd, x.transpose(0, 3, 1, 2).astype(np.float64), t, s, y, 2, 2).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_full_size_official_key_sets():
    # DiT-XL/2 (ImageNet, 1001-row label table) and the CIFAR-10 DDPM++ at their real shapes; zero-stride
    # arrays keep this free of memory and compute.
    cfg = networks.dit_config("XL/2", image_size=32, in_channels=4, num_classes=1000)
    sd = official_dit_state(None, 32, 4, 1152, 28, 2, 1000, zeros=True)
    assert len(sd) == 28 * 10 + 16  # blocks; x_embedder 2, pos_embed, table, final 4, t/s embedders 8
    params = convert.convert_state_dict({"model." + k: v for k, v in sd.items()}, cfg)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == 676_440_592
    ucfg = networks.unet_config()
    usd, _ = edm_unet_state(None, ucfg, zeros=True)
    uparams = convert.convert_state_dict(usd, ucfg)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(uparams)) == 56_061_443


def test_mismatches_fail_loudly():
    cfg = tiny_dit_cfg()
    sd = official_dit_state(np.random.RandomState(3), 8, 4, 32, 2, 2, 5)
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        convert.convert_state_dict({**sd, "extra.weight": np.zeros(3, np.float32)}, cfg)
    assert len(convert.convert_state_dict({**sd, "extra.weight": np.zeros(3)}, cfg, ignore=[r"^extra\."]))
    missing = dict(sd)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="missing blocks.1.mlp.fc2.bias"):
        convert.convert_state_dict(missing, cfg)
    bad = {**sd, "y_embedder.embedding_table.weight": np.zeros((5, 32), np.float32)}
    with pytest.raises(ValueError, match="shape of y_embedder.embedding_table.weight"):
        convert.convert_state_dict(bad, cfg)
    with pytest.raises(ValueError, match="pos_embed"):
        convert.convert_state_dict({**sd, "pos_embed": sd["pos_embed"][:, ::-1]}, cfg)
    ucfg = tiny_unet_cfg()
    usd, _ = edm_unet_state(np.random.RandomState(4), ucfg)
    key = "enc.4x4_down.conv0.resample_filter"
    with pytest.raises(ValueError, match="resample_filter"):
        convert.convert_state_dict({**usd, key: np.full((1, 1, 4, 4), 1 / 16, np.float32)}, ucfg)


# ----------------------------------------------------------------------------------------- readers

class _FakeTorch:
    """Fake `torch`, `torch._utils`, `torch.storage`, `torch_utils.persistence` modules whose objects
    pickle like the real ones (legacy in-pickle storages, EDM persistent objects), so a synthetic EDM
    checkpoint can be written without torch. Installed in sys.modules only while dumping."""

    def __init__(self):
        torch = types.ModuleType("torch")
        utils = types.ModuleType("torch._utils")
        storage = types.ModuleType("torch.storage")
        tu = types.ModuleType("torch_utils")
        pers = types.ModuleType("torch_utils.persistence")
        nnmod = types.ModuleType("torch.nn.modules.container")

        class FloatStorage:
            pass
        FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
        torch.FloatStorage = FloatStorage

        def _rebuild_tensor_v2(*a):
            raise AssertionError("never called")

        def _rebuild_parameter(*a):
            raise AssertionError("never called")

        def _load_from_bytes(b):
            raise AssertionError("never called")

        def _reconstruct_persistent_obj(meta):
            raise AssertionError("never called")

        for fn, mod in [(_rebuild_tensor_v2, utils), (_rebuild_parameter, utils), (_load_from_bytes, storage),
                        (_reconstruct_persistent_obj, pers)]:
            fn.__module__, fn.__qualname__ = mod.__name__, fn.__name__
            setattr(mod, fn.__name__, fn)

        class ModuleDict:
            pass
        ModuleDict.__module__, ModuleDict.__qualname__ = nnmod.__name__, "ModuleDict"
        nnmod.ModuleDict = ModuleDict
        self.mods = {"torch": torch, "torch._utils": utils, "torch.storage": storage, "torch_utils": tu,
                     "torch_utils.persistence": pers, "torch.nn": types.ModuleType("torch.nn"),
                     "torch.nn.modules": types.ModuleType("torch.nn.modules"), "torch.nn.modules.container": nnmod}
        self.FloatStorage, self.ModuleDict = FloatStorage, ModuleDict
        self.utils, self.storage, self.pers = utils, storage, pers

    def storage_bytes(self, arr):
        """A legacy torch.save of one float32 storage (as TypedStorage.__reduce__ produces)."""
        fake = self

        class Persist:
            def __reduce__(self):
                raise AssertionError

        out = io.BytesIO()
        pickle.dump(0x1950A86A20F9469CFC6C, out, protocol=2)
        pickle.dump(1001, out, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, out, protocol=2)
        p = pickle.Pickler(out, protocol=2)
        p.persistent_id = lambda obj: ("storage", fake.FloatStorage, "k0", "cpu", arr.size, None) \
            if isinstance(obj, Persist) else None
        p.dump(Persist())
        pickle.dump(["k0"], out, protocol=2)
        out.write(struct.pack("<q", arr.size))
        out.write(np.ascontiguousarray(arr, np.float32).tobytes())
        return out.getvalue()

    def tensor(self, arr, parameter=True):
        fake = self
        arr = np.asarray(arr, np.float32)
        flat = arr.reshape(-1)
        strides = tuple(int(s) // 4 for s in np.ascontiguousarray(arr).strides)

        class Storage:
            def __reduce__(self):
                return fake.storage.__dict__["_load_from_bytes"], (fake.storage_bytes(flat),)

        class Tensor:
            def __reduce__(self):
                return fake.utils._rebuild_tensor_v2, (Storage(), 0, arr.shape, strides, False,
                                                       __import__("collections").OrderedDict())

        class Param:
            def __reduce__(self):
                return fake.utils._rebuild_parameter, (Tensor(), False, __import__("collections").OrderedDict())
        return Param() if parameter else Tensor()

    def module(self, params, buffers, children, persistent_name=None, extra=None):
        """A torch module: EDM-persistent (reduces to _reconstruct_persistent_obj(meta)) or a ModuleDict.
        `extra`: more pickled attributes (e.g. persistence's _init_args/_init_kwargs)."""
        import collections
        state = {**(extra or {}), "training": False,
                 "_parameters": collections.OrderedDict((k, self.tensor(v)) for k, v in params.items()),
                 "_buffers": collections.OrderedDict((k, self.tensor(v, False)) for k, v in buffers.items()),
                 "_modules": collections.OrderedDict(children), "device": None}
        fake = self
        if persistent_name:
            meta = dict(type="class", version=6, module_src="raise RuntimeError('source was executed')",
                        class_name=persistent_name, state=state)

            class Persistent:
                def __reduce__(self):
                    return fake.pers._reconstruct_persistent_obj, (meta,)
            return Persistent()
        obj = self.ModuleDict.__new__(self.ModuleDict)
        obj.__dict__.update(state)
        return obj

    def __enter__(self):
        self._saved = {k: sys.modules.get(k) for k in self.mods}
        sys.modules.update(self.mods)
        return self

    def __exit__(self, *exc):
        for k, v in self._saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _nest(sd):
    tree = {}
    for key, value in sd.items():
        *mods, leaf = key.split(".")
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        node.setdefault("__leaves__", {})[leaf] = value
    return tree


def _edm_pickle(sd, path, net_name="SongUNet", precond_state=None, net_state=None):
    """Writes an EDM-style persistence pickle {'ema': IMMPrecond(model=Net(...)), ...} of `sd`; `precond_state`
    and `net_state` are extra pickled attributes of the two persistent objects (e.g. _init_kwargs)."""
    with _FakeTorch() as fake:
        def build(node, name, persistent):
            leaves = node.get("__leaves__", {})
            params = {k: v for k, v in leaves.items() if k != "resample_filter"}
            buffers = {k: v for k, v in leaves.items() if k == "resample_filter"}
            children = {k: build(v, k, persistent=False) for k, v in node.items() if k != "__leaves__"}
            return fake.module(params, buffers, children, persistent_name=name if persistent else None,
                               extra=net_state if persistent else None)

        net = build(_nest(sd), net_name, persistent=True)
        precond = fake.module({}, {}, {"model": net}, persistent_name="IMMPrecond", extra=precond_state)
        with open(path, "wb") as f:
            pickle.dump({"ema": precond, "dataset_kwargs": {"resolution": 8}}, f, protocol=2)


def test_edm_pickle_read_without_running_source(tmp_path):
    cfg = tiny_unet_cfg()
    sd, _ = edm_unet_state(np.random.RandomState(5), cfg)
    path = str(tmp_path / "net.pkl")
    _edm_pickle(sd, path)
    state = convert.extract_state_dict(convert.load_file(path))
    assert set(state) == {"model." + k for k in sd}
    for k, v in sd.items():
        np.testing.assert_array_equal(state["model." + k], v)
    params = convert.convert_state_dict(state, cfg)
    assert _paths(params) == _paths(convert.convert_state_dict(sd, cfg))


def _write_safetensors(sd, path):
    header, blobs, off = {}, [], 0
    for k, v in sd.items():
        b = np.ascontiguousarray(v, np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_cli_npz_and_safetensors_to_sampling_checkpoint(tmp_path):
    from imm_jax.training import checkpointing
    sd = official_dit_state(np.random.RandomState(6), 8, 4, 32, 2, 2, 5)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from imm_jax import networks\n"
        "import importlib.util, pathlib\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {str(_repo_configs() / 'tiny.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "def get_config(arg=None):\n"
        "    c = mod.get_config()\n"
        "    c.model = networks.dit_config(None, image_size=8, in_channels=4, num_classes=5, hidden_size=32,\n"
        "                                  depth=2, num_heads=2, patch_size=2)\n"
        "    return c\n")
    np.savez(tmp_path / "sd.npz", **sd)
    _write_safetensors(sd, str(tmp_path / "sd.safetensors"))
    for name in ("sd.npz", "sd.safetensors"):
        out = tmp_path / f"ckpt_{name.split('.')[1]}"
        convert.main(["--input", str(tmp_path / name), "--output", str(out), "--config", str(cfg_file)])
        config, emas = checkpointing.restore_for_sampling(str(out))
        assert config.model.name == "dit" and list(emas) == ["0.9999"]
        params = emas["0.9999"]
        np.testing.assert_array_equal(np.asarray(params["blocks_1"]["attn"]["qkv"]["kernel"]),
                                      sd["blocks.1.attn.qkv.weight"].T)
    # The sampling API loads the converted checkpoint and generates (guided, 1 step).
    import imm_jax
    sampler = imm_jax.load(str(out))
    x = sampler.generate(jax.random.key(0), labels=[0, 5], steps=1, cfg_scale=1.5)
    assert x.shape == (2, 8, 8, 4) and bool(jnp.all(jnp.isfinite(x)))


def _repo_configs():
    import pathlib
    return pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_kinds_resolve_to_configs():
    for kind, (name, variant) in [("cifar10", ("unet", None)), ("im256_ts_a2", ("dit", "XL/2")),
                                  ("im256_s_a1", ("dit", "XL/2"))]:
        cfg = config_files.load(convert.default_config_spec(kind))
        assert cfg.model.name == name
        if variant:
            assert cfg.model.variant == variant and cfg.model.num_classes == 1000
    assert config_files.load(convert.default_config_spec("im256_ts_a2")).imm.temb == "stride"
    assert config_files.load(convert.default_config_spec("im256_s_a1")).imm.temb == "s"
    for size in ("S", "B", "L", "XL"):  # presets for a DiT of every size with either time input
        for temb in ("s", "stride"):
            cfg = config_files.load(convert.default_config_spec(f"im256_{size.lower()}2_{temb}"))
            assert (cfg.model.variant, cfg.imm.temb, cfg.model.in_channels) == (f"{size}/2", temb, 4)


def test_real_torch_files_read_identically(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 6))
    net.register_buffer("resample_filter", torch.ones(1, 1, 2, 2) / 4)
    net[2].weight.data = net[2].weight.data.t().contiguous().t()  # non-contiguous strides
    want = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    # torch.save zip of a state_dict.
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    got = convert.extract_state_dict(convert.load_file(str(tmp_path / "sd.pt")))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # A plain pickle of {'ema': module} (how EDM pickles store networks), half precision too.
    with open(tmp_path / "net.pkl", "wb") as f:
        pickle.dump({"ema": net.half()}, f)
    got = convert.extract_state_dict(convert.load_file(str(tmp_path / "net.pkl")))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k].astype(np.float16))


@pytest.mark.slow
def test_full_size_cifar_unet_and_dit_s2_forward_match_numpy():
    # Real-size networks with random official-layout weights: CIFAR-10 DDPM++ (1 head at 16x16) and DiT-S/2.
    rs = np.random.RandomState(7)
    cfg = networks.unet_config()
    sd, order = edm_unet_state(rs, cfg)
    params = convert.convert_state_dict(sd, cfg)
    x, t, s, _ = _inputs(rs, 1, 32, 3, 0)
    ours = np.asarray(jax.jit(networks.build(cfg).apply)({"params": params}, x, t, s))
    ref = np_unet(sd, order, x.transpose(0, 3, 1, 2).astype(np.float64), t, s, None, cfg).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())

    dcfg = networks.dit_config("S/2", image_size=32, in_channels=4, num_classes=1000)
    dsd = official_dit_state(rs, 32, 4, 384, 12, 2, 1000)
    dparams = convert.convert_state_dict(dsd, dcfg)
    x, t, s, y = _inputs(rs, 2, 32, 4, 1000)
    ours = np.asarray(jax.jit(networks.build(dcfg).apply)({"params": dparams}, x, t, s, y))
    ref = np_dit(dsd, x.transpose(0, 3, 1, 2).astype(np.float64), t, s, y, 2, 6).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_cli_user_errors_exit_2_and_overwrite(tmp_path, capsys):
    sd = official_dit_state(np.random.RandomState(7), 8, 4, 32, 2, 2, 5)
    np.savez(tmp_path / "sd.npz", **sd)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from imm_jax import networks\nfrom imm_jax.configs import tiny\n"
        "def get_config(arg=None):\n    c = tiny.get_config()\n"
        "    c.model = networks.dit_config(None, image_size=8, in_channels=4, num_classes=5, hidden_size=32,\n"
        "                                  depth=2, num_heads=2, patch_size=2)\n    return c\n")
    out = tmp_path / "ckpt"
    base = ["--input", str(tmp_path / "sd.npz"), "--output", str(out), "--config", str(cfg_file)]

    def fails(args, *expect):
        with pytest.raises(SystemExit) as e:
            convert.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(x in err for x in expect), err

    fails(["--input", str(tmp_path / "missing.pkl"), "--output", str(out), "--kind", "cifar10"],
          "python -m imm_jax.convert: error: --input", "missing.pkl", "no such file")
    convert.main(base)
    assert "wrote" in capsys.readouterr().out
    fails(base, "exists and is not empty; pass --overwrite")
    before = sorted(os.listdir(out))
    convert.main(base + ["--overwrite"])
    assert sorted(os.listdir(out)) == before and not os.path.exists(str(out) + ".converting")
    # a wrong architecture is a user error; the existing output is left as it was
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v for k, v in sd.items() if not k.startswith("blocks.1.")})
    fails(["--input", str(bad)] + base[2:] + ["--overwrite"],
          "does not match the network in the file", "model.depth: the file has 1, the config 2", "--kind auto")
    assert sorted(os.listdir(out)) == before


# ------------------------------------------------------------------------------- architecture checks

# What IMMPrecond records for a tiny DiT (its _init_kwargs; names as the official code's).
_DIT_RECORD = dict(img_resolution=8, img_channels=4, label_dim=5, mixed_precision=None, noise_schedule="fm",
                   model_type="DiT", sigma_data=0.5, f_type="euler_fm", T=0.994, eps=0.0, temb_type="stride",
                   time_scale=1000.0, depth=2, hidden_size=32, patch_size=2, num_heads=2)


def _tiny_dit_config_file(tmp_path, temb="s"):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from imm_jax import networks\nfrom imm_jax.configs import tiny\n"
        "def get_config(arg=None):\n    c = tiny.get_config()\n"
        "    c.model = networks.dit_config(None, image_size=8, in_channels=4, num_classes=5, hidden_size=32,\n"
        "                                  depth=2, num_heads=2, patch_size=2)\n"
        f"    c.imm.update(dict(temb={temb!r}, f_type='euler_fm', t_min=0.0))\n    return c\n")
    return str(cfg_file)


def test_recorded_architecture_builds_the_config(tmp_path, capsys):
    from imm_jax.training import checkpointing
    sd = official_dit_state(np.random.RandomState(8), 8, 4, 32, 2, 2, 5)
    path = str(tmp_path / "net.pkl")
    _edm_pickle(sd, path, net_name="DiT", precond_state={"_init_args": (), "_init_kwargs": dict(_DIT_RECORD),
                                                          "temb_type": "stride", "T": 0.994})
    facts = architecture.recorded(convert.load_file(path))
    assert facts["imm.temb"] == "stride" and facts["imm.f_type"] == "euler_fm" and facts["model.name"] == "dit"
    assert (facts["model.num_classes"], facts["model.hidden_size"], facts["model.depth"]) == (5, 32, 2)
    out = tmp_path / "auto"
    convert.main(["--input", path, "--output", str(out)])  # --kind auto
    printed = capsys.readouterr().out
    assert "architecture (recorded in the file)" in printed and "temb=stride" in printed
    config, emas = checkpointing.restore_for_sampling(str(out))
    assert (config.imm.temb, config.imm.f_type, config.imm.t_min, config.imm.t_max) == ("stride", "euler_fm", 0, 0.994)
    assert (config.model.name, config.model.hidden_size, config.model.num_classes, config.model.image_size) == \
        ("dit", 32, 5, 8)
    np.testing.assert_array_equal(np.asarray(emas["0.9999"]["blocks_1"]["attn"]["qkv"]["kernel"]),
                                  sd["blocks.1.attn.qkv.weight"].T)
    # A preset/config that contradicts the record is an error naming the field; nothing is written.
    wrong = tmp_path / "wrong"
    with pytest.raises(SystemExit) as e:
        convert.main(["--input", path, "--output", str(wrong), "--config", _tiny_dit_config_file(tmp_path, "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "imm.temb: the file has 'stride', the config 's'" in err, err
    assert "--ignore-recorded" in err and not wrong.exists() and not os.path.exists(str(wrong) + ".converting")
    with pytest.raises(SystemExit) as e:
        convert.main(["--input", path, "--output", str(wrong), "--kind", "im256_s_a1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.num_classes: the file has 5, the config 1000" in err, err
    # The matching config converts; --ignore-recorded lets the user overrule a field they know is recorded wrongly.
    convert.main(["--input", path, "--output", str(tmp_path / "ok"), "--config",
                  _tiny_dit_config_file(tmp_path, "stride")])
    convert.main(["--input", path, "--output", str(wrong), "--config", _tiny_dit_config_file(tmp_path, "s"),
                  "--ignore-recorded", "imm.temb"])
    assert checkpointing.restore_for_sampling(str(wrong))[0].imm.temb == "s"


def test_recorded_positional_args_release_names_and_config_lists(tmp_path):
    """Positional _init_args, a standard model_type name (DiT_XL_2 -> variant XL/2), attribute fallback, and
    list values pickled as a list subclass the reader does not know (a config library's list type)."""
    with _FakeTorch() as fake:
        class ListConfig(list):
            pass
        ListConfig.__module__, ListConfig.__qualname__ = "omegaconf.listconfig", "ListConfig"
        mod = types.ModuleType("omegaconf.listconfig")
        mod.ListConfig = ListConfig
        sys.modules.update({"omegaconf": types.ModuleType("omegaconf"), "omegaconf.listconfig": mod})
        try:
            unet = fake.module({}, {}, {}, persistent_name="SongUNet")
            precond = fake.module({}, {}, {"model": unet}, persistent_name="IMMPrecond", extra={
                "_init_args": (32, 3, 0),
                "_init_kwargs": dict(model_type="SongUNet", channel_mult=ListConfig([2, 2, 2]), f_type="simple_edm",
                                     model_channels=128),
                "eps": 0.006, "temb_type": "identity"})
            xl = fake.module({}, {}, {}, persistent_name="IMMPrecond",
                             extra={"_init_kwargs": dict(model_type="DiT_XL_2", temb_type="stride")})
            with open(tmp_path / "u.pkl", "wb") as f:
                pickle.dump({"ema": precond}, f, protocol=2)
            with open(tmp_path / "d.pkl", "wb") as f:
                pickle.dump({"ema": xl}, f, protocol=2)
        finally:
            sys.modules.pop("omegaconf.listconfig"), sys.modules.pop("omegaconf")
    facts = architecture.recorded(convert.load_file(str(tmp_path / "u.pkl")))
    assert facts == {"model.image_size": 32, "model.in_channels": 3, "model.num_classes": 0, "model.name": "unet",
                     "imm.f_type": "simple_edm", "imm.t_min": 0.006, "imm.temb": "s", "model.model_channels": 128,
                     "model.channel_mult": [2, 2, 2]}
    # The packaged CIFAR-10 config agrees with everything recorded for the released CIFAR-10 network.
    assert architecture.mismatches(facts, config_files.load("configs/cifar10.py")) == []
    facts = architecture.recorded(convert.load_file(str(tmp_path / "d.pkl")))
    assert (facts["model.variant"], facts["model.depth"], facts["imm.temb"]) == ("XL/2", 28, "stride")
    assert architecture.mismatches(facts, config_files.load(convert.default_config_spec("im256_ts_a2"))) == []
    assert [m[0] for m in architecture.mismatches(facts, config_files.load(
        convert.default_config_spec("im256_s_a1")))] == ["imm.temb"]
    assert [m[0] for m in architecture.mismatches(facts, config_files.load(
        convert.default_config_spec("im256_b2_stride")))] == ["model.depth", "model.hidden_size", "model.num_heads"]


def test_state_dict_shapes_determine_the_architecture(tmp_path, capsys):
    from imm_jax.training import checkpointing
    # DiT-S/2 from zero-stride views (shapes only): variant, heads, size, classes, s embedder.
    s2 = official_dit_state(None, 32, 4, 384, 12, 2, 1000, zeros=True)
    facts = architecture.from_shapes({"model." + k: v for k, v in s2.items()})
    assert facts == {"model.name": "dit", "model.hidden_size": 384, "model.in_channels": 4, "model.patch_size": 2,
                     "model.depth": 12, "model.s_embed": True, "model.num_classes": 1000, "model.image_size": 32,
                     "model.num_heads": 6, "model.variant": "S/2"}
    # UNet: levels, blocks, attention resolutions, embedding widths.
    ucfg = tiny_unet_cfg()
    usd, _ = edm_unet_state(np.random.RandomState(9), ucfg)
    facts = architecture.from_shapes(usd)
    assert architecture.mismatches(facts, config_files.load("configs/cifar10.py")) != []
    got = {k: facts[k] for k in ("model.channel_mult", "model.num_blocks", "model.attn_resolutions",
                                 "model.model_channels", "model.num_classes", "model.image_size")}
    assert got == {"model.channel_mult": [1, 2], "model.num_blocks": 1, "model.attn_resolutions": [4],
                   "model.model_channels": 16, "model.num_classes": 3, "model.image_size": 8}
    # --kind auto on a state_dict: the time embedding must be stated; then the UNet converts (1 head, as EDM's).
    one_head = networks.unet_config(image_size=8, in_channels=3, num_classes=3, model_channels=16,
                                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), num_heads=1)
    sd, _ = edm_unet_state(np.random.RandomState(9), one_head)
    np.savez(tmp_path / "u.npz", **sd)
    with pytest.raises(SystemExit) as e:
        convert.main(["--input", str(tmp_path / "u.npz"), "--output", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not record the time embedding" in err and "--temb s" in err, err
    convert.main(["--input", str(tmp_path / "u.npz"), "--output", str(tmp_path / "u"), "--temb", "stride"])
    config, emas = checkpointing.restore_for_sampling(str(tmp_path / "u"))
    assert (config.imm.temb, config.model.name, tuple(config.model.channel_mult)) == ("stride", "unet", (1, 2))
    want = convert.convert_state_dict(sd, one_head)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(emas["0.9999"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A DiT of no standard size: the number of heads cannot be inferred, and the message says so.
    np.savez(tmp_path / "d.npz", **official_dit_state(np.random.RandomState(1), 8, 4, 32, 2, 2, 5))
    with pytest.raises(SystemExit) as e:
        convert.main(["--input", str(tmp_path / "d.npz"), "--output", str(tmp_path / "d"), "--temb", "s"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "number of heads is unknown" in err and "model.num_heads" in err, err
