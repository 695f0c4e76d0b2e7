"""Load a config file outside the command line: `load("configs/fashion_mnist.py:arg")` -> ConfigDict.

The same files `python -m imm_jax.main --config=...` reads; for notebooks, tests and benchmarks.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def load(spec: str) -> ml_collections.ConfigDict:
    """`path.py[:arg]` -> get_config(arg). Relative paths are tried against the cwd, then the repository."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        repo_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if not os.path.exists(repo_path):
            raise FileNotFoundError(f"config file {path!r} not found (also tried {repo_path!r}).")
        path = repo_path
    mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)
