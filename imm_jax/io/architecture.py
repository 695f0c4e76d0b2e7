"""What a checkpoint file says about its network, and whether a config agrees.

Two sources, in order of trust:
  * recorded: an official (EDM-persistence) pickle stores the construction arguments of IMMPrecond
    (`_init_kwargs`: img_resolution, img_channels, label_dim, noise_schedule, model_type, sigma_data, f_type,
    T, eps, temb_type, time_scale, and the network's own kwargs) and the network's attributes;
  * shapes: a bare state_dict (.npz, .safetensors, torch.save zip) determines width, depth, patch, channels,
    image size and classes, but not the time embedding, the output parameterisation or the time range.

Facts are keyed by imm_jax config path ("model.num_classes", "imm.temb", ...), already translated to imm_jax's
values (official temb_type 'identity' is imm_jax's 's'; noise_schedule 'vp_cosine' is 'cosine').
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from imm_jax.io import torch_pickle
from imm_jax.networks import dit as dit_lib

_TEMB = {"identity": "s", "stride": "stride"}
_SCHEDULE = {"fm": "fm", "vp_cosine": "cosine"}
# IMMPrecond argument -> (config path, translation). Positional order is IMMPrecond's.
PRECOND_FIELDS = {
    "img_resolution": ("model.image_size", int),
    "img_channels": ("model.in_channels", int),
    "label_dim": ("model.num_classes", int),
    "noise_schedule": ("imm.schedule", _SCHEDULE.get),
    "f_type": ("imm.f_type", str),
    "T": ("imm.t_max", float),
    "eps": ("imm.t_min", float),
    "sigma_data": ("imm.sigma_d", float),
    "temb_type": ("imm.temb", _TEMB.get),
    "time_scale": ("imm.time_scale", float),
}
_POSITIONAL = ("img_resolution", "img_channels", "label_dim")
# SongUNet construction arguments that shape the sampling network (EDM's names are imm_jax's names).
UNET_FIELDS = ("model_channels", "channel_mult", "channel_mult_emb", "channel_mult_noise", "num_blocks",
               "attn_resolutions", "embedding_type", "encoder_type", "decoder_type", "resample_filter",
               "augment_dim")
DIT_FIELDS = ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio")
# What a file cannot tell from its shapes, and the flag that states it.
NOT_IN_SHAPES = {"imm.temb": "--temb s|stride"}
_DIT_TYPE = re.compile(r"^DiT_(S|B|L|XL)_(\d+)$")


def _plain(value) -> Any:
    """A recorded value as plain Python (lists for sequences), or None if it is not plain data."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return None if any(i is None for i in items) else items
    items = getattr(value, "items", None)  # a stubbed list subclass (e.g. a config library's list type)
    if isinstance(items, list) and items:
        return _plain(items)
    return None


def _network_node(obj, entry: str):
    if isinstance(obj, dict) and entry in obj:
        return obj[entry]
    return obj


def recorded(obj, entry: str = "ema") -> dict[str, Any]:
    """Config facts recorded in a loaded official pickle (empty if it records none, e.g. a state_dict).

    Reads IMMPrecond's `_init_args`/`_init_kwargs`, then its attributes for what those lack, then the inner
    network's own recorded arguments (`model` child: SongUNet or DiT). Values that are not plain data are
    skipped. Returns {config path: value}, plus "model.name" and, for a standard DiT, "model.variant".
    """
    state = torch_pickle.module_state(_network_node(obj, entry))
    if state is None:
        return {}
    args = dict(state.get("_init_kwargs") or {}) if isinstance(state.get("_init_kwargs"), dict) else {}
    for name, value in zip(_POSITIONAL, state.get("_init_args") or ()):
        args.setdefault(name, value)
    for name in PRECOND_FIELDS:
        if name not in args and name in state:
            args[name] = state[name]
    child = (state.get("_modules") or {}).get("model")
    child_state = torch_pickle.module_state(child) or {}
    child_args = child_state.get("_init_kwargs") if isinstance(child_state.get("_init_kwargs"), dict) else {}
    model_type = args.get("model_type") or getattr(child, "class_name", None)

    facts: dict[str, Any] = {}
    for name, (path, translate) in PRECOND_FIELDS.items():
        value = _plain(args.get(name))
        if value is not None and translate(value) is not None:
            facts[path] = translate(value)
    if not isinstance(model_type, str):
        return facts
    net_args = {**child_args, **{k: v for k, v in args.items() if k not in PRECOND_FIELDS}}
    if model_type == "SongUNet":
        facts["model.name"] = "unet"
        for name in UNET_FIELDS:
            value = _plain(net_args.get(name))
            if value is not None:
                facts[f"model.{name}"] = value
    elif model_type == "DiT" or _DIT_TYPE.match(model_type):
        facts["model.name"] = "dit"
        m = _DIT_TYPE.match(model_type)
        if m:
            facts["model.variant"] = f"{m.group(1)}/{m.group(2)}"
            facts.update({f"model.{k}": v for k, v in dit_lib.parse_variant(facts["model.variant"]).items()})
        for name in DIT_FIELDS:
            value = _plain(net_args.get(name))
            if value is not None:
                facts[f"model.{name}"] = value
    else:
        facts["model.name"] = f"unsupported:{model_type}"
    return facts


def _blocks(state, pattern: str) -> int:
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in state for m in [rx.match(k)] if m]
    return max(found) + 1 if found else 0


def from_shapes(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """Config facts a flat state_dict's shapes determine (keys may carry a wrapper prefix such as 'model.')."""
    key = next((k for k in state if k.endswith("x_embedder.proj.weight")), None)
    if key is not None:
        prefix = key[: -len("x_embedder.proj.weight")]
        hidden, channels, patch, _ = state[key].shape
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        depth = _blocks(sub, r"^blocks\.(\d+)\.")
        facts = {"model.name": "dit", "model.hidden_size": int(hidden), "model.in_channels": int(channels),
                 "model.patch_size": int(patch), "model.depth": depth,
                 "model.s_embed": any(k.startswith("s_embedder.") for k in sub)}
        table = sub.get("y_embedder.embedding_table.weight")
        facts["model.num_classes"] = int(table.shape[0]) - 1 if table is not None else 0
        if "pos_embed" in sub:
            side = int(round(np.sqrt(sub["pos_embed"].shape[1])))
            facts["model.image_size"] = side * int(patch)
        for size, (d, h, heads) in dit_lib.DIT_SIZES.items():
            if (d, h) == (depth, int(hidden)):
                facts["model.num_heads"] = heads
                facts["model.variant"] = f"{size}/{int(patch)}"
        return facts
    key = next((k for k in state if re.search(r"enc\.(\d+)x\1_conv\.weight$", k)), None)
    if key is not None:
        prefix = key[: key.index("enc.")]
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        out, channels = state[key].shape[:2]
        facts = {"model.name": "unet", "model.image_size": int(re.search(r"enc\.(\d+)x", key).group(1)),
                 "model.in_channels": int(channels), "model.model_channels": int(out),
                 "model.s_embed": any(k.startswith("map_layer0_s.") for k in sub)}
        label = sub.get("map_label.weight")
        facts["model.num_classes"] = int(label.shape[1]) if label is not None else 0
        facts["model.embedding_type"] = "fourier" if "map_noise.freqs" in sub else "positional"
        augment = sub.get("map_augment.weight")
        facts["model.augment_dim"] = int(augment.shape[1]) if augment is not None else 0
        if "map_layer0.weight" in sub:
            emb, noise = sub["map_layer0.weight"].shape
            facts["model.channel_mult_emb"] = int(emb) // int(out)
            facts["model.channel_mult_noise"] = int(noise) // int(out)
        sizes = sorted({int(m.group(1)) for k in sub for m in [re.match(r"enc\.(\d+)x\1_", k)] if m}, reverse=True)
        mult, attn = [], []
        for r in sizes:
            n = _blocks(sub, rf"^enc\.{r}x{r}_block(\d+)\.")
            if n == 0:
                return facts
            facts["model.num_blocks"] = n
            mult.append(int(sub[f"enc.{r}x{r}_block{n - 1}.conv1.weight"].shape[0]) // int(out))
            if f"enc.{r}x{r}_block0.qkv.weight" in sub:
                attn.append(r)
        facts["model.channel_mult"], facts["model.attn_resolutions"] = mult, attn
        return facts
    return {}


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


def _config_value(config, path: str):
    if path in ("model.hidden_size", "model.depth", "model.num_heads", "model.patch_size") \
            and _get(config, "model.name") == "dit":
        try:
            return dit_lib.resolve_dims(config.model)[path.split(".")[1]]
        except ValueError:
            return None
    value = _get(config, path)
    if value is None and path == "model.augment_dim":
        return 0  # configs written before the field existed have no augment embedding
    return list(value) if isinstance(value, (list, tuple)) else value


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def mismatches(facts: dict[str, Any], config) -> list[tuple[str, Any, Any]]:
    """(config path, value in the file, value in the config) for every fact the config contradicts."""
    out = []
    for path, want in facts.items():
        if path == "model.variant":  # compared through its dims (an explicit size is as good as a name)
            continue
        have = _config_value(config, path)
        if not _same(want, have):
            out.append((path, want, have))
    return out


def describe(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(facts.items()))
