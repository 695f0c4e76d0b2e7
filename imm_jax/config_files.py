"""Find and load config files: `load("configs/fashion_mnist.py:arg")` -> ConfigDict.

The same files `python -m imm_jax.main --config=...` reads. `configs/NAME.py` (or `NAME.py`, `NAME`) that does
not exist relative to the working directory is the installed copy (the repository's configs/ directory is
installed as the `imm_jax.configs` package), so the README's commands work from any directory after
`pip install .`. Any other path is used as given.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections

import imm_jax.configs
from imm_jax.errors import UserError

CONFIG_DIR = os.path.dirname(os.path.abspath(imm_jax.configs.__file__))


def available() -> list[str]:
    """Names of the installed experiment configs (e.g. 'fashion_mnist')."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_")
                  and f != "base.py")


def resolve(spec: str) -> str:
    """`path.py[:arg]` -> an existing file's path (with `:arg` kept); FileNotFoundError says what exists."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    head, name = os.path.split(path)
    if head in ("", "configs") and name:
        installed = os.path.join(CONFIG_DIR, name if name.endswith(".py") else name + ".py")
        if os.path.isfile(installed):
            return installed + sep + arg
    raise FileNotFoundError(f"config file {path!r} not found (relative to {os.getcwd()!r}); the installed configs "
                            f"are {', '.join('configs/' + n + '.py' for n in available())}.")


def flag_value(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of the last --FLAG=VALUE / --FLAG VALUE in argv, or None."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag}="):
            value = a.split("=", 1)[1]
        elif a == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
    """argv with the value of --FLAG=SPEC / --FLAG SPEC resolved by `resolve` (overrides --FLAG.x=... untouched)."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(f"--{flag}="):
            a = f"--{flag}=" + resolve(a.split("=", 1)[1])
        elif a == f"--{flag}" and i + 1 < len(argv):
            out.append(a)
            i += 1
            a = resolve(argv[i])
        out.append(a)
        i += 1
    return out


def load(spec: str) -> ml_collections.ConfigDict:
    """`path.py[:arg]` -> get_config(arg); paths are found as `resolve` says."""
    path, _, arg = resolve(spec).partition(":")
    mod_spec = importlib.util.spec_from_file_location(
        "_imm_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = "config") -> None:
    """UserError naming the first --FLAG.a.b=... whose field does not exist, with the closest valid names."""
    for a in argv:
        if not a.startswith(f"--{flag}."):
            continue
        path = a[len(f"--{flag}."):].split("=", 1)[0].split(".")
        node, seen = config, flag
        for key in path:
            if not isinstance(node, ml_collections.ConfigDict):
                raise UserError(f"--{seen}.{key}: {seen} is a value ({type(node).__name__}), not a section.")
            if key not in node:
                keys = sorted(node.keys())
                close = difflib.get_close_matches(key, keys, n=3)
                hint = f"did you mean {', '.join(f'--{seen}.{c}' for c in close)}? " if close else ""
                raise UserError(f"unknown config field --{seen}.{key} ({a}); {hint}{seen} has: {', '.join(keys)}.")
            node, seen = node[key], f"{seen}.{key}"
