"""Read torch pickles with NumPy only: one restricted unpickler that never runs code from the file.

Formats: torch.save zip archives and TorchScript archives (`<prefix>/data.pkl` + `<prefix>/data/<key>` raw
storages), EDM persistence pickles (a plain pickle whose modules carry their own source), and torch's legacy
(pre-zip) serialisation of a single storage.

The unpickler resolves only tensor/parameter rebuild helpers, storage dtype markers, TorchScript's typed-list
helpers, `collections.OrderedDict`, pure data constructors and `__torch__.*` module classes (replaced by
`ScriptObject` attribute containers). Any other global is, by `unknown`:
  "error"  raise `UnsafeArchiveError` (TorchScript weights, where nothing else may appear);
  "stub"   an inert `Stub` that records what the pickle gives it (EDM pickles: their module classes and the
           persistence loader become stubs, so the embedded source is never compiled or run).
Tensors become NumPy arrays copied from their storages; every size, stride and byte count is checked.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

# Storage class names in torch pickles -> NumPy dtype (little-endian on disk).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"), "UntypedStorage": np.dtype("u1"),
}

# Pure data constructors that are safe to call.
_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex,
                  "bytearray": bytearray, "list": list, "dict": dict, "tuple": tuple, "int": int,
                  "float": float, "bool": bool, "str": str, "bytes": bytes}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeArchiveError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list, or a tensor record is inconsistent."""


class StorageType:
    """Stand-in for torch.<X>Storage: carries the element dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]

    def __repr__(self):
        return f"<storage type {self.name}>"


class Stub:
    """Inert stand-in for a global the reader does not trust; `args` and `state` are what the pickle gave it."""
    _global = ("", "")

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items, obj.dictitems = args, None, [], {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    # Items pickled for list and dict subclasses (APPEND(S) / SETITEM(S) opcodes) are recorded, not applied.
    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __setitem__(self, key, value):
        self.dictitems[key] = value

    def __repr__(self):
        return f"<stub {'.'.join(self._global)}>"


class ScriptObject:
    """Stand-in for an instance of a `__torch__.*` class: `state` is the pickled attribute dict.

    `qualname` is the TorchScript class name (e.g. "__torch__.inceptionv3.Conv2dLayer"); `state` maps
    attribute names to values (np.ndarray for tensors, other ScriptObjects for submodules, ints, lists...).
    """
    qualname: str = ""

    def __init__(self, *args: Any) -> None:
        if args:
            raise UnsafeArchiveError(f"{self.qualname}: unexpected constructor arguments in the pickle")
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeArchiveError(f"{self.qualname}: expected a dict state, got {type(state).__name__}")
        self.state = dict(state)

    @property
    def class_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"ScriptObject({self.qualname}, keys={list(self.state)})"


def module_state(node) -> dict | None:
    """The pickled attribute dict of a (stubbed or persistent) torch module, or None."""
    state = getattr(node, "state", None)
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else None


class PersistentObject:
    """What EDM's `_reconstruct_persistent_obj(meta)` would build, without running meta['module_src']."""

    def __init__(self, meta):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name = meta.get("class_name")
        self.state = meta.get("state")
        self.kind = meta.get("type")


_script_classes: dict[str, type] = {}


def _script_class(qualname: str) -> type:
    if qualname not in _script_classes:
        _script_classes[qualname] = type(qualname.rsplit(".", 1)[-1], (ScriptObject,), {"qualname": qualname})
    return _script_classes[qualname]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
    """torch._utils._rebuild_tensor(_v2): a strided view of a storage, copied."""
    if not isinstance(storage, np.ndarray):
        raise UnsafeArchiveError(f"tensor storage must come from a storage record, got {type(storage).__name__}")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride):
        raise UnsafeArchiveError(f"tensor size {size} and stride {stride} differ in rank")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise UnsafeArchiveError(f"negative size/stride/offset in tensor record: {size}, {stride}, {offset}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise UnsafeArchiveError(
            f"tensor (size {size}, stride {stride}, offset {offset}) reads past its storage of {storage.size} elements")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * item for s in stride],
                                           writeable=False)
    return np.array(view, copy=True)


def _rebuild_parameter(data, *unused) -> np.ndarray:
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _build_list(items) -> list:
    """torch.jit._pickle.build_{int,double,bool,tensor,str}list: TorchScript's typed lists."""
    return list(items)


def _restore_type_tag(value, type_str=None):
    return value


def _codecs_encode(text, encoding="utf-8"):
    if encoding != "latin1":
        raise UnsafeArchiveError(f"unexpected _codecs.encode encoding {encoding!r}")
    return text.encode("latin1")


def _copyreg_reconstructor(cls, base, state):
    return cls.__new__(cls) if isinstance(cls, type) and issubclass(cls, Stub) else Stub()


def _load_from_bytes(data: bytes):
    """torch.storage._load_from_bytes: a storage serialised by torch.save (zip or legacy format)."""
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return read_zip(zf, unknown="stub")[0]
    return read_legacy(io.BytesIO(data))


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    **{("torch.jit._pickle", f"build_{t}list"): _build_list for t in ("int", "double", "bool", "tensor", "str")},
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
    **{(m, name): f for m in ("builtins", "__builtin__") for name, f in _SAFE_BUILTINS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-list of the module docstring.

    `storages`: callable (key, StorageType, numel) -> 1-D ndarray, for torch's persistent storage ids.
    `unknown`: "error" or "stub" (module docstring). `seen`: the (module, name) pairs replaced by stubs.
    """

    def __init__(self, file, storages: Callable | None = None, *, unknown: str = "error"):
        if unknown not in ("error", "stub"):
            raise ValueError(f"unknown={unknown!r}: use 'error' or 'stub'")
        super().__init__(file)
        self._storages, self._unknown = storages, unknown
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        if name == "_reconstruct_persistent_obj" and self._unknown == "stub":
            return PersistentObject
        if self._unknown == "error":
            raise UnsafeArchiveError(
                f"the pickle references {module}.{name}, which this reader does not allow (only tensors, "
                "storages, typed lists, OrderedDict, plain data and __torch__ module objects are read)")
        self.seen.add((module, name))
        return type(f"Stub_{name}", (Stub,), {"_global": (module, name)})

    def persistent_load(self, pid):
        # zip archives: (tag, type, key, location, numel); legacy files add a view record
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage") or self._storages is None:
            raise UnsafeArchiveError(f"unsupported persistent id in the pickle: {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, StorageType):
            raise UnsafeArchiveError(f"storage record {key!r} has no known dtype marker: {storage_type!r}")
        return self._storages(str(key), storage_type, int(numel))


def _zip_prefix(names: list[str]) -> str:
    candidates = [n[: -len("data.pkl")] for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(candidates) != 1:
        raise ValueError(f"not a torch zip archive: expected one '<name>/data.pkl', found {candidates} "
                         f"(entries: {names[:5]}...)")
    return candidates[0]


def read_zip(zf: zipfile.ZipFile, *, unknown: str = "error") -> tuple[Any, str]:
    """Unpickles `<prefix>/data.pkl` of a torch zip / TorchScript archive; returns (root object, prefix)."""
    names = zf.namelist()
    prefix = _zip_prefix(names)
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = zf.read(f"{prefix}byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"unknown byteorder record {byteorder!r}")
    cache: dict[str, np.ndarray] = {}

    def storages(key: str, storage_type: StorageType, numel: int) -> np.ndarray:
        if key not in cache:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafeArchiveError(f"the pickle refers to storage {name}, which is not in the archive")
            raw = zf.read(name)
            dtype = storage_type.dtype
            if byteorder == "big" and dtype.itemsize > 1:
                dtype = dtype.newbyteorder(">")
            if len(raw) != numel * dtype.itemsize:
                raise UnsafeArchiveError(
                    f"storage record data/{key} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
            arr = np.frombuffer(raw, dtype=dtype)
            cache[key] = arr.astype(arr.dtype.newbyteorder("=")) if byteorder == "big" else arr
        return cache[key]

    with zf.open(f"{prefix}data.pkl") as f:
        root = RestrictedUnpickler(f, storages, unknown=unknown).load()
    return root, prefix


def read_legacy(f) -> np.ndarray:
    """torch's legacy (non-zip) torch.save format holding one storage: header pickles, main pickle, raw bytes."""
    def safe(storages=None):
        return RestrictedUnpickler(f, storages, unknown="stub")

    if safe().load() != _LEGACY_MAGIC:
        raise ValueError("not a torch legacy serialisation (bad magic number)")
    safe().load()  # protocol version
    sys_info = safe().load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError("big-endian torch files are not supported")
    pending: dict[str, StorageType] = {}

    class Lazy:
        def __init__(self, key):
            self.key = key

    def storages(key, storage_type, numel):
        pending[key] = storage_type
        return Lazy(key)

    root = safe(storages).load()
    arrays = {}
    for key in safe().load():
        dtype = pending[str(key)].dtype
        (count,) = struct.unpack("<q", f.read(8))
        buf = f.read(count * dtype.itemsize)
        if len(buf) != count * dtype.itemsize:
            raise ValueError("truncated torch storage data")
        arrays[str(key)] = np.frombuffer(buf, dtype=dtype).copy()
    if not isinstance(root, Lazy):  # the main pickle is a bare storage in what `_load_from_bytes` sees
        raise ValueError("legacy torch files holding more than a single storage are not supported; "
                         "export a state_dict (see imm_jax.io.convert's docstring)")
    return arrays[root.key]


def load(path: str, *, unknown: str = "stub") -> Any:
    """A torch zip archive or a plain (EDM persistence) pickle at `path`, as plain Python/NumPy objects."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return read_zip(zf, unknown=unknown)[0]
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, unknown=unknown).load()
