"""A PyTorch DiT with IMM's two-time conditioning, the comparison network of bench/vs_torch.py.

The same layers as `imm_jax.networks.dit.DiT` (spec §6.2; DiT, Peebles & Xie): 2-D sin-cos position table,
patch embedding, t/s timestep embedders and a label table summed into the conditioning vector, adaLN-Zero
blocks (LayerNorm without affine, eps 1e-6; fused qkv; `scaled_dot_product_attention`; GELU(tanh) MLP),
the adaLN final layer. Parameter names are those of the official checkpoints, so
`imm_jax.io.convert.convert_state_dict` maps this module's state_dict onto imm_jax's params: that is how
bench/vs_torch.py checks that both networks compute the same function before timing them. (diffusers'
DiTTransformer2DModel is not this network: its blocks carry their own timestep and label embedders, 39.8M
parameters in the S/2 configuration against 33.1M.)

Also the IMM pieces the benchmark times around it, written from the spec's formulas for the configuration
of configs/imagenet256.py (Euler-FM parameterisation on the OT-FM path, sigma_d 0.5, temb "s", time scale
1000, t in [0, 0.994], k = 12, M = 4, Laplace kernel, w(s, t) of spec §3.4 with a = 1, b = 4):
`imm_f` (f_{s,t} with optional CFG), `pushforward` and `IMMStep` (online pass with gradient, target pass
without, grouped MMD, backward, AdamW, the two EMAs). Inputs are NCHW.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imm_jax.networks.dit import pos_embed_2d  # the fixed sin-cos table (a constant buffer, not a parameter)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        half = freq // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half),
                             persistent=False)

    def forward(self, t):
        args = t[:, None].float() * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    """G(x (B, C, H, W), t_in (B,), s_in (B,), y (B,) int) -> (B, C, H, W)."""

    def __init__(self, image_size=32, in_channels=4, num_classes=1000, hidden_size=384, depth=12, num_heads=6,
                 patch_size=2, mlp_ratio=4.0):
        super().__init__()
        self.p, self.c = patch_size, in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        grid = image_size // patch_size
        self.register_buffer("pos_embed", torch.from_numpy(pos_embed_2d(hidden_size, grid))[None])
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        # Random weights everywhere (speed does not depend on them; adaLN-Zero's zeros would make G = 0).
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)

    def forward(self, x, t_in, s_in, y):
        b, _, h, w = x.shape
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t_in) + self.s_embedder(s_in) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)
        g, p = h // self.p, self.p
        out = out.reshape(b, g, g, p, p, self.c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.c, h, w)


# ------------------------------------------------------------------------------ IMM around the network

SIGMA_D, T_MAX, T_MIN, TIME_SCALE = 0.5, 0.994, 0.0, 1000.0


def imm_f(net, x, s, t, y, cfg_scale=None, null_label=1000):
    """f_{s,t}(x_t) = x_t - (t - s) sigma_d G(c_in(t) x_t, 1000 t, 1000 s, y) (Euler-FM, OT-FM path).

    CFG on G: the unconditional and conditional halves in one batch, G_u + w (G_c - G_u).
    """
    c_in = 1.0 / (SIGMA_D * torch.sqrt((1 - t) ** 2 + t ** 2))
    x_in = c_in[:, None, None, None] * x
    if cfg_scale is None:
        g = net(x_in, TIME_SCALE * t, TIME_SCALE * s, y)
    else:
        two = lambda v: torch.cat([v, v])
        g_u, g_c = net(two(x_in), two(TIME_SCALE * t), two(TIME_SCALE * s),
                       torch.cat([torch.full_like(y, null_label), y])).chunk(2)
        g = g_u + cfg_scale * (g_c - g_u)
    return x - ((t - s) * SIGMA_D)[:, None, None, None] * g


@torch.inference_mode()
def pushforward(net, x, grid, y, cfg_scale=None):
    """x <- f_{t_{i+1}, t_i}(x) along the decreasing grid; x (B, C, H, W) starts at grid[0]."""
    b = x.shape[0]
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = imm_f(net, x, torch.full((b,), float(t_next)), torch.full((b,), float(t_cur)), y, cfg_scale)
    return x


def uniform_grid(steps: int) -> list[float]:
    return list(np.linspace(T_MAX, T_MIN, steps + 1))


class IMMStep:
    """One IMM training step (spec §3): B images in B / M groups of M particles sharing (s, r, t)."""

    def __init__(self, net, *, particles=4, k=12, label_dropout=0.1, lr=1e-4, emas=(0.9999, 0.999), a=1.0, b=4.0):
        self.net, self.m, self.k, self.pdrop, self.a, self.b = net, particles, k, label_dropout, a, b
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.emas = {d: [p.detach().clone() for p in net.parameters()] for d in emas}

    def times(self, groups: int):
        t = T_MIN + (T_MAX - T_MIN) * torch.rand(groups)
        s = T_MIN + (t - T_MIN) * torch.rand(groups)
        # eta(t) = t / (1 - t) on the OT-FM path; eta(r) = eta(t) - (eta_max - eta_min) / 2^k, r >= s (spec §3.5)
        eta = lambda v: v / (1 - v)
        step = (eta(torch.tensor(T_MAX)) - eta(torch.tensor(T_MIN))) / 2 ** self.k
        eta_r = (eta(t) - step).clamp_min(0)
        r = torch.maximum(s, eta_r / (1 + eta_r))
        rep = lambda v: v.repeat_interleave(self.m)
        return rep(s), rep(r), rep(t)

    def loss(self, x, y):
        n = x.shape[0]
        s, r, t = self.times(n // self.m)
        y = torch.where(torch.rand(n) < self.pdrop, torch.full_like(y, 1000), y)
        eps = SIGMA_D * torch.randn_like(x)
        mix = lambda u: (1 - u)[:, None, None, None] * x + u[:, None, None, None] * eps
        y_t = imm_f(self.net, mix(t), s, t, y)
        with torch.no_grad():
            y_r = imm_f(self.net, mix(r), s, r, y)
        # Laplace kernel exp(-||a - b|| / (|c_out(s, t)| D)) within each group (V-statistic, spec §3.3).
        d = x[0].numel()
        width = ((t - s) * SIGMA_D).abs().clamp_min(1e-8) * d
        groups = n // self.m
        ft, fr = y_t.reshape(groups, self.m, d), y_r.reshape(groups, self.m, d)
        wid = width.reshape(groups, self.m)[:, :1, None]
        kern = lambda u, v: torch.exp(-torch.cdist(u, v) / wid)
        mmd = (kern(ft, ft) + kern(fr, fr) - 2 * kern(ft, fr)).mean((1, 2))
        # w(t) of spec §3.4 on the OT-FM path, in its closed form finite at t = 0
        tg, eb = t.reshape(groups, self.m)[:, 0], math.exp(-self.b)
        u = 1 - tg
        w = tg * u ** (self.a - 1) / ((tg * tg + eb * u * u) * (u * u + tg * tg))
        return (w * mmd).mean()

    def __call__(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            params = [p.detach() for p in self.net.parameters()]
            for decay, ema in self.emas.items():
                torch._foreach_lerp_(ema, params, 1 - decay)
        return loss.detach()
