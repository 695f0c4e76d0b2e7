"""Few-step samplers and time grids (spec §5).

Grids are decreasing NumPy float64 arrays t_0 = T > t_1 > ... > t_N = t_min (N = steps):
  "uniform"  linspace(T, t_min, N + 1)                          (ImageNet default)
  "edm"      rho = 7 spacing in eta = sigma/alpha, from eta(T) to eta(t_min)
  "etas"     [T] + [t(eta) for eta in mid_etas] + [t_min]        (CIFAR 2-step: mid_etas = (1.4,))

Samplers, with the one-step map f_{s,t} of the model:
  pushforward  x <- f_{t_{i+1}, t_i}(x), i = 0..N-1
  restart      x~ <- f_{t_min, t_i}(x); x <- alpha_{t_{i+1}} x~ + sigma_{t_{i+1}} eps~  (fresh eps~ ~ N(0, sigma_d^2))
  euler / heun (flow-matching baseline)  x <- x + (t_{i+1} - t_i) v(x, t_i), Heun adding the trapezoid correction
Sampling starts from x_T ~ N(0, sigma_d^2 I); state is float32.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.core import interpolants
from imm_jax.core.losses import IMMObjective, network_fn
from imm_jax.core.parameterization import Parameterization

GRIDS = ("uniform", "edm", "etas")
SAMPLERS = ("pushforward", "restart", "euler", "heun")
IMM_SAMPLERS = ("pushforward", "restart")  # need an IMM-trained f_{s,t}
FM_SAMPLERS = ("euler", "heun")             # integrate a flow-matching velocity (the baseline)


def default_sampler(objective: str) -> str:
    """The sampler used when none is configured: "euler" for a flow-matching model, else "pushforward"."""
    return "euler" if objective == "fm" else "pushforward"


def time_grid(kind: str, steps: int, *, schedule: str, t_min: float, t_max: float,
              mid_etas: Optional[Sequence[float]] = None, rho: float = 7.0) -> np.ndarray:
    """The (steps + 1,) float64 time grid from t_max down to t_min; see module docstring."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if kind == "uniform":
        grid = np.linspace(t_max, t_min, steps + 1)
    elif kind == "edm":
        e_max = float(interpolants.eta(float(t_max), schedule))
        e_min = float(interpolants.eta(float(t_min), schedule))
        i = np.arange(steps + 1) / steps
        etas = (e_max ** (1 / rho) + i * (e_min ** (1 / rho) - e_max ** (1 / rho))) ** rho
        grid = np.asarray(interpolants.t_from_eta(etas, schedule), np.float64)
        grid[0], grid[-1] = t_max, t_min
    elif kind == "etas":
        mids = list(mid_etas or ())
        if len(mids) != steps - 1:
            raise ValueError(f"grid 'etas' with {steps} steps needs {steps - 1} mid-point etas, got "
                             f"{len(mids)} ({mids}); e.g. steps=2, mid_etas=(1.4,) for CIFAR-10.")
        mid_t = [float(interpolants.t_from_eta(float(e), schedule)) for e in mids]
        grid = np.asarray([t_max] + mid_t + [t_min], np.float64)
    else:
        raise ValueError(f"Unknown grid {kind!r}; expected one of {GRIDS}.")
    if not np.all(np.diff(grid) < 0):
        raise ValueError(f"time grid must decrease strictly from t_max to t_min, got {grid.tolist()}.")
    return grid


StepFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def pushforward(f: StepFn, x_init, grid, *, per_step=None, trajectory: bool = False):
    """Apply x <- f(x, s=t_{i+1}, t=t_i) along the grid. f(x, s, t) takes (B,) times; returns float32.

    per_step: optional pytree with leading axis N (steps); step i then calls f(x, s, t, per_step[i]).
    trajectory: return the (N, B, ...) states after every step instead of the final state.
    """
    grid = jnp.asarray(grid, jnp.float32)
    batch = x_init.shape[0]

    def step(x, inp):
        t_cur, t_next, extra = inp
        bc = lambda v: jnp.full((batch,), v, jnp.float32)
        args = () if per_step is None else (extra,)
        x = f(x, bc(t_next), bc(t_cur), *args).astype(jnp.float32)
        return x, (x if trajectory else None)

    x, states = jax.lax.scan(step, x_init.astype(jnp.float32), (grid[:-1], grid[1:], per_step))
    return states if trajectory else x


def restart(f: StepFn, x_init, grid, key, *, sigma_d: float, schedule: str):
    """Restart sampling (spec §5, paper Alg. 5): jump to t_min, re-noise to the next grid time."""
    grid = jnp.asarray(grid, jnp.float32)
    batch = x_init.shape[0]
    t_end = grid[-1]
    n = grid.shape[0] - 1
    keys = jax.random.split(key, n)
    bc = lambda v: jnp.full((batch,), v, jnp.float32)

    def step(x, inp):
        t_cur, t_next, k = inp
        clean = f(x, bc(t_end), bc(t_cur)).astype(jnp.float32)
        noise = interpolants.prior_noise(k, x.shape, sigma_d)
        renoised = interpolants.add_noise(clean, noise, bc(t_next), schedule)
        return renoised, clean

    _, cleans = jax.lax.scan(step, x_init.astype(jnp.float32), (grid[:-1], grid[1:], keys))
    return cleans[-1]


VelocityFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def ode(v: VelocityFn, x_init, grid, *, heun: bool = False, per_step=None, trajectory: bool = False):
    """Integrate dx/dt = v(x, t) along the decreasing grid (Euler, or Heun's 2nd order); v takes (B,) times.

    per_step: optional pytree with leading axis N (Euler only); step i then calls v(x, t, per_step[i]).
    trajectory: return the (N, B, ...) states after every step instead of the final state.
    """
    if heun and per_step is not None:
        raise ValueError("per-step network inputs (tuned conditioning) are defined for Euler steps only: "
                         "Heun's corrector evaluates at t_{i+1}, which has no vector of its own.")
    grid = jnp.asarray(grid, jnp.float32)
    batch = x_init.shape[0]
    bc = lambda val: jnp.full((batch,), val, jnp.float32)

    def step(x, inp):
        t_cur, t_next, extra = inp
        h = t_next - t_cur
        d = v(x, bc(t_cur)) if per_step is None else v(x, bc(t_cur), extra)
        x_next = x + h * d
        if heun:
            x_next = x + 0.5 * h * (d + v(x_next, bc(t_next)))
        x_next = x_next.astype(jnp.float32)
        return x_next, (x_next if trajectory else None)

    x, states = jax.lax.scan(step, x_init.astype(jnp.float32), (grid[:-1], grid[1:], per_step))
    return states if trajectory else x


def generate(net, params, key, shape, *, objective: Union[IMMObjective, Parameterization], grid,
             labels=None, cfg_scale=None, sampler: str = "pushforward", null_label: Optional[int] = None,
             noise=None, cond_override=None, cond_offset=None):
    """Samples in model space, float32 of `shape` (B, H, W, C).

    Args:
      net, params: a networks-contract Linen module and its (EMA) params.
      key: PRNG key; the initial noise and restart noise derive from it (same key, same samples).
      objective: IMMObjective (its parameterisation and null label are used) or a Parameterization.
      grid: (N + 1,) decreasing times (see `time_grid`); may be a traced array.
      labels: (B,) int class ids or None; cfg_scale: guidance weight w (None = no guidance).
      noise: optional (B, H, W, C) x_T to use instead of drawing it from key.
      cond_override / cond_offset: optional (N, L, D) per-step, per-layer conditioning (tuned time
        embeddings, see `imm_jax.inference.tuning`): step i runs the network with cond_override=cond_override[i]
        (replacing its time part) or cond_offset=cond_offset[i] (added to it). Samplers "pushforward" and
        "euler" only; at most one of the two.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; expected one of {SAMPLERS}.")
    per_step = {k: v for k, v in dict(cond_override=cond_override, cond_offset=cond_offset).items()
                if v is not None}
    if len(per_step) > 1:
        raise ValueError("pass cond_override or cond_offset, not both.")
    if per_step and sampler not in ("pushforward", "euler"):
        raise ValueError(f"tuned conditioning ({next(iter(per_step))}) is defined for the 'pushforward' and "
                         f"'euler' samplers, got sampler={sampler!r}.")
    if isinstance(objective, IMMObjective):
        param = objective.param
        null_label = objective.null_label if null_label is None else null_label
    else:
        param = objective
    k_noise, k_restart = jax.random.split(key)
    x_init = interpolants.prior_noise(k_noise, shape, param.sigma_d) if noise is None else noise
    fn = network_fn(net, params, train=False)

    def f(x, s, t):
        return param.apply(fn, x, s, t, labels, cfg_scale=cfg_scale, null_label=null_label)

    if per_step:
        def fn_e(e):
            return lambda x_in, t_in, s_in, lab: net.apply({"params": params}, x_in, t_in, s_in, labels=lab,
                                                           train=False, **e)
        if sampler == "euler":
            v_e = lambda x, t, e: param.velocity(fn_e(e), x, t, labels, cfg_scale=cfg_scale,
                                                 null_label=null_label)
            return ode(v_e, x_init, grid, per_step=per_step)
        f_e = lambda x, s, t, e: param.apply(fn_e(e), x, s, t, labels, cfg_scale=cfg_scale,
                                             null_label=null_label)
        return pushforward(f_e, x_init, grid, per_step=per_step)
    if sampler in FM_SAMPLERS:
        v = lambda x, t: param.velocity(fn, x, t, labels, cfg_scale=cfg_scale, null_label=null_label)
        return ode(v, x_init, grid, heun=sampler == "heun")
    if sampler == "pushforward":
        return pushforward(f, x_init, grid)
    return restart(f, x_init, grid, k_restart, sigma_d=param.sigma_d, schedule=param.schedule)
