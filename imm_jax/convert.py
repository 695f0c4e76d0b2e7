"""Convert the released IMM weights (PyTorch) into an imm_jax sampling checkpoint.

    python -m imm_jax.convert --input imagenet256_ts_a2.pkl --kind im256_ts_a2 --output ckpt/im256_ts_a2
    python -m imm_jax.sample ...   # or imm_jax.sample("ckpt/im256_ts_a2", 16)

Kinds (each picks the matching config; override with --config path.py[:args]):
  cifar10       CIFAR-10 DDPM++ (`cifar10.pt`)                  configs/cifar10.py
  im256_ts_a2   ImageNet-256 DiT-XL/2, t-s input, a=2           configs/imagenet256.py:variant=XL/2,a=2,temb=stride
  im256_s_a1    ImageNet-256 DiT-XL/2, s input, a=1             configs/imagenet256.py:variant=XL/2,a=1,temb=s

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
    map_label|map_layer0|map_layer1|map_layer0_s|map_layer1_s.weight   <same>/kernel     transpose
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
import collections
import importlib.util
import io
import json
import os
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

# ------------------------------------------------------------------------------------ safe reading

try:  # bfloat16 storages; ml_dtypes ships with jax.
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}

# Pure data constructors that are safe to call.
_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex,
                  "bytearray": bytearray, "list": list, "dict": dict, "tuple": tuple, "int": int,
                  "float": float, "bool": bool, "str": str, "bytes": bytes}


class StorageType:
    """Stand-in for torch.<X>Storage: carries the element dtype."""

    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES or _STORAGE_DTYPES[name] is None:
            raise ValueError(f"unsupported torch storage type {name}")
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class Stub:
    """Inert stand-in for any global the reader does not trust; records what the pickle gives it."""
    _global = ("", "")

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stub {'.'.join(self._global)}>"


class PersistentObject:
    """What EDM's `_reconstruct_persistent_obj(meta)` would build, without running meta['module_src']."""

    def __init__(self, meta):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name = meta.get("class_name")
        self.state = meta.get("state")
        self.kind = meta.get("type")


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not isinstance(storage, np.ndarray):
        raise ValueError(f"tensor storage could not be read (got {type(storage).__name__})")
    size, stride = tuple(int(v) for v in size), tuple(int(v) for v in stride)
    if not size:
        return storage[offset].copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    return np.array(view, copy=True)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"unexpected _codecs.encode encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that never resolves arbitrary globals (see module docstring).

    `storages`: callable (key, StorageType, numel) -> 1-D ndarray for torch persistent storage ids.
    `seen`: the (module, name) pairs replaced by stubs, for diagnostics.
    """

    def __init__(self, file, storages: Callable | None = None):
        super().__init__(file)
        self._storages = storages
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_from_bytes
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        if name == "_reconstruct_persistent_obj":
            return PersistentObject
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module == "copyreg" and name == "_reconstructor":
            return lambda cls, base, state: cls.__new__(cls) if isinstance(cls, type) and issubclass(
                cls, Stub) else Stub()
        self.seen.add((module, name))
        return type(f"Stub_{name}", (Stub,), {"_global": (module, name)})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage") or self._storages is None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return self._storages(key, storage_type, numel)


def _load_from_bytes(data: bytes):
    """torch.storage._load_from_bytes: a storage serialised by torch.save (legacy or zip format)."""
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return _read_torch_zip(zf)
    return _read_legacy(io.BytesIO(data))


def _read_legacy(f) -> Any:
    """torch's legacy (non-zip) torch.save format: header pickles, main pickle, keys, raw storages."""
    safe = RestrictedUnpickler
    magic = safe(f).load()
    if magic != 0x1950A86A20F9469CFC6C:
        raise ValueError("not a torch legacy serialisation (bad magic number)")
    safe(f).load()  # protocol version
    sys_info = safe(f).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError("big-endian torch files are not supported")
    pending: dict[str, tuple[StorageType, int]] = {}
    arrays: dict[str, np.ndarray] = {}

    class Lazy:
        def __init__(self, key):
            self.key = key

    def storages(key, storage_type, numel):
        pending[key] = (storage_type, numel)
        return Lazy(key)

    main = safe(f, storages)
    root = main.load()
    keys = safe(f).load()
    for key in keys:
        storage_type, _ = pending[str(key)]
        (count,) = struct.unpack("<q", f.read(8))
        nbytes = count * storage_type.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError("truncated torch storage data")
        arrays[str(key)] = np.frombuffer(buf, dtype=storage_type.dtype).copy()
    return _resolve_lazy(root, Lazy, arrays)


def _resolve_lazy(obj, lazy_cls, arrays):
    # A legacy file's main pickle references storages whose bytes come after it; in practice the
    # object is a bare storage (what `_load_from_bytes` sees), so resolve that case.
    if isinstance(obj, lazy_cls):
        return arrays[obj.key]
    raise ValueError("legacy torch files holding more than one storage are not supported; "
                     "export a state_dict (see imm_jax.convert docstring)")


def _read_torch_zip(zf: zipfile.ZipFile) -> Any:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
        raise ValueError(f"torch zip file without a unique data.pkl (entries: {names[:5]}...)")
    root = pkl[0][: -len("data.pkl")]
    byteorder = root + "byteorder"
    if byteorder in names and zf.read(byteorder).strip() != b"little":
        raise ValueError("big-endian torch files are not supported")

    def storages(key, storage_type, numel):
        buf = zf.read(f"{root}data/{key}")
        return np.frombuffer(buf, dtype=storage_type.dtype)[:numel].copy()

    return RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storages).load()


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    codes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": _BF16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=codes[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def load_file(path: str) -> Any:
    """Reads a checkpoint file into plain Python/NumPy objects (see module docstring for formats)."""
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return _read_torch_zip(zf)
    with open(path, "rb") as f:
        return RestrictedUnpickler(f).load()


def _module_state(node) -> dict | None:
    state = getattr(node, "state", None)
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else None


def flatten_module(node, prefix: str = "") -> dict[str, np.ndarray]:
    """named_parameters + named_buffers of a stubbed torch module tree, as {dotted name: array}."""
    state = _module_state(node)
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
    if _module_state(obj) is not None:
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

    errors = []
    if outside:
        errors.append(f"keys outside prefix {prefix!r}: {outside[:10]}")
    leaves = []
    num_heads = int(model_config.get("num_heads", 1) or 1)
    for key, (path, leaf) in wanted.items():
        if key not in state:
            errors.append(f"missing {key} (for {'/'.join(path)} {tuple(leaf.shape)})")
            leaves.append(None)
            continue
        value = _to_layout(name, path, np.asarray(state.pop(key), np.float32), num_heads)
        if value.shape != tuple(leaf.shape):
            errors.append(f"shape of {key}: {value.shape} after layout change, expected {tuple(leaf.shape)} "
                          f"for {'/'.join(path)}")
        leaves.append(value)

    # Constant buffers: consumed after checking they match what the model computes.
    for key in sorted(state):
        value = np.asarray(state[key], np.float64)
        if name == "dit" and key == "pos_embed":
            dims = dit_lib.resolve_dims(model_config)
            want = dit_lib.pos_embed_2d(dims["hidden_size"], size // dims["patch_size"])[None]
            if value.shape != want.shape or not np.allclose(value, want, atol=1e-5):
                errors.append(f"pos_embed {value.shape} differs from the fixed 2-D sin-cos table {want.shape}")
            state.pop(key)
        elif name == "unet" and key.endswith(".resample_filter"):
            want = unet_lib._filter_2d(tuple(model_config.resample_filter))[None, None]
            if value.shape != want.shape or not np.allclose(value, want):
                errors.append(f"{key} {value.reshape(-1)[:4]}... does not match model.resample_filter "
                              f"{tuple(model_config.resample_filter)}")
            state.pop(key)
        elif name == "unet" and key.endswith(".freqs"):
            errors.append(f"{key}: Fourier-embedding checkpoints are not supported (imm_jax derives the "
                          "frequencies from model.fourier_seed)")
            state.pop(key)
    if state:
        errors.append(f"unexpected keys (not mapped): {sorted(state)[:20]}"
                      + (f" ... ({len(state)} in all)" if len(state) > 20 else ""))
    if errors:
        raise ValueError("checkpoint does not match model config "
                         f"{name!r}:\n  " + "\n  ".join(errors)
                         + "\n(--ignore REGEX skips keys, --prefix sets the wrapper prefix)")
    return jax.tree_util.tree_unflatten(treedef, leaves)


# -------------------------------------------------------------------------------------------- CLI

KINDS = {
    "cifar10": ("cifar10.py", None),
    "im256_ts_a2": ("imagenet256.py", "variant=XL/2,a=2,temb=stride"),
    "im256_s_a1": ("imagenet256.py", "variant=XL/2,a=1,temb=s"),
}


def load_config(spec: str):
    """Loads `path.py[:arg]` and returns its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found; pass --config path/to/config.py[:args]")
    mod_spec = importlib.util.spec_from_file_location(f"_imm_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def default_config_spec(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {sorted(KINDS)}, got {kind!r}")
    filename, arg = KINDS[kind]
    path = Path(__file__).resolve().parents[1] / "configs" / filename
    return f"{path}:{arg}" if arg else str(path)


def convert(input_path: str, output: str, config, *, prefix: str = "auto", ignore=(), entry: str = "ema"):
    """Reads `input_path`, maps it onto config.model and writes a sampling checkpoint to `output`."""
    from imm_jax import checkpointing

    state = extract_state_dict(load_file(input_path), entry)
    params = convert_state_dict(state, config.model, prefix=prefix, ignore=ignore)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train.ema_decays = (0.9999,)  # the released networks are the 0.9999 EMA; store them once
    return checkpointing.save_for_sampling(output, params, config)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m imm_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="official .pkl/.pt, a torch.save zip, .safetensors or .npz")
    parser.add_argument("--output", required=True, help="directory for the sampling checkpoint")
    parser.add_argument("--kind", choices=sorted(KINDS), help="which released model (sets the config)")
    parser.add_argument("--config", help="config file path.py[:args] (default: from --kind)")
    parser.add_argument("--prefix", default="auto", help="wrapper prefix to strip, e.g. 'model.' (default auto)")
    parser.add_argument("--ignore", action="append", default=[], help="regex of keys to skip (repeatable)")
    parser.add_argument("--entry", default="ema", help="key of the network in the pickled dict")
    args = parser.parse_args(argv)
    if not args.config and not args.kind:
        parser.error("give --kind (cifar10|im256_ts_a2|im256_s_a1) or --config")
    config = load_config(args.config or default_config_spec(args.kind))
    path = convert(args.input, args.output, config, prefix=args.prefix, ignore=args.ignore, entry=args.entry)
    print(f"wrote {path} (model {config.model.name})")


if __name__ == "__main__":
    main(sys.argv[1:])
