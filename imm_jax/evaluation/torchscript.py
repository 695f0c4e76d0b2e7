"""Read the tensors of a TorchScript (or torch.save zip) archive with NumPy only, without importing torch.

A TorchScript file is a zip archive laid out as::

    <prefix>/data.pkl        pickled module tree (objects of `__torch__.*` classes, tensors, ints, lists)
    <prefix>/data/<key>      raw little-endian bytes of each tensor storage
    <prefix>/code/...        the TorchScript source of the modules (not executed here)
    <prefix>/constants.pkl   constants of the code (not needed for the weights)

`data.pkl` is unpickled with a restricted unpickler: the only globals it may name are the torch tensor
rebuild helpers, the storage dtype markers, `collections.OrderedDict` and the `__torch__.*` module classes
(replaced by plain attribute containers). Anything else raises `UnsafeArchiveError`, so loading an archive
never runs code from it.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import ml_dtypes
import numpy as np

# Storage class names used in torch pickles -> NumPy dtype (little-endian on disk).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeArchiveError(pickle.UnpicklingError):
    """The archive's pickle names a global outside the allow-list."""


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


class ScriptObject:
    """Stand-in for an instance of a `__torch__.*` class: holds the pickled attribute dict.

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


_script_classes: dict[str, type] = {}


def _script_class(qualname: str) -> type:
    if qualname not in _script_classes:
        _script_classes[qualname] = type(qualname.rsplit(".", 1)[-1], (ScriptObject,), {"qualname": qualname})
    return _script_classes[qualname]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> np.ndarray:
    """NumPy stand-in for torch._utils._rebuild_tensor_v2: a strided view of a storage, copied."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, np.ndarray):
        raise UnsafeArchiveError(f"tensor storage must come from a storage record, got {type(storage).__name__}")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(storage_offset)
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
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * itemsize for s in stride],
                                           writeable=False)
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> np.ndarray:
    del requires_grad, backward_hooks
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None) -> np.ndarray:
    del requires_grad, backward_hooks, state
    return data


def _build_list(items) -> list:
    """Stand-in for torch.jit._pickle.build_{int,double,bool,tensor,str}list: TorchScript's typed lists."""
    return list(items)


def _restore_type_tag(value, type_str=None):
    del type_str
    return value


_JIT_PICKLE = {
    "build_intlist": _build_list,
    "build_doublelist": _build_list,
    "build_boollist": _build_list,
    "build_tensorlist": _build_list,
    "build_strlist": _build_list,
    "restore_type_tag": _restore_type_tag,
}

_TORCH_UTILS = {
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, read_record, byteorder: str):
        super().__init__(file)
        self._read_record = read_record
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in _TORCH_UTILS:
            return _TORCH_UTILS[name]
        if module == "torch.jit._pickle" and name in _JIT_PICKLE:
            return _JIT_PICKLE[name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        raise UnsafeArchiveError(
            f"the archive's pickle references {module}.{name}, which this reader does not allow "
            "(only tensors, storages, typed lists, OrderedDict and __torch__ module objects are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeArchiveError(f"unsupported persistent id in the pickle: {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeArchiveError(f"storage record {key!r} has no known dtype marker: {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            dtype = storage_type.dtype
            if self._byteorder == "big" and dtype.itemsize > 1:
                dtype = dtype.newbyteorder(">")
            if len(raw) != int(numel) * dtype.itemsize:
                raise UnsafeArchiveError(
                    f"storage record data/{key} has {len(raw)} bytes, expected {int(numel)} x {dtype.itemsize}")
            arr = np.frombuffer(raw, dtype=dtype)
            self._storages[key] = arr.astype(arr.dtype.newbyteorder("=")) if self._byteorder == "big" else arr
        return self._storages[key]


@dataclass
class TorchScriptArchive:
    """The unpickled content of an archive: `root` (usually a ScriptObject tree) and the archive prefix."""

    root: Any
    prefix: str
    code_files: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> dict[str, np.ndarray]:
        """All tensors in the tree, keyed by dotted attribute path ('layers.conv.weight')."""
        return {k: v for k, v in _walk(self.root, "") if isinstance(v, np.ndarray)}

    def attributes(self) -> dict[str, Any]:
        """All leaves (tensors, ints, strings, lists of scalars...), keyed by dotted attribute path."""
        return dict(_walk(self.root, ""))


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, ScriptObject):
        for k, v in obj.state.items():
            yield from _walk(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    else:
        yield path, obj


def _find_prefix(names: list[str]) -> str:
    candidates = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(candidates) != 1:
        raise ValueError(f"not a TorchScript/torch zip archive: expected one '<name>/data.pkl', found {candidates}")
    return candidates[0]


def read_archive(path: str, *, with_code: bool = False) -> TorchScriptArchive:
    """Unpickle `<prefix>/data.pkl` of the zip at `path`, resolving tensor storages from `<prefix>/data/<key>`.

    Raises UnsafeArchiveError if the pickle names anything but tensors/storages/module containers.
    With `with_code`, also returns the TorchScript source files (`code/**.py`) as text, for inspection.
    """
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        prefix = _find_prefix(names)
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = zf.read(f"{prefix}byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")

        def read_record(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafeArchiveError(f"{path}: the pickle refers to storage {name}, which is not in the archive")
            return zf.read(name)

        with zf.open(f"{prefix}data.pkl") as f:
            root = _RestrictedUnpickler(f, read_record, byteorder).load()
        code = {}
        if with_code:
            code = {n[len(prefix):]: zf.read(n).decode() for n in names
                    if n.startswith(f"{prefix}code/") and n.endswith(".py")}
    return TorchScriptArchive(root=root, prefix=prefix.rstrip("/"), code_files=code)


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the archive at `path` as a NumPy array, keyed by dotted attribute path."""
    return read_archive(path).tensors()
