"""IMM backbones (Flax Linen) behind one contract.

    net = imm_jax.networks.build(config.model)        # layers' execution path chosen for jax.devices()
    params = net.init(key, x, t_in, s_in, labels)["params"]
    G = net.apply({"params": params}, x, t_in, s_in, labels=None, train=False, rngs=None)

x: (B, H, W, C) float32 NHWC in model space. t_in, s_in: (B,) float32 time inputs (c_noise(t) = 1000 t
and c_noise(s) or 1000 (t - s); see `imm_jax.core.parameterization`). labels: (B,) int32 class ids with index
`num_classes` = null class, or None when model.num_classes == 0. Dropout (UNet, train=True) draws from the
rng stream "dropout". G: float32, x's shape.

Models are chosen by `model.name` from the explicit `REGISTRY`; config helpers `dit_config` and
`unet_config` return a complete `model` ConfigDict.

Per-layer conditioning (time-embedding tuning, `imm_jax.inference.tuning`): both modules take an optional
`cond_override` of shape (L, D) or (L, B, D), L = `net.num_cond_layers`, that gives every layer reading the
shared conditioning vector its own time part instead (DiT: blocks then final layer, D = hidden_size, label
embedding still added; UNet: every UNetBlock in call order, D = model_channels * channel_mult_emb,
unconditional models only). `cond_offset` (same shapes) adds a per-layer vector to the model's own time
part instead (UNet: also class-conditional); a zero offset is the default path exactly. Omitted (None)
the default path is unchanged. The model's own time part is sown as ("intermediates", "time_cond");
`cond_layout` and `time_condition` below read both.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
from ml_collections import config_dict

from imm_jax.networks import dit, layers, unet

REGISTRY: dict[str, Callable[[config_dict.ConfigDict], nn.Module]] = {
    "dit": dit.build,
    "unet": unet.build,
}


def build(model_config, *, backend: str | None = None, devices=None) -> nn.Module:
    """Linen module for `model_config` (the `model` field of a config), chosen by model_config.name.

    backend: the layers' execution path ("plain", "gpu" or "cpu"; `imm_jax.networks.layers`); None picks it
    for `devices` (default jax.devices()), the devices the module's programs will run on. A program exported
    for another platform needs `backend=layers.backend_for_export(platforms)`.
    """
    name = model_config.get("name")
    if name not in REGISTRY:
        raise ValueError(f"model.name must be one of {sorted(REGISTRY)}, got {name!r}")
    backend = layers.check_backend(backend) if backend is not None else layers.backend_for(devices)
    return REGISTRY[name](model_config, backend=backend)


def dit_config(variant: str | None = "S/2", *, image_size: int = 32, in_channels: int = 4,
               num_classes: int = 1000, dtype: str = "float32", **overrides) -> config_dict.ConfigDict:
    """A complete `model` ConfigDict for a DiT.

    `variant` is "{S,B,L,XL}/{2,4,8}". hidden_size/depth/num_heads/patch_size default to the variant's
    (placeholders resolved at build time, so `--config.model.variant=B/2` works) and can be set
    explicitly for tiny test models (variant=None then requires all four).
    """
    if variant is not None:
        dit.parse_variant(variant)  # fail early on a bad name
    cfg = config_dict.ConfigDict(dict(
        name="dit",
        variant=config_dict.placeholder(str) if variant is None else variant,
        hidden_size=config_dict.placeholder(int),
        depth=config_dict.placeholder(int),
        num_heads=config_dict.placeholder(int),
        patch_size=config_dict.placeholder(int),
        mlp_ratio=4.0,
        s_embed=True,          # separate s embedder (IMM); False gives plain DiT conditioning
        remat=False,           # rematerialise blocks in the backward pass (memory for compute)
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        dtype=dtype,
    ))
    _apply_overrides(cfg, overrides)
    dit.resolve_dims(cfg)
    return cfg


def unet_config(*, image_size: int = 32, in_channels: int = 3, num_classes: int = 0,
                dtype: str = "float32", **overrides) -> config_dict.ConfigDict:
    """A complete `model` ConfigDict for the DDPM++ UNet with the CIFAR-10 defaults of spec §6.1.

    Pass `preset="ncsnpp"` for the NCSN++ variant (Fourier embedding, [1,3,3,1] filter, residual encoder).
    """
    preset = overrides.pop("preset", "ddpmpp")
    if preset not in unet.PRESETS:
        raise ValueError(f"unet preset must be one of {sorted(unet.PRESETS)}, got {preset!r}")
    fields = dict(name="unet", image_size=image_size, in_channels=in_channels, num_classes=num_classes,
                  dtype=dtype)
    fields.update(unet.DEFAULTS)
    fields.update(unet.PRESETS[preset])
    cfg = config_dict.ConfigDict(fields)
    _apply_overrides(cfg, overrides)
    unet.check_config(cfg)
    return cfg


def cond_layout(net: nn.Module) -> tuple[int, int]:
    """(L, D) of a `cond_override` for this module: conditioned layers and conditioning width."""
    if isinstance(net, dit.DiT):
        return net.num_cond_layers, net.hidden_size
    if isinstance(net, unet.SongUNet):
        return net.num_cond_layers, net.model_channels * net.channel_mult_emb
    raise TypeError(f"cond_override is implemented for DiT and SongUNet, not {type(net).__name__}")


def time_condition(net: nn.Module, params, x, t_in, s_in, labels=None):
    """The model's own time part of the conditioning, (B, D) float32, as layers would read it.

    Runs the network once (default path) and returns the sown ("intermediates", "time_cond").
    """
    _, state = net.apply({"params": params}, x, t_in, s_in, labels=labels, train=False,
                         mutable=["intermediates"])
    return state["intermediates"]["time_cond"][0]


def _apply_overrides(cfg: config_dict.ConfigDict, overrides: dict) -> None:
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"unknown model field {key!r}; known fields: {sorted(cfg.keys())}")
        setattr(cfg, key, value)


__all__ = ["REGISTRY", "build", "cond_layout", "dit_config", "time_condition", "unet_config"]
