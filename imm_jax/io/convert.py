"""Convert the released IMM weights (PyTorch) into an imm_jax sampling checkpoint.

    python -m imm_jax.convert --input imagenet256_ts_a2.pkl --output ckpt/im256_ts_a2
    python -m imm_jax.sample ...   # or imm_jax.sample("ckpt/im256_ts_a2", 16)

Architecture (imm_jax.io.architecture): `--kind auto` (the default) builds the config from the file. Official
pickles record IMMPrecond's construction arguments (model_type, img_resolution, img_channels, label_dim,
f_type, T, eps, sigma_data, temb_type, time_scale, the network's kwargs); a state_dict's shapes give the
network's width, depth, patch, channels, size and classes, and `--temb s|stride` states the time embedding
they cannot show. An explicit `--kind`/`--config` is checked against the same facts: a disagreement is an
error naming each field, before anything is written (`--ignore-recorded PATH` skips one field).

Kinds (each picks the matching config; or --config path.py[:args]):
  cifar10       CIFAR-10 DDPM++ (`cifar10.pt`)                  configs/cifar10.py:augment=0
  im256_ts_a2   ImageNet-256 DiT-XL/2, t-s input, a=2           configs/imagenet256.py:variant=XL/2,a=2,temb=stride
  im256_s_a1    ImageNet-256 DiT-XL/2, s input, a=1             configs/imagenet256.py:variant=XL/2,a=1,temb=s
  im256_<size>_<temb>  a DiT of your own on ImageNet-256 latents: size s2 | b2 | l2 | xl2 (DiT-S/2 ... XL/2),
                temb s (second time input s) | stride (t - s), e.g. im256_b2_s; configs/imagenet256.py:variant=...

Inputs read WITHOUT torch and without executing anything from the file:
  * EDM persistence pickles (the released `.pkl`/`.pt` files: a dict whose 'ema' entry is a pickled
    torch module carrying its own source code). A restricted unpickler resolves only tensor-rebuild
    functions, storages and OrderedDict; every other global (module classes, the persistence loader,
    torch.device, ...) becomes an inert stand-in that just records its pickled state, so the embedded
    source is never compiled or run. Tensors are rebuilt as NumPy from torch's storage records.
  * torch.save zip files (e.g. a state_dict), read the same way.
  * `.safetensors` and `.npz` files holding a flat state_dict.
If a file ever defeats the reader, export a state_dict where the official repo is importable:
    python -c "import pickle,torch,numpy as np; n=pickle.load(open('IN.pkl','rb'))['ema']; np.savez('OUT.npz', **{k: v.float().cpu().numpy() for k, v in n.state_dict().items()})"
and convert OUT.npz (torch is only needed for that one line; it is never needed by imm_jax itself).

Keys: the network may sit under a wrapper prefix (IMMPrecond's `model.`); `--prefix auto` strips the
common prefix that makes the keys match. Every tensor must be consumed: a missing, unexpected or
mis-shaped key is an error that names it (`--ignore REGEX` skips keys you have checked are irrelevant).

Mapping table (torch name -> imm_jax param path; layout change):

  DiT (imm_jax.networks.dit)
    x_embedder.proj.weight (D,C,p,p)          x_embedder/kernel (p,p,C,D)           OIHW -> HWIO
    x_embedder.proj.bias                        x_embedder/bias
    pos_embed (1,N,D)                           (constant; checked equal to our 2-D sin-cos table)
    {t,s}_embedder.mlp.{0,2}.weight (out,in)    {t,s}_embedder/mlp_{0,2}/kernel (in,out)  transpose
    y_embedder.embedding_table.weight (K+1,D)   y_embedder/embedding_table            (row K = null)
    blocks.i.attn.qkv|attn.proj|mlp.fc1|mlp.fc2.weight   blocks_i/attn/qkv|... /kernel   transpose
    blocks.i.adaLN_modulation.1.weight          blocks_i/adaLN_modulation/kernel       transpose
    final_layer.adaLN_modulation.1|linear.weight  final_layer/adaLN_modulation|linear/kernel  transpose
    (all .bias -> /bias unchanged)

  DDPM++ UNet (imm_jax.networks.unet)
    map_label|map_augment|map_layer0|map_layer1|map_layer0_s|map_layer1_s.weight  <same>/kernel  transpose
    enc.RxR_NAME.* / dec.RxR_NAME.*             enc_RxR_NAME/* / dec_RxR_NAME/*
    <conv>.weight (O,I,k,k)                     <conv>/kernel (k,k,I,O)               OIHW -> HWIO
    <norm>.weight / .bias                       <norm>/scale / bias
    <block>.affine.weight                       <block>/affine/kernel                  transpose
    <block>.qkv.weight (3C,C,1,1), .bias (3C)   <block>/qkv/kernel (1,1,C,3C), bias   de-interleave
        EDM orders the 3C outputs (head, channel, q|k|v) (it reshapes to (N*h, C/h, 3, HW));
        imm_jax orders them (q|k|v, head, channel).
    <conv>.resample_filter (1,1,k,k)            (constant; checked equal to model.resample_filter)
    map_noise.freqs / map_noise_s.freqs         (Fourier embedding buffers: not supported, error)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from typing import Any, Iterable

import numpy as np
import safetensors.numpy

from imm_jax import config_files, errors
from imm_jax.io import architecture, torch_pickle

# ------------------------------------------------------------------------------------ reading

def load_file(path: str) -> Any:
    """Reads a checkpoint file into plain Python/NumPy objects (see module docstring for formats)."""
    if path.endswith(".safetensors"):
        return safetensors.numpy.load_file(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return torch_pickle.load(path, unknown="stub")


def flatten_module(node, prefix: str = "") -> dict[str, np.ndarray]:
    """named_parameters + named_buffers of a stubbed torch module tree, as {dotted name: array}."""
    state = torch_pickle.module_state(node)
    if state is None:
        raise ValueError(f"{prefix or 'root'}: not a pickled torch module ({type(node).__name__})")
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None:
                out[prefix + name] = np.asarray(value)
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(flatten_module(child, prefix + name + "."))
    return out


def extract_state_dict(obj, entry: str = "ema") -> dict[str, np.ndarray]:
    """The flat state_dict inside a loaded file: a state_dict itself, or `obj[entry]` as a module."""
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict) and entry in obj:
        node = obj[entry]
        if isinstance(node, dict) and all(isinstance(v, np.ndarray) for v in node.values()):
            return dict(node)
        return flatten_module(node)
    if torch_pickle.module_state(obj) is not None:
        return flatten_module(obj)
    keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"cannot find the network: expected a state_dict or a dict with {entry!r} (got {keys})")


# ---------------------------------------------------------------------------------------- mapping

def _dit_key(path: tuple[str, ...]) -> str:
    parts = []
    for p in path:
        m = re.fullmatch(r"blocks_(\d+)", p)
        if m:
            parts += ["blocks", m.group(1)]
        elif p in ("mlp_0", "mlp_2"):
            parts += ["mlp", p[-1]]
        elif p == "adaLN_modulation":
            parts += ["adaLN_modulation", "1"]
        elif p == "x_embedder":
            parts += ["x_embedder", "proj"]
        elif p == "embedding_table":
            parts += ["embedding_table", "weight"]
        elif p == "kernel":
            parts.append("weight")
        else:
            parts.append(p)
    return ".".join(parts)


def _unet_key(path: tuple[str, ...]) -> str:
    head = re.sub(r"^(enc|dec)_", r"\1.", path[0])
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join((head,) + tuple(path[1:-1]) + (leaf,))


def _to_layout(model: str, path: tuple[str, ...], value: np.ndarray, num_heads: int) -> np.ndarray:
    """torch-layout tensor -> imm_jax layout for the param at `path` of a `model` ("dit" | "unet")."""
    if model == "unet" and path[-2] == "qkv":  # de-interleave (head, channel, q|k|v) -> (q|k|v, head, channel)
        c = value.shape[0] // 3
        value = value.reshape((num_heads, c // num_heads, 3) + value.shape[1:])
        value = np.moveaxis(value, 2, 0).reshape((3 * c,) + value.shape[3:])
    if path[-1] == "kernel":
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)   # OIHW -> HWIO
        if value.ndim == 2:
            return value.T
    return value


def convert_state_dict(state: dict[str, np.ndarray], model_config, *, prefix: str = "auto",
                       ignore: Iterable[str] = ()) -> dict:
    """Maps a torch state_dict onto the imm_jax param tree of `model_config` (float32 NumPy leaves).

    Raises ValueError naming every missing, unexpected or mis-shaped key.
    """
    import jax

    from imm_jax import networks
    from imm_jax.networks import dit as dit_lib
    from imm_jax.networks import unet as unet_lib

    name = model_config.name
    net = networks.build(model_config)
    size, ch = int(model_config.image_size), int(model_config.in_channels)
    b = 1
    x = np.zeros((b, size, size, ch), np.float32)
    t = np.zeros((b,), np.float32)
    labels = np.zeros((b,), np.int32) if int(model_config.num_classes) else None
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, t, labels))["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    paths = [tuple(str(k.key) for k in p) for p, _ in flat]
    key_fn = _dit_key if name == "dit" else _unet_key
    wanted = {key_fn(p): (p, leaf) for p, (_, leaf) in zip(paths, flat)}

    state = {k: v for k, v in state.items() if not any(re.search(r, k) for r in ignore)}
    if prefix == "auto":
        prefix = ""
        if not (set(wanted) & set(state)):
            for cand in sorted({k[: k.find(".") + 1] for k in state if "." in k}):
                if {cand + k for k in wanted} & set(state):
                    prefix = cand
                    break
    outside = sorted(k for k in state if not k.startswith(prefix))
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    problems = []
    if outside:
        problems.append(f"keys outside prefix {prefix!r}: {outside[:10]}")
    leaves = []
    num_heads = int(model_config.get("num_heads", 1) or 1)
    for key, (path, leaf) in wanted.items():
        if key not in state:
            problems.append(f"missing {key} (for {'/'.join(path)} {tuple(leaf.shape)})")
            leaves.append(None)
            continue
        value = _to_layout(name, path, np.asarray(state.pop(key), np.float32), num_heads)
        if value.shape != tuple(leaf.shape):
            problems.append(f"shape of {key}: {value.shape} after layout change, expected {tuple(leaf.shape)} "
                          f"for {'/'.join(path)}")
        leaves.append(value)

    # Constant buffers: consumed after checking they match what the model computes.
    for key in sorted(state):
        value = np.asarray(state[key], np.float64)
        if name == "dit" and key == "pos_embed":
            dims = dit_lib.resolve_dims(model_config)
            want = dit_lib.pos_embed_2d(dims["hidden_size"], size // dims["patch_size"])[None]
            if value.shape != want.shape:
                problems.append(f"pos_embed has shape {value.shape}, the model's 2-D sin-cos table {want.shape} "
                                "(image size or patch size differs)")
            elif not np.allclose(value, want, atol=1e-5):
                problems.append(f"pos_embed values differ from the model's fixed 2-D sin-cos table (max |diff| "
                                f"{np.max(np.abs(value - want)):.3g}): not a sin-cos DiT, or another hidden size order")
            state.pop(key)
        elif name == "unet" and key.endswith(".resample_filter"):
            want = unet_lib._filter_2d(tuple(model_config.resample_filter))[None, None]
            if value.shape != want.shape or not np.allclose(value, want):
                problems.append(f"{key} {value.reshape(-1)[:4]}... does not match model.resample_filter "
                              f"{tuple(model_config.resample_filter)}")
            state.pop(key)
        elif name == "unet" and key.endswith(".freqs"):
            problems.append(f"{key}: Fourier-embedding checkpoints are not supported (imm_jax derives the "
                          "frequencies from model.fourier_seed)")
            state.pop(key)
    if state:
        problems.append(f"unexpected keys (not mapped): {sorted(state)[:20]}"
                      + (f" ... ({len(state)} in all)" if len(state) > 20 else ""))
    if problems:
        raise errors.UserError("checkpoint does not match model config "
                         f"{name!r}:\n  " + "\n  ".join(problems)
                         + "\n(--ignore REGEX skips keys, --prefix sets the wrapper prefix)")
    return jax.tree_util.tree_unflatten(treedef, leaves)


# -------------------------------------------------------------------------------------------- CLI

KINDS = {
    "cifar10": ("cifar10.py", "augment=0"),  # the released network has no augment embedding
    "im256_ts_a2": ("imagenet256.py", "variant=XL/2,a=2,temb=stride"),
    "im256_s_a1": ("imagenet256.py", "variant=XL/2,a=1,temb=s"),
    **{f"im256_{size.lower()}2_{temb}": ("imagenet256.py", f"variant={size}/2,temb={temb}")
       for size in ("S", "B", "L", "XL") for temb in ("s", "stride")},
}


def default_config_spec(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {sorted(KINDS)}, got {kind!r}")
    filename, arg = KINDS[kind]
    return f"configs/{filename}:{arg}" if arg else f"configs/{filename}"


def convert(input_path: str, output: str, config, *, prefix: str = "auto", ignore=(), entry: str = "ema",
            loaded=None):
    """Reads `input_path` (or uses `loaded`, its load_file result), maps it onto config.model and writes a
    sampling checkpoint to `output`."""
    from imm_jax.training import checkpointing

    state = extract_state_dict(load_file(input_path) if loaded is None else loaded, entry)
    params = convert_state_dict(state, config.model, prefix=prefix, ignore=ignore)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train.ema_decays = (0.9999,)  # the released networks are the 0.9999 EMA; store them once
    return checkpointing.save_for_sampling(output, params, config)


def _set(config, path: str, value) -> None:
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value


def auto_config(recorded: dict, shapes: dict, temb: str | None = None):
    """The config of the network a file holds: the matching packaged config (configs/cifar10.py for a
    DDPM++ UNet, configs/imagenet256.py for a DiT) with every fact the file records or its shapes determine.

    UserError when the file determines no architecture, or leaves out what must be stated (`temb`).
    """
    facts = {**shapes, **recorded}
    name = facts.get("model.name")
    if name is None:
        raise errors.UserError("cannot tell which network the file holds (no recorded construction arguments and "
                               "no DiT or DDPM++ keys): give --kind or --config.")
    if name.startswith("unsupported:"):
        raise errors.UserError(f"the file holds a {name.split(':', 1)[1]} network; imm_jax converts SongUNet "
                               "(DDPM++/NCSN++) and DiT networks.")
    if temb is not None:
        if facts.get("imm.temb", temb) != temb:
            raise errors.UserError(f"--temb {temb} contradicts the file, which records temb_type for "
                                   f"imm.temb={facts['imm.temb']!r}; drop --temb.")
        facts["imm.temb"] = temb
    if "imm.temb" not in facts:
        raise errors.UserError(
            "the file does not record the time embedding, and a state_dict's shapes cannot tell it: pass --temb s "
            "(the network's second time input is s, as in imagenet256_s_a1) or --temb stride (it is t - s, as in "
            "imagenet256_ts_a2), or give --kind/--config.")
    if name == "dit" and "model.num_heads" not in facts:
        raise errors.UserError(
            f"a DiT of width {facts['model.hidden_size']} and depth {facts['model.depth']} is no standard size "
            f"(S/B/L/XL), so its number of heads is unknown: give --config with model.num_heads set.")
    if name == "unet":
        spec = "configs/cifar10.py" + ("" if facts.get("model.augment_dim") else ":augment=0")
    else:
        spec = f"configs/imagenet256.py:temb={facts['imm.temb']}"
    config = config_files.load(spec)
    for path, value in sorted(facts.items()):
        if path != "model.name":
            _set(config, path, value)
    if name == "dit" and "model.variant" not in facts:
        config.model.variant = None
    return config


def check_config(config, facts: dict, ignored=()) -> None:
    """UserError listing each fact of the file (`facts`, minus config paths in `ignored`) the config contradicts."""
    problems = [m for m in architecture.mismatches(facts, config) if m[0] not in ignored]
    if not problems:
        return
    lines = [f"  {path}: the file has {want!r}, the config {have!r}" for path, want, have in problems]
    raise errors.UserError(
        "the chosen --kind/--config does not match the network in the file:\n" + "\n".join(lines) +
        "\nDrop --kind/--config (--kind auto) to build the config from the file, choose the matching --kind "
        "(python -m imm_jax.convert --help lists them) or config args (e.g. configs/imagenet256.py:variant=XL/2,"
        "temb=stride), or pass --ignore-recorded PATH for a field you know the file records wrongly.")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m imm_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="official .pkl/.pt, a torch.save zip, .safetensors or .npz")
    parser.add_argument("--output", required=True, help="directory for the sampling checkpoint")
    parser.add_argument("--kind", default="auto", choices=["auto"] + sorted(KINDS),
                        help="auto (default): the architecture the file records (official pickles) or its shapes "
                             "determine (state_dicts, with --temb); else a preset, checked against the file")
    parser.add_argument("--config", help="config file path.py[:args] (instead of --kind), checked against the file")
    parser.add_argument("--temb", choices=("s", "stride"),
                        help="time embedding of a state_dict's network with --kind auto: second time input s or t-s")
    parser.add_argument("--ignore-recorded", action="append", default=[], metavar="PATH",
                        help="config path (e.g. imm.temb) whose recorded value is not checked (repeatable)")
    parser.add_argument("--prefix", default="auto", help="wrapper prefix to strip, e.g. 'model.' (default auto)")
    parser.add_argument("--ignore", action="append", default=[], help="regex of keys to skip (repeatable)")
    parser.add_argument("--entry", default="ema", help="key of the network in the pickled dict")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    args = parser.parse_args(argv)
    if args.config and args.kind != "auto":
        parser.error("give --kind or --config, not both")
    errors.run(parser.prog, _convert_cli, args)


def _convert_cli(args):
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"--input {args.input!r}: no such file.")
    output = os.path.abspath(args.output)
    if os.path.isdir(output) and os.listdir(output) and not args.overwrite:
        raise errors.UserError(f"--output {args.output!r} exists and is not empty; pass --overwrite to replace it, "
                               "or choose another directory.")
    loaded = load_file(args.input)
    state = extract_state_dict(loaded, args.entry)
    recorded = {k: v for k, v in architecture.recorded(loaded, args.entry).items()
                if k not in args.ignore_recorded}
    shapes = architecture.from_shapes(state)
    if args.config or args.kind != "auto":
        config = config_files.load(args.config or default_config_spec(args.kind))
        if args.temb:
            config.imm.temb = args.temb
        check_config(config, {**shapes, **recorded}, args.ignore_recorded)
        source = "the given config, checked against " + ("what the file records" if recorded else "its shapes")
    else:
        config = auto_config(recorded, shapes, args.temb)
        source = "recorded in the file" if recorded else "the file's shapes" + (" and --temb" if args.temb else "")
    if "imm.temb" not in recorded and not args.temb:
        print(f"note: the file does not record its time embedding; converting with imm.temb={config.imm.temb!r}")
    print(f"architecture ({source}): {architecture.describe({**shapes, **recorded})}")
    # Written beside the target and moved into place: a failed conversion leaves --output as it was.
    tmp = output + ".converting"
    shutil.rmtree(tmp, ignore_errors=True)
    path = convert(args.input, tmp, config, prefix=args.prefix, ignore=args.ignore, entry=args.entry, loaded=loaded)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)
    print(f"wrote {os.path.join(output, os.path.relpath(path, tmp))} (model {config.model.name})")


if __name__ == "__main__":
    main(sys.argv[1:])
