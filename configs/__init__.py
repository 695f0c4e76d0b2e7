"""Experiment configs (installed as `imm_jax.configs`): each file's get_config(arg) overrides configs/base.py.

`python -m imm_jax.main --config=configs/NAME.py[:args]` finds them from any directory.
"""
