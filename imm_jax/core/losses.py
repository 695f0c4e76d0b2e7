"""The IMM objective (spec §3): time sampling, the mapping r(s,t), the weight w(t), and the loss.

Per optimizer step, the batch of B samples is split into G = B / M groups of M consecutive samples.
Each group shares one (s, r, t): t ~ U(t_min, t_max), s ~ U(t_min, t), r = r(s, t). With one noise
draw eps ~ N(0, sigma_d^2 I), x_t = alpha_t x + sigma_t eps and x_r = alpha_r x + sigma_r eps, and

  loss = mean_groups w(t) MMD^2( f_{s,t}(x_t; theta), sg[f_{s,r}(x_r; theta)] ),

the target computed with the *current* parameters under stop-gradient (not the EMA).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from imm_jax.core import interpolants, mmd
from imm_jax.core.parameterization import Parameterization

MAPPINGS = ("eta", "t", "logsnr", "inv_eta")
DROPOUT_KEYS = ("independent", "shared")
NUM_TIME_BINS = 4


def mapping_delta(*, schedule: str, k: int, t_min: float, t_max: float, kind: str = "eta") -> float:
    """The constant step delta of the mapping function, a Python float (spec §3.5).

    eta:     (eta(T) - eta(eps)) / 2^k     (default, paper's choice)
    t:       (T - eps) / 2^k
    logsnr:  (lambda(eps) - lambda(T)) / 2^k     (needs eps > 0)
    inv_eta: (1/eta(eps) - 1/eta(T)) / 2^k       (needs eps > 0)
    """
    return mapping_span(schedule=schedule, t_min=t_min, t_max=t_max, kind=kind) / 2.0 ** k


def mapping_span(*, schedule: str, t_min: float, t_max: float, kind: str = "eta") -> float:
    """The numerator of `mapping_delta` (delta = span / 2^k), a Python float."""
    f64 = lambda v: float(v)
    if kind == "eta":
        span = f64(interpolants.eta(t_max, schedule)) - f64(interpolants.eta(t_min, schedule))
    elif kind == "t":
        span = t_max - t_min
    elif kind in ("logsnr", "inv_eta"):
        if not t_min > 0:
            raise ValueError(f"mapping kind {kind!r} needs t_min > 0 (lambda and 1/eta are infinite at "
                             "t = 0); the paper's ablations used t_min = 0.001 (logsnr) and 0.005 (inv_eta).")
        if kind == "logsnr":
            span = (f64(interpolants.logsnr(t_min, schedule))
                    - f64(interpolants.logsnr(t_max, schedule)))
        else:
            span = 1.0 / f64(interpolants.eta(t_min, schedule)) - 1.0 / f64(interpolants.eta(t_max, schedule))
    else:
        raise ValueError(f"Unknown mapping kind {kind!r}; expected one of {MAPPINGS}.")
    return span


def _eta_step_gap(t, delta: float, schedule: str):
    """t - eta^{-1}(eta_t - delta) in closed form (exact for tiny gaps), and the base-case mask."""
    e = interpolants.eta(t, schedule)
    base = e < delta  # eta_t - delta < 0: no earlier time on the path, r falls back to s
    if schedule == "fm":
        gap = delta / ((1.0 + e) * (1.0 + e - delta))
    else:  # arctan(a) - arctan(b) = arctan((a - b) / (1 + a b))
        gap = jnp.arctan(delta / (1.0 + e * (e - delta))) / (0.5 * math.pi)
    return gap, base


def mapping_r(s, t, *, schedule: str, k: int, t_min: float, t_max: float, min_gap: float = 0.0,
              kind: str = "eta"):
    """r(s, t) = max(s, min(t - min_gap, r_kind(t))), with s <= r <= t (spec §3.5).

    Args:
      s, t: arrays of times, s <= t.
      k: the step is delta = span / 2^k (see `mapping_delta`); a Python int, or a traced float scalar
        (a k schedule over training, `IMMObjective.k_at`).
      t_min, t_max: the training time range (eps, T).
      min_gap: the fp16 variant's minimum t - r (1e-4 for the headline XL model).
      kind: "eta" (constant decrement in eta_t), "t", "logsnr" (in lambda_t), "inv_eta" (increment in 1/eta_t).
    Returns:
      r, same shape and dtype as t. Where the step leaves the path (eta_t < delta), r = s: the base case.
    """
    s = jnp.asarray(s)
    t = jnp.asarray(t)
    delta = mapping_span(schedule=schedule, t_min=t_min, t_max=t_max, kind=kind) / 2.0 ** k
    if kind == "eta":
        gap, base = _eta_step_gap(t, delta, schedule)
        r = t - gap
    elif kind == "t":
        r = t - delta
        base = r < 0
    elif kind == "logsnr":
        r = interpolants.t_from_logsnr(interpolants.logsnr(t, schedule) + delta, schedule)
        base = jnp.zeros(t.shape, bool)
    else:  # inv_eta
        r = interpolants.t_from_eta(1.0 / (1.0 / interpolants.eta(t, schedule) + delta), schedule)
        base = jnp.zeros(t.shape, bool)
    if min_gap > 0:
        r = jnp.minimum(r, t - min_gap)
    r = jnp.where(base | jnp.isnan(r), s, r)
    return jnp.clip(r, s, t)


def loss_weight(t, *, schedule: str, a: float, b: float):
    """w(t) = 1/2 sigmoid(b - lambda_t) (-d lambda/dt) alpha_t^a / (alpha_t^2 + sigma_t^2)  (spec §3.4).

    In closed forms that are finite at t = 0:
      fm:      t (1-t)^(a-1) / ((t^2 + e^-b (1-t)^2) ((1-t)^2 + t^2))
      cosine:  pi sigma alpha^(a-1) / (2 (sigma^2 + e^-b alpha^2))
    """
    t = jnp.asarray(t)
    eb = math.exp(-b)
    if schedule == "fm":
        u = 1.0 - t
        return t * u ** (a - 1.0) / ((t * t + eb * u * u) * (u * u + t * t))
    interpolants.check_schedule(schedule)
    al, sg = interpolants.alpha_sigma(t, schedule)
    return math.pi * sg * al ** (a - 1.0) / (2.0 * (sg * sg + eb * al * al))


@dataclasses.dataclass(frozen=True)
class IMMObjective:
    """Every setting of the IMM loss; build with `from_config(config.imm, num_classes=...)`.

    dropout_keys: "independent" draws separate network-dropout masks for the online and target passes
      (what a PyTorch module in train() mode does for two calls; our default), "shared" reuses the same key
      so both passes drop the same units (spec §11.6 leaves this open).
    fused: run online and target passes as one network call on the concatenated batch.
    k_end, k_ramp_steps: a schedule of k over training (coarse r(s, t) first, finer later, as consistency
      training's discretisation curriculum): k rises by one from `k` to `k_end` in equal stages over the first
      k_ramp_steps optimizer steps, then stays at k_end. k_end=None (default) keeps k constant.
    null_label: class id of the null token (= num_classes) used by label dropout; None if unconditional.
    """
    param: Parameterization = Parameterization()
    t_min: float = 0.006
    t_max: float = 0.994
    particles: int = 4
    k: int = 15
    min_gap: float = 0.0
    mapping: str = "eta"
    a: float = 1.0
    b: float = 5.0
    kernel: str = "laplace"
    label_dropout: float = 0.0
    null_label: Optional[int] = None
    dropout_keys: str = "independent"
    fused: bool = False
    k_end: Optional[int] = None
    k_ramp_steps: int = 0

    def __post_init__(self):
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"Need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}.")
        if self.param.schedule == "fm" and self.t_max >= 1.0 and self.mapping == "eta":
            raise ValueError("eta(1) is infinite under the fm schedule: use t_max < 1 (paper: 0.994).")
        if self.particles < 1:
            raise ValueError(f"particles (M) must be >= 1, got {self.particles}.")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"Unknown mapping {self.mapping!r}; expected one of {MAPPINGS}.")
        if self.kernel not in mmd.KERNELS:
            raise ValueError(f"Unknown kernel {self.kernel!r}; expected one of {mmd.KERNELS}.")
        if self.dropout_keys not in DROPOUT_KEYS:
            raise ValueError(f"Unknown dropout_keys {self.dropout_keys!r}; expected one of {DROPOUT_KEYS}.")
        if self.fused and self.dropout_keys == "shared":
            raise ValueError("fused=True runs both passes in one call, so dropout masks cannot be shared: "
                             "set dropout_keys='independent' or fused=False.")
        if self.label_dropout > 0 and self.null_label is None:
            raise ValueError("label_dropout > 0 needs a class-conditional model (num_classes > 0).")
        if self.k_end is not None and (self.k_end < self.k or self.k_ramp_steps < 1):
            raise ValueError(f"a k schedule needs k_end >= k and k_ramp_steps >= 1 (got k={self.k}, "
                             f"k_end={self.k_end}, k_ramp_steps={self.k_ramp_steps}); k_end=None keeps k fixed.")
        # Fails early with the config's own message if the mapping is ill-defined.
        mapping_delta(schedule=self.param.schedule, k=self.k, t_min=self.t_min, t_max=self.t_max,
                      kind=self.mapping)

    @classmethod
    def from_config(cls, imm: Any, num_classes: int = 0) -> "IMMObjective":
        """From the `imm` ConfigDict of configs/*.py; num_classes = config.model.num_classes."""
        param = Parameterization(f_type=imm.f_type, schedule=imm.schedule, sigma_d=float(imm.sigma_d),
                                 temb=imm.temb, time_scale=float(imm.time_scale))
        return cls(param=param, t_min=float(imm.t_min), t_max=float(imm.t_max),
                   particles=int(imm.particles), k=int(imm.k), min_gap=float(imm.min_gap),
                   mapping=imm.mapping, a=float(imm.a), b=float(imm.b), kernel=imm.kernel,
                   label_dropout=float(imm.label_dropout),
                   null_label=int(num_classes) if num_classes else None,
                   dropout_keys=imm.dropout_keys, fused=bool(imm.fused),
                   k_end=None if imm.get("k_end", None) is None else int(imm.k_end),
                   k_ramp_steps=int(imm.get("k_ramp_steps", 0) or 0))

    def k_at(self, step=None):
        """k at optimizer step `step` (a traced int or None): self.k without a schedule (a Python int), else
        k + floor(stage) as a float32 scalar, stages of k_ramp_steps / (k_end - k + 1) steps each."""
        if self.k_end is None or step is None:
            return self.k
        stages = self.k_end - self.k + 1
        stage = jnp.floor(jnp.asarray(step, jnp.float32) * stages / self.k_ramp_steps)
        return self.k + jnp.clip(stage, 0.0, stages - 1.0)

    def r(self, s, t, step=None):
        return mapping_r(s, t, schedule=self.param.schedule, k=self.k_at(step), t_min=self.t_min,
                         t_max=self.t_max, min_gap=self.min_gap, kind=self.mapping)

    def weight(self, t):
        return loss_weight(t, schedule=self.param.schedule, a=self.a, b=self.b)

    def kernel_weight(self, s, t):
        """w~(s,t) = 1 / |c_out(s,t)| of f_{s,t} (spec §3.3)."""
        return 1.0 / jnp.maximum(jnp.abs(self.param.c_out(s, t)), 1e-12)


def sample_times(key, num_groups: int, objective: IMMObjective, step=None):
    """(s, r, t), each (G,) float32: t ~ U(t_min, t_max), s ~ U(t_min, t), r = r(s, t) (at `step` if k is
    scheduled)."""
    k_t, k_s = jax.random.split(key)
    lo, hi = objective.t_min, objective.t_max
    t = jax.random.uniform(k_t, (num_groups,), jnp.float32, lo, hi)
    s = lo + jax.random.uniform(k_s, (num_groups,), jnp.float32) * (t - lo)
    return s, objective.r(s, t, step), t


def network_fn(net, params, *, train: bool, dropout_key=None, augment_labels=None):
    """Close a Linen network over its params: (x_in, t_in, s_in, labels) -> G. `augment_labels` (B, A), if
    given, is passed to the network as its augmentation conditioning."""
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}

    def fn(x_in, t_in, s_in, labels):
        rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None
        return net.apply({"params": params}, x_in, t_in, s_in, labels=labels, train=train, rngs=rngs, **extra)
    return fn


def drop_labels(key, labels, p: float, null_label: Optional[int]):
    """Replace each label by the null class with probability p (one draw per sample)."""
    if labels is None or p <= 0:
        return labels
    drop = jax.random.bernoulli(key, p, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def _time_bin_metrics(per_group, t, objective: IMMObjective):
    edges = jnp.linspace(objective.t_min, objective.t_max, NUM_TIME_BINS + 1)
    idx = jnp.clip(jnp.searchsorted(edges, t, side="right") - 1, 0, NUM_TIME_BINS - 1)
    onehot = jax.nn.one_hot(idx, NUM_TIME_BINS, dtype=jnp.float32)
    sums = onehot.T @ per_group
    counts = jnp.sum(onehot, axis=0)
    means = sums / jnp.maximum(counts, 1.0)  # an empty bin reports 0
    return {f"loss_t{i}": means[i] for i in range(NUM_TIME_BINS)}


def imm_loss(net, params, x, labels, key, *, objective: IMMObjective, train: bool = True, step=None,
             augment_labels=None):
    """The IMM loss on one batch (spec §3.6).

    Args:
      net: Linen module with net.apply({"params": p}, x, t_in, s_in, labels=, train=, rngs=) -> G.
      params: its parameters (the target pass uses them under stop-gradient).
      x: (B, H, W, C) float data in model space; B divisible by objective.particles.
      labels: (B,) int32 class ids, or None for unconditional models.
      key: PRNG key for this step.
      step: the optimizer step (traced int), used only by a k schedule (objective.k_end).
      augment_labels: (B, A) float32 augmentation labels of x (both passes see them), or None.
    Returns:
      (loss, metrics): loss a float32 scalar; metrics a dict of float32 scalars (loss, mean w(t),
      mean kernel values k_tt / k_rr / k_tr, per-time-bin weighted loss loss_t0..loss_t3 (bins of equal width over [t_min, t_max]; 0 when empty),
      mean t - r, fraction of groups in the base case r = s).
    """
    batch = x.shape[0]
    m = objective.particles
    if batch % m:
        raise ValueError(f"batch size {batch} is not divisible by the number of particles M={m}.")
    g = batch // m
    k_time, k_eps, k_label, k_drop_a, k_drop_b = jax.random.split(key, 5)
    s, r, t = sample_times(k_time, g, objective, step)
    rep = lambda v: jnp.repeat(v, m)
    ss, rr, tt = rep(s), rep(r), rep(t)

    x = x.astype(jnp.float32)
    eps = interpolants.prior_noise(k_eps, x.shape, objective.param.sigma_d)
    x_t = interpolants.add_noise(x, eps, tt, objective.param.schedule)
    x_r = interpolants.add_noise(x, eps, rr, objective.param.schedule)  # == DDIM(x_t, x, r, t)
    labels = drop_labels(k_label, labels, objective.label_dropout, objective.null_label)

    param = objective.param
    if objective.fused:
        both = lambda a, b: jnp.concatenate([a, b], axis=0)
        aug2 = None if augment_labels is None else both(augment_labels, augment_labels)
        fn = network_fn(net, params, train=train, dropout_key=k_drop_a, augment_labels=aug2)
        lab2 = None if labels is None else both(labels, labels)
        y = param.apply(fn, both(x_t, x_r), both(ss, ss), both(tt, rr), lab2)
        y_t, y_r = y[:batch], jax.lax.stop_gradient(y[batch:])
    else:
        k_b = k_drop_a if objective.dropout_keys == "shared" else k_drop_b
        y_t = param.apply(network_fn(net, params, train=train, dropout_key=k_drop_a, augment_labels=augment_labels),
                          x_t, ss, tt, labels)
        target_fn = network_fn(net, jax.lax.stop_gradient(params), train=train, dropout_key=k_b,
                               augment_labels=augment_labels)
        y_r = jax.lax.stop_gradient(param.apply(target_fn, x_r, ss, rr, labels))

    grouped = lambda y: y.reshape((g, m) + y.shape[1:])
    k_tt, k_rr, k_tr = mmd.grouped_mmd_terms(grouped(y_t), grouped(y_r),
                                             kernel_weight=objective.kernel_weight(s, t),
                                             kernel=objective.kernel)
    w = objective.weight(t)
    per_group = w * (k_tt + k_rr - 2.0 * k_tr)
    loss = jnp.mean(per_group)
    metrics = {
        "loss": loss,
        "weight": jnp.mean(w),
        "k_tt": jnp.mean(k_tt),
        "k_rr": jnp.mean(k_rr),
        "k_tr": jnp.mean(k_tr),
        "gap_t_r": jnp.mean(t - r),
        "base_case_frac": jnp.mean((r <= s).astype(jnp.float32)),
        "k": jnp.asarray(objective.k_at(step), jnp.float32),
        **_time_bin_metrics(per_group, t, objective),
    }
    return loss, metrics


def fm_loss(net, params, x, labels, key, *, objective: IMMObjective, train: bool = True, step=None,
            augment_labels=None):
    """Flow-matching baseline on the same networks and data (conditional OT-FM, "objective = fm").

    t ~ U(t_min, t_max) per sample, x_t = (1 - t) x + t eps with eps ~ N(0, sigma_d^2 I), and
    loss = mean ||v(x_t, t) - (eps - x)||^2 / sigma_d^2 with v from `Parameterization.velocity`
    (the network's second time input is c_noise(s = t)). Label dropout as in `imm_loss`.
    Returns (loss, metrics) like `imm_loss`; metrics holds loss and per-time-bin loss (step is unused).
    augment_labels: as in `imm_loss`.
    """
    param = objective.param
    k_time, k_eps, k_label, k_drop = jax.random.split(key, 4)
    t = jax.random.uniform(k_time, (x.shape[0],), jnp.float32, objective.t_min, objective.t_max)
    x = x.astype(jnp.float32)
    eps = interpolants.prior_noise(k_eps, x.shape, param.sigma_d)
    x_t = interpolants.add_noise(x, eps, t, param.schedule)
    labels = drop_labels(k_label, labels, objective.label_dropout, objective.null_label)
    v = param.velocity(network_fn(net, params, train=train, dropout_key=k_drop, augment_labels=augment_labels),
                       x_t, t, labels)
    per_sample = jnp.mean(jnp.square(v - (eps - x)).reshape(x.shape[0], -1), axis=1) / param.sigma_d ** 2
    loss = jnp.mean(per_sample)
    return loss, {"loss": loss, **_time_bin_metrics(per_sample, t, objective)}


# config.imm.objective -> loss function (same signature and metrics layout)
OBJECTIVES = {"imm": imm_loss, "fm": fm_loss}


def objective_name(config) -> str:
    """config.imm.objective: "imm" (default) or "fm" (the flow-matching baseline on the same network)."""
    return str(config.imm.get("objective", "imm"))
