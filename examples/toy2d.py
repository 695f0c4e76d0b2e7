"""IMM on a 2-D toy: 8 Gaussians on a ring, a small MLP, the library's loss and samplers.

    python examples/toy2d.py --out toy2d.png            # about 2 minutes on a 2-core CPU

Trains one IMM model (`imm_jax.core.losses.imm_loss`, pushforward sampler) and one flow-matching model
(`imm_jax.core.losses.fm_loss`, Euler sampler) on the same MLP, data and optimiser, then draws IMM at 1/2/4
steps beside flow matching at 1/4/64 steps, with the sliced Wasserstein-1 distance of each to fresh data
and the fraction of samples that land on a mode. One Euler step of flow matching returns the conditional
mean E[x | x_T], a single blob in the centre; one IMM step returns samples on the ring.

The pieces (data, network, training, metrics) are functions that tests/test_toy.py runs as a regression
test of the whole method.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from imm_jax.core import losses, sampling
from imm_jax.core.parameterization import Parameterization

NUM_MODES = 8
RADIUS = 0.7      # per-coordinate data std sqrt(RADIUS^2 / 2 + MODE_STD^2) = 0.5 = sigma_d
MODE_STD = 0.05


def ring_modes() -> np.ndarray:
    """(8, 2) mode centres on the ring."""
    angle = 2.0 * np.pi * np.arange(NUM_MODES) / NUM_MODES
    return RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)


def sample_data(key, n: int):
    """(n, 2) float32 draws from the ring mixture (equal weights)."""
    k_mode, k_noise = jax.random.split(key)
    idx = jax.random.randint(k_mode, (n,), 0, NUM_MODES)
    centres = jnp.asarray(ring_modes(), jnp.float32)[idx]
    return centres + MODE_STD * jax.random.normal(k_noise, (n, 2), jnp.float32)


def _sinusoid(v, dim: int):
    """(B,) network time inputs (time_scale * t) -> (B, dim) sin/cos features."""
    half = dim // 2
    freqs = jnp.exp(-math.log(1e4) * jnp.arange(half, dtype=jnp.float32) / half)
    arg = v.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


class MLP(nn.Module):
    """G(x_in, t_in, s_in) for 2-D points, in the networks contract (labels and train are accepted, unused)."""
    width: int = 128
    depth: int = 3
    temb_dim: int = 32

    @nn.compact
    def __call__(self, x, t_in, s_in, labels=None, train=False):
        h = jnp.concatenate([x, _sinusoid(t_in, self.temb_dim), _sinusoid(s_in, self.temb_dim)], axis=-1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(x.shape[-1])(h)


@dataclasses.dataclass(frozen=True)
class ToyRecipe:
    """Training settings of the toy (both objectives)."""
    steps: int = 4000
    batch: int = 256
    lr: float = 2e-3
    ema: float = 0.995
    particles: int = 4
    k: int = 10
    chunk: int = 250          # optimiser steps per jitted call


def objective(kind: str, recipe: ToyRecipe = ToyRecipe()) -> losses.IMMObjective:
    """The library objective used for both losses: simple-EDM, OT-FM schedule, eps = 0.006, T = 0.994."""
    return losses.IMMObjective(param=Parameterization(f_type="simple_edm", schedule="fm"),
                               particles=recipe.particles if kind == "imm" else 1, k=recipe.k)


def train(kind: str, seed: int = 0, recipe: ToyRecipe = ToyRecipe(), loss_fn=None,
          obj: Optional[losses.IMMObjective] = None, log=None):
    """Train the MLP with "imm" (imm_loss) or "fm" (fm_loss); returns (net, EMA params, objective).

    loss_fn / obj replace the library's loss function and objective (same signatures), e.g. a modified copy.
    """
    net = MLP()
    obj = obj or objective(kind, recipe)
    loss_fn = loss_fn or losses.OBJECTIVES[kind]
    key = jax.random.PRNGKey(seed)
    k_init, key = jax.random.split(key)
    z = jnp.zeros((1,), jnp.float32)
    params = net.init(k_init, jnp.zeros((1, 2), jnp.float32), z, z)["params"]
    opt = optax.adam(recipe.lr)
    carry = (params, params, opt.init(params))

    def one_step(carry, k):
        params, ema, opt_state = carry
        k_data, k_loss = jax.random.split(k)
        x = sample_data(k_data, recipe.batch)
        (loss, _), grads = jax.value_and_grad(
            lambda p: loss_fn(net, p, x, None, k_loss, objective=obj, train=True), has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: recipe.ema * e + (1.0 - recipe.ema) * p, ema, params)
        return (params, ema, opt_state), loss

    @jax.jit
    def run_chunk(carry, k):
        return jax.lax.scan(one_step, carry, jax.random.split(k, recipe.chunk))

    for i in range(0, recipe.steps, recipe.chunk):
        key, k = jax.random.split(key)
        carry, chunk_losses = run_chunk(carry, k)
        if log is not None:
            log(f"{kind} step {i + recipe.chunk}/{recipe.steps} loss {float(jnp.mean(chunk_losses)):.5f}")
    return net, carry[1], obj


def generate(net, params, obj, n: int, steps: int, *, sampler: str, seed: int = 1):
    """(n, 2) NumPy samples with `steps` steps of the uniform grid from T to eps."""
    grid = sampling.time_grid("uniform", steps, schedule=obj.param.schedule, t_min=obj.t_min, t_max=obj.t_max)
    fn = jax.jit(lambda p, k: sampling.generate(net, p, k, (n, 2), objective=obj.param, grid=grid,
                                                       sampler=sampler))
    return np.asarray(fn(params, jax.random.PRNGKey(seed)))


def sliced_w1(a: np.ndarray, b: np.ndarray, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between two equal-size 2-D point sets (mean over random directions)."""
    if a.shape != b.shape:
        raise ValueError(f"point sets must have equal shapes, got {a.shape} and {b.shape}")
    angle = np.random.default_rng(seed).uniform(0.0, np.pi, num_projections)
    dirs = np.stack([np.cos(angle), np.sin(angle)], axis=0)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def mode_stats(x: np.ndarray, radius: float = 4.0 * MODE_STD) -> dict:
    """on_mode: fraction of points within `radius` of a mode centre; min_share: smallest share of points
    assigned (nearest centre, on-mode points only) to a mode, 1/8 = 0.125 for perfect coverage."""
    d = np.linalg.norm(x[:, None, :] - ring_modes()[None], axis=-1)
    near = d.min(axis=1) < radius
    counts = np.bincount(d.argmin(axis=1)[near], minlength=NUM_MODES)
    return {"on_mode": float(near.mean()), "min_share": float(counts.min() / len(x))}


def evaluate(samples: np.ndarray, seed: int = 123) -> dict:
    """Distances of samples to fresh data of the same size: sliced W1 and the mode statistics."""
    data = np.asarray(sample_data(jax.random.PRNGKey(seed), samples.shape[0]))
    return {"sw1": sliced_w1(samples, data), **mode_stats(samples)}


# Regression bounds of tests/test_toy.py on `run_check` (n = 2000 samples; data vs fresh data: sliced W1 ~0.017,
# on a mode 1.0, smallest mode share ~0.10). Set from 10 seeds of the library's loss, with a margin to the worst
# seed; bench/toy_defects.py shows each of several injected defects in the loss breaking at least one of them.
BOUNDS = {
    "imm_1step": {"sw1": ("<", 0.10), "on_mode": (">", 0.65), "min_share": (">", 0.05)},
    "imm_2step": {"sw1": ("<", 0.08), "on_mode": (">", 0.85), "min_share": (">", 0.06)},
    "fm_1step": {"sw1": (">", 0.30), "on_mode": ("<", 0.05)},
}
CHECK_SAMPLES = 2000


def run_check(seed: int = 0, recipe: ToyRecipe = ToyRecipe(steps=3000), imm_loss=None, imm_obj=None) -> dict:
    """{"imm_1step", "imm_2step", "fm_1step"} -> evaluate() stats, for the bounds above.

    imm_loss / imm_obj replace the library's IMM loss and objective (bench/toy_defects.py passes modified copies).
    """
    out = {}
    net, params, obj = train("imm", seed, recipe, loss_fn=imm_loss, obj=imm_obj)
    for n in (1, 2):
        out[f"imm_{n}step"] = evaluate(generate(net, params, obj, CHECK_SAMPLES, n, sampler="pushforward",
                                                seed=seed + 1))
    net, params, obj = train("fm", seed, recipe)
    out["fm_1step"] = evaluate(generate(net, params, obj, CHECK_SAMPLES, 1, sampler="euler", seed=seed + 1))
    return out


def violations(stats: dict) -> list:
    """The bounds in BOUNDS that `run_check` stats break, as readable strings (empty = all hold)."""
    bad = []
    for cell, limits in BOUNDS.items():
        for name, (op, bound) in limits.items():
            v = stats[cell][name]
            if not (v < bound if op == "<" else v > bound):
                bad.append(f"{cell} {name} = {v:.3f}, bound {op} {bound}")
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="toy2d.png", help="PNG of the scatter plots")
    p.add_argument("--steps", type=int, default=8000, help="training steps of each model")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    recipe = ToyRecipe(steps=args.steps)
    panels = []
    for kind, sampler, step_counts in (("imm", "pushforward", (1, 2, 4)), ("fm", "euler", (1, 4, 64))):
        t0 = time.time()
        net, params, obj = train(kind, args.seed, recipe, log=print)
        print(f"{kind}: trained {recipe.steps} steps in {time.time() - t0:.0f} s")
        for n in step_counts:
            x = generate(net, params, obj, args.samples, n, sampler=sampler)
            stats = evaluate(x)
            print(f"{kind} {n} step(s): " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
            panels.append((f"{'IMM' if kind == 'imm' else 'flow matching'}, {n} step{'s' * (n > 1)}", x, stats))
    data = np.asarray(sample_data(jax.random.PRNGKey(123), args.samples))
    ref = {"sw1": sliced_w1(data, np.asarray(sample_data(jax.random.PRNGKey(7), args.samples))),
           **mode_stats(data)}
    print("data vs fresh data: " + ", ".join(f"{k} {v:.3f}" for k, v in ref.items()))
    plot(panels, ("data", data, ref), args.out)
    print(f"wrote {args.out}")


def plot(panels, data_panel, out: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.6))
    cells = [panels[0], panels[1], panels[2], data_panel, panels[3], panels[4], panels[5], None]
    for ax, cell in zip(axes.ravel(), cells):
        ax.set_xlim(-1.2, 1.2)
        ax.set_ylim(-1.2, 1.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if cell is None:
            ax.axis("off")
            continue
        title, x, stats = cell
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color="black" if title == "data" else "C0")
        ax.set_title(f"{title}\nsliced W1 {stats['sw1']:.3f}, on a mode {stats['on_mode']:.0%}", fontsize=10)
    fig.suptitle("8 Gaussians on a ring: IMM (top) vs flow matching (bottom), same MLP, data and optimiser")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
