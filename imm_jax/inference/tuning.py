"""Step-wise, layer-wise time-embedding tuning (MTEO) for a frozen few-step sampler (issue 8).

For a frozen model, a sampler ("euler": flow matching, or "pushforward": IMM) and a fixed N-step grid
t_0 > ... > t_N, learn one conditioning vector per sampling step and per conditioned layer, e (N, L, D),
that the network reads instead of its own time embedding (`cond_override`, see `imm_jax.networks`):

  what is tuned   DiT: the time part t_embedder(t_in) + s_embedder(s_in) before the label embedding is
                  added and before the SiLU, for each of the `depth` blocks and the final layer
                  (L = depth + 1, D = hidden_size); the label embedding is added as before, so one vector
                  serves every class, the guided and the null (CFG) pass.
                  UNet: the pre-SiLU emb_t + emb_s read by every UNetBlock
                  (L = number of blocks, D = model_channels * channel_mult_emb); for a class-conditional
                  UNet the offset is added to that (label-dependent) embedding.
  init            e[i, l] = e0[i], the model's own time part at step i (Euler: s = t = t_i; pushforward:
                  s = t_{i+1}, t = t_i), identical for all layers. The optimised variable is the offset
                  delta = e - e0 (zero at init), applied through `cond_offset`: layer l at step i reads
                  own_time_part(t_i) + delta[i, l], which is e[i, l] since the time part is a function of the
                  step's times only. A zero offset adds an exact 0 to the model's own time part, so the
                  untuned sampler is reproduced bit-for-bit whatever the batch size (tested under jit on
                  XLA:CPU); substituting a separately computed e0 (`cond_override`) can differ in the last
                  ulp because XLA picks matmul kernels by batch size. Class-conditional UNets (label inside
                  the time MLP) can be tuned through the offset only.
  teacher         the same frozen model with many steps from the same x_T (and labels): each coarse
                  interval [t_i, t_{i+1}] is split into ceil(teacher_steps / N) equal sub-steps, so the
                  teacher grid contains every coarse time and its states there are read off exactly
                  (no interpolation). Default: 128 Euler steps for "euler", 16 pushforward steps for
                  "pushforward"; Heun is available for flow matching.
  loss            per trajectory, mean over the N coarse steps and the batch of d(student_i, teacher_i):
                  "l2" (mean squared error), "l1" (mean absolute error) or "pseudo_huber"
                  (sqrt(||.||^2 + c^2) - c, c = 0.00054 sqrt(dim) by default, as in iCT).
                  Distributional, "mmd": IMM's own grouped MMD^2 (V-statistic, the model's kernel and its
                  bandwidth rule w = 1/|c_out(s_i, t_i)| of the step) between the student's and the
                  teacher's states, in groups of `mmd_group` samples that share a label (the batch is drawn
                  group-wise), at every coarse step (mmd_at="every") or at the last only ("end"). It asks for
                  the teacher's distribution at each step, not its per-noise trajectory.
  optimisation    Adam on delta only (Adam is shift-invariant, so this is Adam on e); the backbone
                  params enter the jitted step as an argument that is never differentiated. The student
                  rollout runs each step's network under `jax.checkpoint`. The batch is sharded over all
                  local devices (1-D "data" mesh; the vectors and params replicated).
  data            reference trajectories are drawn once (a pool of `num_trajectories`) and minibatches are
                  sampled from it; a disjoint held-out pool of `num_eval` reports the loss before/after.
  seeds           tuning keys derive from fold_in(key(seed), TUNE_KEY_DOMAIN); `imm_jax.sample` uses
                  fold_in(key(seed), batch index) for noise and fold_in(key(seed), 2**31 - 1) for labels, so
                  tuning never sees an evaluation draw, whatever the two seeds.

The result (`TunedVectors`) is saved beside the checkpoint (`checkpointing.save_tuned`, as
`<step dir>/tuned/<sampler>_<N>step_<grid>`) and used by `imm_jax.load(ckpt, tuned=True)` for the same
sampler, step count and time grid (any other grid is an error).

    python -m imm_jax.tuning --checkpoint=runs/fmnist --sampler=pushforward --steps=2 --num_steps=300
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imm_jax import networks
from imm_jax.core import interpolants, mmd, sampling
from imm_jax.core.losses import IMMObjective, objective_name
from imm_jax.inference import api
from imm_jax.inference.tuned_vectors import TunedVectors, save

SAMPLERS = ("euler", "pushforward")
TEACHERS = {"euler": ("euler", "heun"), "pushforward": ("pushforward",)}
DEFAULT_TEACHER_STEPS = {"euler": 128, "pushforward": 16}
LOSSES = ("l2", "l1", "pseudo_huber", "mmd")
MMD_AT = ("every", "end")
TUNE_KEY_DOMAIN = 2**31 - 2  # evaluation uses batch indices < 2**31 - 2 and 2**31 - 1 (labels)


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """What to tune and how; see the module docstring.

    Attributes:
      sampler: "euler" (flow-matching model) or "pushforward" (IMM model).
      steps: N, the sampler's step count; grid / mid_etas: the time grid (`sampling.time_grid`).
      teacher_steps: total teacher steps (default 128 for euler, 16 for pushforward), rounded up to a
        multiple of N. teacher_sampler: "euler" | "heun" (FM) or "pushforward" (IMM); default = sampler.
      loss: "mmd" (default; docs/RESULTS.md: it improves flow matching's few-step FID, the trajectory losses do
        not) | "l2" | "l1" | "pseudo_huber"; huber_c: pseudo-Huber c (default 0.00054 sqrt(H W C)).
      mmd_group: samples per MMD group (loss "mmd"; default: the objective's particle count M, at least 4);
        must divide batch_size. mmd_at: "every" coarse step or the "end" state only.
      lr: Adam learning rate on e; num_steps: tuning steps; batch_size: global minibatch.
      num_trajectories / num_eval: sizes of the training and held-out reference pools.
      cfg_scale: guidance weight used by both teacher and student (class-conditional models).
      seed: tuning seed (keys are domain-separated from evaluation keys); log_every: progress period.
    """
    sampler: str = "pushforward"
    steps: int = 2
    grid: str = "uniform"
    mid_etas: Optional[tuple] = None
    teacher_steps: Optional[int] = None
    teacher_sampler: Optional[str] = None
    loss: str = "mmd"
    huber_c: Optional[float] = None
    mmd_group: Optional[int] = None
    mmd_at: str = "every"
    lr: float = 1e-3
    num_steps: int = 200
    batch_size: int = 64
    num_trajectories: int = 1024
    num_eval: int = 256
    cfg_scale: Optional[float] = None
    seed: int = 0
    log_every: int = 20

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"tuning sampler must be one of {SAMPLERS} ('euler' for flow-matching models, "
                             f"'pushforward' for IMM models), got {self.sampler!r}")
        if self.teacher_sampler is not None and self.teacher_sampler not in TEACHERS[self.sampler]:
            raise ValueError(f"teacher_sampler for sampler={self.sampler!r} must be one of "
                             f"{TEACHERS[self.sampler]}, got {self.teacher_sampler!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"tuning loss must be one of {LOSSES}, got {self.loss!r}")
        if self.steps < 1 or self.num_steps < 0 or self.batch_size < 1:
            raise ValueError("need steps >= 1, num_steps >= 0 and batch_size >= 1")
        if self.num_trajectories < self.batch_size:
            raise ValueError(f"num_trajectories ({self.num_trajectories}) must be >= batch_size "
                             f"({self.batch_size})")
        if self.mmd_at not in MMD_AT:
            raise ValueError(f"mmd_at must be one of {MMD_AT}, got {self.mmd_at!r}")
        if self.mmd_group is not None and (self.mmd_group < 2 or self.batch_size % self.mmd_group):
            raise ValueError(f"mmd_group ({self.mmd_group}) must be >= 2 and divide batch_size ({self.batch_size})")
        if self.teacher_steps is not None and self.teacher_steps < self.steps:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be >= steps ({self.steps})")

    @property
    def resolved_teacher(self) -> tuple[str, int]:
        """(teacher sampler, sub-steps per coarse step)."""
        total = self.teacher_steps or DEFAULT_TEACHER_STEPS[self.sampler]
        return self.teacher_sampler or self.sampler, int(math.ceil(total / self.steps))

    @property
    def name(self) -> str:
        return f"{self.sampler}_{self.steps}step_{self.grid}"


# ------------------------------------------------------------------------------------------ grids

def teacher_segments(grid, substeps: int) -> np.ndarray:
    """(N, substeps + 1) float64: each coarse interval [t_i, t_{i+1}] split into equal sub-steps.

    Row i starts at t_i and ends at t_{i+1} exactly, so the teacher's state after row i is at t_{i+1}.
    """
    grid = np.asarray(grid, np.float64)
    segs = np.stack([np.linspace(a, b, substeps + 1) for a, b in zip(grid[:-1], grid[1:])])
    segs[:, 0], segs[:, -1] = grid[:-1], grid[1:]
    return segs


def step_times(grid, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) per step, (N,) float32 each, as the sampler feeds them to f_{s,t} / v(., t)."""
    g = np.asarray(grid, np.float32)
    return (g[:-1] if sampler == "euler" else g[1:]), g[:-1]


# ------------------------------------------------------------------------------------------ math

def initial_vectors(net, params, param, grid, sampler: str, image_shape, num_classes: int) -> jax.Array:
    """e0 (N, L, D) float32: the model's own time part at each step, repeated over the L layers."""
    num_layers, _ = networks.cond_layout(net)
    s, t = step_times(grid, sampler)
    rows = []
    for s_i, t_i in zip(s, t):
        s_b, t_b = jnp.full((1,), s_i, jnp.float32), jnp.full((1,), t_i, jnp.float32)
        t_in, s_in = param.time_inputs(s_b, t_b)
        labels = jnp.full((1,), num_classes, jnp.int32) if num_classes else None
        tc = networks.time_condition(net, params, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                                     t_in, s_in, labels)
        rows.append(jnp.broadcast_to(tc[0], (num_layers, tc.shape[-1])))
    return jnp.stack(rows).astype(jnp.float32)


def rollout(net, params, param, x_init, grid, *, sampler: str, labels=None, cfg_scale=None,
            null_label=None, cond_offset=None, remat: bool = False, substeps: int = 1, heun: bool = False):
    """States (N, B, H, W, C) after each of the N coarse steps of `grid`.

    substeps > 1 (teacher): each coarse interval is integrated with that many equal sub-steps
    (`teacher_segments`), heun=True using Heun's method (flow matching). cond_offset (N, L, D): per-step,
    per-layer offsets added to the model's time part (student); remat: each step's network under
    jax.checkpoint.
    """
    per_step = None if cond_offset is None else {"cond_offset": cond_offset}

    def fn_for(e):
        def fn(x_in, t_in, s_in, lab):
            return net.apply({"params": params}, x_in, t_in, s_in, labels=lab, train=False, **(e or {}))
        return fn

    def v(x, t, e=None):
        return param.velocity(fn_for(e), x, t, labels, cfg_scale=cfg_scale, null_label=null_label)

    def f(x, s, t, e=None):
        return param.apply(fn_for(e), x, s, t, labels, cfg_scale=cfg_scale, null_label=null_label)

    if remat:
        v, f = jax.checkpoint(v), jax.checkpoint(f)
    if substeps == 1:
        if sampler == "euler":
            return sampling.ode(v, x_init, grid, heun=heun, per_step=per_step, trajectory=True)
        return sampling.pushforward(f, x_init, grid, per_step=per_step, trajectory=True)
    if per_step is not None:
        raise ValueError("sub-stepped rollouts (the teacher) take no cond_offset")
    segs = jnp.asarray(teacher_segments(np.asarray(grid), substeps), jnp.float32)

    def interval(x, seg):
        x = (sampling.ode(v, x, seg, heun=heun) if sampler == "euler" else sampling.pushforward(f, x, seg))
        return x, x

    _, states = jax.lax.scan(interval, x_init.astype(jnp.float32), segs)
    return states


def trajectory_distance(a, b, kind: str, huber_c: Optional[float] = None) -> jax.Array:
    """Per (step, sample) distance between states (N, B, ...) -> (N, B) float32."""
    diff = (a - b).astype(jnp.float32).reshape(a.shape[0], a.shape[1], -1)
    if kind == "l2":
        return jnp.mean(jnp.square(diff), axis=-1)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff), axis=-1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[-1]) if huber_c is None else huber_c
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + c * c) - c
    raise ValueError(f"tuning loss must be one of {LOSSES}, got {kind!r}")


def distribution_distance(a, b, *, group: int, kernel_weights, kernel: str = "laplace") -> jax.Array:
    """Per-step grouped MMD^2 between student states a and teacher states b (N, B, ...) -> (N,) float32.

    Consecutive samples form groups of `group` (B divisible by it); kernel_weights (N,) is w per step; the
    per-step value is the mean over groups of the V-statistic (`imm_jax.core.mmd.grouped_mmd`).
    """
    n, batch = a.shape[:2]
    if batch % group:
        raise ValueError(f"batch {batch} is not divisible by the MMD group size {group}")
    grouped = lambda z: z.reshape((n, batch // group, group) + z.shape[2:])
    per = jax.vmap(lambda x, y, w: jnp.mean(mmd.grouped_mmd(x, y, kernel_weight=w, kernel=kernel)))(
        grouped(a), grouped(b), jnp.asarray(kernel_weights, jnp.float32))
    return per.astype(jnp.float32)


# ------------------------------------------------------------------------------------------ tuner

class Tuner:
    """Jitted pieces of one tuning problem: reference trajectories, loss, and the Adam step on e."""

    def __init__(self, net, params, objective: IMMObjective, settings: TuneSettings, *, image_shape,
                 num_classes: int, devices=None):
        self.net, self.settings = net, settings
        self.param = objective.param
        self.null_label = objective.null_label
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.grid = sampling.time_grid(settings.grid, settings.steps, schedule=self.param.schedule,
                                       t_min=objective.t_min, t_max=objective.t_max, mid_etas=settings.mid_etas)
        self.cfg_scale = (None if not self.num_classes or settings.cfg_scale is None
                          or float(settings.cfg_scale) == 1.0 else float(settings.cfg_scale))
        self.devices = list(devices or jax.local_devices())
        n_dev = len(self.devices)
        if settings.batch_size % n_dev:
            raise ValueError(f"tuning batch_size {settings.batch_size} must be a multiple of the {n_dev} "
                             "local devices (the batch is sharded over them).")
        mesh = Mesh(np.asarray(self.devices), ("data",))
        self.rep = NamedSharding(mesh, P())
        self.bat = NamedSharding(mesh, P("data"))
        self.traj = NamedSharding(mesh, P(None, "data"))
        self.params = jax.device_put(params, self.rep)
        self.optimizer = optax.adam(settings.lr)
        teacher, self.substeps = settings.resolved_teacher
        self.teacher_name = teacher
        grid32 = jnp.asarray(self.grid, jnp.float32)
        common = dict(sampler=settings.sampler, cfg_scale=self.cfg_scale, null_label=self.null_label)
        self.mmd_group = settings.mmd_group or max(4, int(objective.particles))
        if settings.loss == "mmd" and settings.batch_size % self.mmd_group:
            raise ValueError(f"tuning batch_size {settings.batch_size} must be a multiple of the MMD group size "
                             f"{self.mmd_group} (set mmd_group)")
        s_end, t_start = np.asarray(self.grid[1:], np.float32), np.asarray(self.grid[:-1], np.float32)
        self.kernel_weights = np.asarray(objective.kernel_weight(jnp.asarray(s_end), jnp.asarray(t_start)),
                                         np.float32)
        step_mask = np.ones(settings.steps, np.float32)
        if settings.mmd_at == "end":
            step_mask[:-1] = 0.0

        def distance(states, targets):
            """(total loss, per-step loss (N,))."""
            if settings.loss == "mmd":
                per = distribution_distance(states, targets, group=self.mmd_group,
                                            kernel_weights=self.kernel_weights, kernel=objective.kernel)
                return jnp.sum(per * step_mask) / step_mask.sum(), per
            d = trajectory_distance(states, targets, settings.loss, settings.huber_c)
            return jnp.mean(d), jnp.mean(d, axis=1)

        def teacher_fn(params, x_init, labels):
            return rollout(net, params, self.param, x_init, self.grid, labels=labels, substeps=self.substeps,
                           heun=teacher == "heun", **common)

        def loss_fn(e, params, x_init, labels, targets):
            states = rollout(net, params, self.param, x_init, grid32, labels=labels, cond_offset=e,
                             remat=True, **common)
            return distance(states, targets)

        def train_step(e, opt_state, params, x_init, labels, targets):
            (loss, per_step), grads = jax.value_and_grad(loss_fn, has_aux=True)(e, params, x_init, labels,
                                                                               targets)
            updates, opt_state = self.optimizer.update(grads, opt_state, e)
            return optax.apply_updates(e, updates), opt_state, loss, per_step

        lab = self.bat if self.num_classes else None
        self.teacher = jax.jit(teacher_fn, in_shardings=(self.rep, self.bat, lab), out_shardings=self.traj)
        self.loss = jax.jit(loss_fn, in_shardings=(self.rep, self.rep, self.bat, lab, self.traj))
        self.grad = jax.jit(jax.grad(lambda *a: loss_fn(*a)[0]),
                            in_shardings=(self.rep, self.rep, self.bat, lab, self.traj))
        self.step = jax.jit(train_step, in_shardings=(self.rep, self.rep, self.rep, self.bat, lab, self.traj),
                            donate_argnums=(0, 1))

    @property
    def separable(self) -> bool:
        """Whether the time part can be replaced on its own (`cond_override`): not for conditional UNets."""
        return not (isinstance(self.net, networks.unet.SongUNet) and self.num_classes)

    def initial_vectors(self) -> jax.Array:
        """e0 (N, L, D): the model's own time part per step (see `initial_vectors`)."""
        return initial_vectors(self.net, self.params, self.param, self.grid, self.settings.sampler,
                               self.image_shape, self.num_classes)

    def zero_offsets(self) -> jax.Array:
        layers, width = networks.cond_layout(self.net)
        return jax.device_put(jnp.zeros((self.settings.steps, layers, width), jnp.float32), self.rep)

    def draw(self, pool: int, count: int):
        """`count` (x_T, labels) pairs of pool 0 (training) or 1 (held out), in batch_size chunks, numpy."""
        root = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.settings.seed), TUNE_KEY_DOMAIN), pool)
        bs = self.settings.batch_size
        xs, ys = [], []
        for j in range(int(math.ceil(count / bs))):
            k_noise, k_label = jax.random.split(jax.random.fold_in(root, j))
            xs.append(np.asarray(interpolants.prior_noise(k_noise, (bs,) + self.image_shape, self.param.sigma_d)))
            if self.num_classes and self.settings.loss == "mmd":  # one label per MMD group
                g = self.mmd_group
                ys.append(np.repeat(np.asarray(jax.random.randint(k_label, (bs // g,), 0, self.num_classes),
                                               np.int32), g))
            elif self.num_classes:
                ys.append(np.asarray(jax.random.randint(k_label, (bs,), 0, self.num_classes), np.int32))
        x = np.concatenate(xs)[:count]
        return x, (np.concatenate(ys)[:count] if self.num_classes else None)

    def references(self, x, labels):
        """Teacher states (N, count, ...) numpy for noise x (count, ...) and labels, in batch_size chunks."""
        bs, out = self.settings.batch_size, []
        for i in range(0, len(x), bs):
            xb, yb = self._pad(x[i:i + bs]), None if labels is None else self._pad(labels[i:i + bs])
            out.append(np.asarray(self.teacher(self.params, xb, yb))[:, :min(bs, len(x) - i)])
        return np.concatenate(out, axis=1)

    def evaluate(self, e, x, labels, targets) -> tuple[float, np.ndarray]:
        """Mean loss and per-step loss (N,) of offsets e on a reference set."""
        bs, tot, per, n = self.settings.batch_size, 0.0, 0.0, 0
        for i in range(0, len(x) - bs + 1, bs):
            loss, ps = self.loss(e, self.params, x[i:i + bs], None if labels is None else labels[i:i + bs],
                                 targets[:, i:i + bs])
            tot, per, n = tot + float(loss), per + np.asarray(ps), n + 1
        if n == 0:
            raise ValueError(f"a reference set needs at least batch_size = {bs} trajectories")
        return tot / n, per / n

    def _pad(self, a):
        bs = self.settings.batch_size
        return a if len(a) == bs else np.concatenate([a, np.repeat(a[-1:], bs - len(a), axis=0)])


def tune(net, params, objective: IMMObjective, settings: TuneSettings, *, image_shape, num_classes: int,
         log: Optional[Callable[[dict], None]] = None, devices=None) -> TunedVectors:
    """Tunes e (N, L, D) for the frozen (net, params); returns it with its metadata (losses, timings)."""
    t0 = time.time()
    tuner = Tuner(net, params, objective, settings, image_shape=image_shape, num_classes=num_classes,
                  devices=devices)
    bs = settings.batch_size
    x_tr, y_tr = tuner.draw(0, settings.num_trajectories)
    x_ev, y_ev = tuner.draw(1, max(1, math.ceil(settings.num_eval / bs)) * bs)  # whole batches
    ref_tr, ref_ev = tuner.references(x_tr, y_tr), tuner.references(x_ev, y_ev)
    t_ref = time.time() - t0
    e = tuner.zero_offsets()
    loss0, per0 = tuner.evaluate(e, x_ev, y_ev, ref_ev)
    if log:
        log(dict(step=0, eval_loss=loss0, eval_per_step=per0.tolist(), reference_seconds=t_ref))
    opt_state = tuner.optimizer.init(e)
    order = np.random.default_rng([settings.seed, TUNE_KEY_DOMAIN])
    t1, history = time.time(), []
    for step in range(1, settings.num_steps + 1):
        idx = order.choice(len(x_tr), bs, replace=False)
        e, opt_state, loss, per_step = tuner.step(e, opt_state, tuner.params, x_tr[idx],
                                                  None if y_tr is None else y_tr[idx], ref_tr[:, idx])
        if step % settings.log_every == 0 or step == settings.num_steps:
            history.append([step, float(loss)])
            if log:
                log(dict(step=step, train_loss=float(loss), train_per_step=np.asarray(per_step).tolist(),
                         steps_per_second=step / max(time.time() - t1, 1e-9)))
    t_tune = time.time() - t1
    loss1, per1 = tuner.evaluate(e, x_ev, y_ev, ref_ev)
    if log:
        log(dict(step=settings.num_steps, eval_loss=loss1, eval_per_step=per1.tolist(), tune_seconds=t_tune))
    layers, width = networks.cond_layout(net)
    teacher, substeps = settings.resolved_teacher
    meta = dict(
        format=1, sampler=settings.sampler, steps=settings.steps, grid=[float(t) for t in tuner.grid],
        grid_kind=settings.grid, mid_etas=None if settings.mid_etas is None else list(settings.mid_etas),
        cfg_scale=tuner.cfg_scale, layers=layers, width=width, model=type(net).__name__,
        teacher=teacher, teacher_steps=substeps * settings.steps, loss=settings.loss, huber_c=settings.huber_c,
        mmd_group=tuner.mmd_group if settings.loss == "mmd" else None,
        mmd_at=settings.mmd_at if settings.loss == "mmd" else None,
        lr=settings.lr, num_steps=settings.num_steps, batch_size=settings.batch_size,
        num_trajectories=settings.num_trajectories, num_eval=len(x_ev), seed=settings.seed,
        eval_loss_before=loss0, eval_loss_after=loss1, eval_per_step_before=per0.tolist(),
        eval_per_step_after=per1.tolist(), train_history=history, reference_seconds=t_ref,
        tune_seconds=t_tune, total_seconds=time.time() - t0)
    offsets = np.asarray(e, np.float32)
    vectors = np.asarray(tuner.initial_vectors() + e, np.float32) if tuner.separable else None
    return TunedVectors(offsets, vectors, meta)


# ------------------------------------------------------------------------------------------ entry point

def tune_main(checkpoint: str, workdir: Optional[str] = None, *, ema: Optional[float] = None,
              step: Optional[int] = None, save_to: Optional[str] = None, name: Optional[str] = None,
              **settings) -> tuple[TunedVectors, str]:
    """Tune a checkpoint's EMA params and save beside it; prints progress, appends metrics JSON lines.

    checkpoint: workdir / checkpoints dir / step dir / converted weights (as `imm_jax.load`).
    workdir: where tune_metrics.jsonl goes (default: <step dir>/tuned/).
    save_to: step dir to save into (default: the checkpoint's). settings: `TuneSettings` fields.
    Returns (tuned vectors, path of the saved set).
    """
    from imm_jax.training import checkpointing
    step_dir = checkpointing.sampling_step_dir(checkpoint, step)
    config, emas = checkpointing.restore_for_sampling(step_dir)
    ema_key, params = api._pick_ema(emas, ema, config)
    unknown = set(settings) - {f.name for f in dataclasses.fields(TuneSettings)}
    if unknown:
        raise ValueError(f"unknown tuning settings {sorted(unknown)}; known: "
                         f"{[f.name for f in dataclasses.fields(TuneSettings)]}")
    if settings.get("mid_etas") is None and settings.get("grid") == "etas":
        opts = api.resolve_options(config, steps=settings.get("steps", TuneSettings.steps), grid="etas")
        settings["mid_etas"] = opts["mid_etas"]
    if settings.get("mid_etas") is not None:
        settings["mid_etas"] = tuple(float(v) for v in settings["mid_etas"])
    if "cfg_scale" not in settings and int(config.model.num_classes):
        settings["cfg_scale"] = config.get("sample", {}).get("cfg_scale", None)
    s = TuneSettings(**settings)
    kind = objective_name(config)
    if (kind == "fm") != (s.sampler == "euler"):
        raise ValueError(f"sampler={s.sampler!r} does not fit this {kind.upper()} checkpoint: tune "
                         + ("sampler='euler' for a flow-matching model." if kind == "fm"
                            else "sampler='pushforward' for an IMM model."))
    net = networks.build(config.model)
    objective = IMMObjective.from_config(config.imm, num_classes=int(config.model.num_classes))
    image_shape = (int(config.model.image_size),) * 2 + (int(config.model.in_channels),)
    metrics_dir = workdir or os.path.join(step_dir, checkpointing.TUNED_DIR)
    metrics_path = os.path.join(metrics_dir, "tune_metrics.jsonl")
    if jax.process_index() == 0:
        os.makedirs(metrics_dir, exist_ok=True)
    is_host0 = jax.process_index() == 0

    def log(m):
        m = dict(m, name=s.name)
        if not is_host0:
            return
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(m) + "\n")
        if "eval_loss" in m:
            per = " ".join(f"{v:.5g}" for v in m["eval_per_step"])
            print(f"[tune {s.name}] step {m['step']}: held-out loss {m['eval_loss']:.6g} (per step: {per})",
                  flush=True)
        else:
            print(f"[tune {s.name}] step {m['step']}/{s.num_steps}: loss {m['train_loss']:.6g} "
                  f"({m['steps_per_second']:.2f} steps/s)", flush=True)

    print(f"[tune {s.name}] EMA {ema_key} of {step_dir}; teacher {s.resolved_teacher[0]} "
          f"{s.resolved_teacher[1] * s.steps} steps; {s.num_trajectories} reference trajectories", flush=True)
    tuned = tune(net, params, objective, s, image_shape=image_shape, num_classes=int(config.model.num_classes),
                 log=log)
    tuned.meta["ema"] = ema_key
    path = save(save_to or step_dir, tuned, name) if is_host0 else ""
    m = tuned.meta
    print(f"[tune {s.name}] held-out loss {m['eval_loss_before']:.6g} -> {m['eval_loss_after']:.6g} in "
          f"{m['total_seconds']:.1f} s; saved to {path}", flush=True)
    return tuned, path


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m imm_jax.tuning", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--ema", type=float, default=None)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--name", default=None, help="set name (default <sampler>_<N>step_<grid>)")
    for f in dataclasses.fields(TuneSettings):
        if f.name == "mid_etas":
            parser.add_argument("--mid_etas", type=float, nargs="*", default=None)
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split("[")[-1].rstrip("]"), str)
        parser.add_argument(f"--{f.name}", type=kind, default=None)
    args = vars(parser.parse_args(argv))
    base = {k: args.pop(k) for k in ("checkpoint", "workdir", "ema", "step", "name")}
    tune_main(base["checkpoint"], base["workdir"], ema=base["ema"], step=base["step"], name=base["name"],
              **{k: v for k, v in args.items() if v is not None})

