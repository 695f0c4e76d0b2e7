"""Read the tensors of a TorchScript (or torch.save zip) archive with NumPy only, without importing torch.

A TorchScript file is a zip archive laid out as::

    <prefix>/data.pkl        pickled module tree (objects of `__torch__.*` classes, tensors, ints, lists)
    <prefix>/data/<key>      raw little-endian bytes of each tensor storage
    <prefix>/code/...        the TorchScript source of the modules (not executed here)
    <prefix>/constants.pkl   constants of the code (not needed for the weights)

`data.pkl` is read by `imm_jax.io.torch_pickle`'s restricted unpickler with `unknown="error"`: a global outside
its allow-list raises `UnsafeArchiveError`, so loading an archive never runs code from it.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from imm_jax.io.torch_pickle import ScriptObject, UnsafeArchiveError, read_zip

__all__ = ["ScriptObject", "TorchScriptArchive", "UnsafeArchiveError", "load_tensors", "read_archive"]


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


def read_archive(path: str, *, with_code: bool = False) -> TorchScriptArchive:
    """Unpickle `<prefix>/data.pkl` of the zip at `path`, resolving tensor storages from `<prefix>/data/<key>`.

    Raises UnsafeArchiveError if the pickle names anything but tensors/storages/module containers.
    With `with_code`, also returns the TorchScript source files (`code/**.py`) as text, for inspection.
    """
    with zipfile.ZipFile(path) as zf:
        try:
            root, prefix = read_zip(zf, unknown="error")
        except UnsafeArchiveError as e:
            raise UnsafeArchiveError(f"{path}: {e}") from None
        code = {}
        if with_code:
            code = {n[len(prefix):]: zf.read(n).decode() for n in zf.namelist()
                    if n.startswith(f"{prefix}code/") and n.endswith(".py")}
    return TorchScriptArchive(root=root, prefix=prefix.rstrip("/"), code_files=code)


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the archive at `path` as a NumPy array, keyed by dotted attribute path."""
    return read_archive(path).tensors()
