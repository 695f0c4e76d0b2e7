"""Optimizers from config: RAdam, AdamW, Adam with linear warm-up and optional global-norm clipping.

`make_optimizer(optim_config) -> (optax.GradientTransformation, schedule)` where `schedule(step)`
is the learning rate (float) at an optimizer step.
"""
from __future__ import annotations

import optax

OPTIMIZERS = ("radam", "adamw", "adam")


def make_schedule(optim_config) -> optax.Schedule:
    """Constant lr after a linear warm-up of `warmup_steps` steps (0 = no warm-up)."""
    lr = float(optim_config.lr)
    warmup = int(optim_config.get("warmup_steps", 0))
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(optim_config):
    """Builds the optax chain from `config.optim` (name, lr, b1, b2, eps, weight_decay, warmup_steps, grad_clip)."""
    name = optim_config.name.lower()
    schedule = make_schedule(optim_config)
    b1, b2, eps = float(optim_config.b1), float(optim_config.b2), float(optim_config.eps)
    wd = float(optim_config.get("weight_decay", 0.0))
    if name == "radam":
        core = optax.radam(schedule, b1=b1, b2=b2, eps=eps)
        if wd:
            core = optax.chain(optax.add_decayed_weights(wd), core)
    elif name == "adamw":
        core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    elif name == "adam":
        core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
        if wd:
            core = optax.chain(optax.add_decayed_weights(wd), core)
    else:
        raise ValueError(f"config.optim.name={optim_config.name!r} is not known; use one of {OPTIMIZERS}.")
    clip = optim_config.get("grad_clip", None)
    if clip is not None and float(clip) > 0:
        core = optax.chain(optax.clip_by_global_norm(float(clip)), core)
    return core, schedule
