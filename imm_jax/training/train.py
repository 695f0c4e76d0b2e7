"""Training: `train_and_evaluate(config, workdir)`: mesh -> data -> state -> jitted step -> loop.

The step is one `jax.jit` over a Mesh("data", "fsdp") with donated state, compiled once (a retrace raises).
Per-step randomness is `fold_in(state.rng, step)`, the data pipeline is a pure function of the step, and all
state lives in the checkpoint, so a resumed run reproduces the uninterrupted one bit for bit (CPU).

Outputs in `workdir`: config.json (resolved config), metrics.jsonl, events.out.tfevents.* (TensorBoard
scalars, through tensorboardX), samples/*.png (1/2/4-step grids from fixed noise), checkpoints/.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imm_jax import errors
from imm_jax.inference import api
from imm_jax.io import images
from imm_jax.training import checkpointing
from imm_jax.training import config_validation
from imm_jax.training import input_pipeline
from imm_jax.training import optim
from imm_jax.training import sharding as sharding_lib
from imm_jax.training import train_state as ts


# ----------------------------------------------------------------------------- model and loss

def build_network(config, devices=None, backend: str | None = None):
    """The Linen network for config.model (networks contract: apply(x, t_in, s_in, labels, train=...)), its
    layers on `backend`, or the execution path of `devices` (default jax.devices(); `networks.build`)."""
    from imm_jax import networks
    return networks.build(config.model, backend=backend, devices=devices)


def build_objective(config):
    from imm_jax.core import losses
    return losses.IMMObjective.from_config(config.imm, num_classes=int(config.model.num_classes))


# fold_in stream of the step key for the augmentation draws (the loss's own key is left as it was).
AUGMENT_STREAM = 0x6175


def make_loss_fn(config, net, objective) -> Callable:
    """loss_fn(params, batch, key, step=None) -> (scalar loss, metrics dict); batch = dict(image, label).

    With config.data.augment_p > 0 the images first go through EDM's augmentation (imm_jax.training.augment,
    drawn from fold_in(key, AUGMENT_STREAM)) and the network is conditioned on the augmentation labels."""
    from imm_jax.core import losses
    from imm_jax.training import augment
    conditional = int(config.model.num_classes) > 0
    pipe = augment.AugmentPipe.from_config(config.data)

    loss = losses.OBJECTIVES[losses.objective_name(config)]

    def loss_fn(params, batch, key, step=None):
        labels = batch["label"] if conditional else None
        images, aug = batch["image"], None
        if pipe.active:
            images, aug = augment.augment(pipe, images, jax.random.fold_in(key, AUGMENT_STREAM))
        return loss(net, params, images, labels, key, objective=objective, train=True, step=step,
                    augment_labels=aug)
    return loss_fn


def init_params(net, config, key):
    """Network parameters for a (1, H, W, C) input."""
    m = config.model
    x = jnp.zeros((1, int(m.image_size), int(m.image_size), int(m.in_channels)), jnp.float32)
    t = jnp.full((1,), 0.5, jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if int(m.num_classes) > 0 else None
    k1, k2 = jax.random.split(key)
    return net.init({"params": k1, "dropout": k2}, x, t, t, labels, train=False)["params"]


# ----------------------------------------------------------------------------- step

class RetraceError(RuntimeError):
    """The train step was traced a second time.

    Counted per step function here: chex.assert_max_traces keys its counter on the function's source text, so
    a second Trainer in the same process (tests, tuning after training) would count as a retrace.
    """


def make_train_step(loss_fn, tx, schedule, ema_decays: Sequence[float]):
    """(state, batch) -> (state, metrics). Raises RetraceError if traced more than once."""
    traces = [0]
    decays = tuple(float(d) for d in ema_decays)

    def step_fn(state: ts.TrainState, batch):
        traces[0] += 1
        if traces[0] > 1:
            raise RetraceError("The train step is being traced a second time (shapes, dtypes or shardings of the "
                               "state or batch changed); this would recompile every step.")
        key = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, state.step)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema=ts.ema_update(state.ema, params, decays))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in dict(aux).items()}
        metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                       lr=jnp.asarray(schedule(state.step), jnp.float32))
        return new_state, metrics

    step_fn.traces = traces
    return step_fn


class Trainer:
    """Everything built from a config: mesh, network, loss, optimizer, sharded state init and jitted step."""

    def __init__(self, config, mesh=None, backend: str | None = None):
        """backend: the network layers' execution path (`networks.build`); None: the one of the mesh's devices.
        A step exported for another platform needs `networks.layers.backend_for_export(platforms)`."""
        self.config = config
        self.mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
        self.net = build_network(config, devices=list(self.mesh.devices.flat), backend=backend)
        self.objective = build_objective(config)
        self.loss_fn = make_loss_fn(config, self.net, self.objective)
        self.tx, self.schedule = optim.make_optimizer(config.optim)
        self.ema_decays = tuple(float(d) for d in config.train.ema_decays)
        net, tx, decays = self.net, self.tx, self.ema_decays

        def init_state(seed):
            key = jax.random.PRNGKey(seed)
            k_params, k_train = jax.random.split(key)
            return ts.create(init_params(net, config, k_params), tx, decays, k_train)

        self._init_state = init_state
        self.abstract_state = jax.eval_shape(init_state, 0)
        self.state_shardings = sharding_lib.state_shardings(self.abstract_state, self.mesh,
                                                            config.mesh.get("fsdp_min_size", None))
        self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
        self.step_fn = make_train_step(self.loss_fn, tx, self.schedule, decays)
        self.train_step = jax.jit(
            self.step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)), donate_argnums=(0,))

    def init(self) -> ts.TrainState:
        """Parameters created directly with their shardings (never materialised whole on one device)."""
        return jax.jit(self._init_state, static_argnums=0, out_shardings=self.state_shardings)(int(self.config.seed))

    def abstract_checkpoint_items(self):
        """(abstract state item, abstract EMA item) with shardings, for orbax restore."""
        with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               self.abstract_state, self.state_shardings)
        return with_sh.split_for_checkpoint()


# ----------------------------------------------------------------------------- metric writers

class MetricWriter:
    """JSON lines + TensorBoard on process 0; no-op elsewhere.

    resume_step: the checkpoint step a resumed run continues from. Rows of later steps (logged before the
    interruption, then trained again) are dropped from metrics.jsonl, and TensorBoard is told to purge them
    (purge_step), so each step appears once.
    """

    def __init__(self, workdir: str, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        if enabled:
            path = os.path.join(workdir, "metrics.jsonl")
            if resume_step is not None and os.path.isfile(path):
                with open(path) as f:
                    lines = f.readlines()
                # a line torn by a kill does not parse and is dropped too (appending to it would corrupt the next)
                keep = [ln for ln in lines
                        if ln.endswith("\n") and (st := _jsonl_step(ln)) is not None and st <= resume_step]
                if len(keep) != len(lines):
                    with open(path + ".tmp", "w") as f:
                        f.writelines(keep)
                    os.replace(path + ".tmp", path)
            self._jsonl = open(path, "a")
            import tensorboardX  # ~1 s of protobuf imports, needed on process 0 only

            self._tb = tensorboardX.SummaryWriter(
                logdir=workdir, filename_suffix=".imm_jax",
                purge_step=None if resume_step is None else int(resume_step) + 1)

    def write(self, step: int, metrics: dict[str, float]):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _jsonl_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- loop

class _Preemption:
    """Sets a flag on SIGTERM (main thread only); the loop checkpoints and exits cleanly."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after the current step, then exiting.")
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclasses.dataclass(frozen=True)
class LoopSchedule:
    """When the loop logs, checkpoints, writes sample grids and evaluates FID: every `*_every` steps (0 = never
    for sample/eval), at the last step, and when the run stops early. A run stopped by its time budget also
    writes its final grids and FID (a preempted one only checkpoints, to exit quickly)."""
    num_steps: int
    log_every: int
    ckpt_every: int
    sample_every: int = 0
    eval_every: int = 0

    @classmethod
    def from_config(cls, config) -> "LoopSchedule":
        t = config.train
        return cls(num_steps=int(t.num_steps), log_every=int(t.log_every), ckpt_every=int(t.ckpt_every),
                   sample_every=int(t.get("sample_every", 0) or 0),
                   eval_every=int(config.get("eval", {}).get("every", 0) or 0))

    def due(self, step: int, *, stopping: bool = False, out_of_time: bool = False) -> frozenset:
        """The actions due after `step` updates, a subset of {"log", "checkpoint", "sample", "evaluate"}."""
        last = step == self.num_steps
        final = last or out_of_time
        actions = set()
        if step % self.log_every == 0 or last or stopping:
            actions.add("log")
        if step % self.ckpt_every == 0 or last or stopping:
            actions.add("checkpoint")
        if self.sample_every and (step % self.sample_every == 0 or final):
            actions.add("sample")
        if self.eval_every and (step % self.eval_every == 0 or final):
            actions.add("evaluate")
        return frozenset(actions)


class _MetricBuffer:
    """Per-step metrics left on device until the next flush (no host sync every step); a flush fetches them,
    stops the run on a NaN/Inf loss or gradient naming the step window, and writes the last one (every one
    with every_step)."""

    def __init__(self, writer, ckpt, *, every_step: bool, last_good: int):
        self.writer, self.ckpt, self.every_step = writer, ckpt, every_step
        self.pending: list[tuple[int, dict]] = []
        self.last_checked = last_good
        self.last: dict[str, float] = {}

    def add(self, step: int, metrics: dict):
        self.pending.append((step, metrics))

    def flush(self, current_step: int):
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        for s, m in zip(steps, fetched):
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                good = self.ckpt.all_steps()
                raise FloatingPointError(
                    f"Non-finite loss or gradient (loss={m['loss']}, grad_norm={m['grad_norm']}) at step {s} "
                    f"(first bad step in window ({self.last_checked}, {current_step}]). Nothing after step "
                    f"{self.last_checked} was checkpointed; last good checkpoint: "
                    f"{(self.ckpt.directory + '/' + str(good[-1])) if good else 'none'}. Lower config.optim.lr, "
                    "set config.optim.grad_clip, or check the data.")
        self.last_checked = current_step
        for s, m in (zip(steps, fetched) if self.every_step else [(steps[-1], fetched[-1])]):
            self.writer.write(s, m)
        self.last = {k: float(v) for k, v in fetched[-1].items()}


def write_config(config, workdir: str):
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str, *, hooks: Sequence[Callable] = (), mesh=None,
                       fid_extractor=None) -> dict[str, Any]:
    """Trains per `config`, resuming from the latest checkpoint in `workdir/checkpoints` if there is one.

    hooks: callables hook(step, state, metrics) run after every step (step = updates done so far).
    fid_extractor: feature extractor for FID during training (config.eval.every > 0); default Inception.
    Returns a summary dict: final_step, preempted, last_metrics.
    """
    is_host0 = jax.process_index() == 0
    config_validation.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    if is_host0:
        write_config(config, workdir)

    trainer = Trainer(config, mesh=mesh)
    pipeline = input_pipeline.Pipeline(config, trainer.mesh)
    tcfg = config.train
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=int(tcfg.keep_checkpoints),
                                      async_save=bool(tcfg.get("async_checkpoints", True)))
    abstract_main, abstract_ema = trainer.abstract_checkpoint_items()
    restored = ckpt.restore(abstract_main, abstract_ema)
    if restored is None:
        state = trainer.init()
        start = 0
    else:
        start, main_item, ema_item, data_pos = restored
        state = ts.TrainState.join_from_checkpoint(main_item, ema_item)
        if int(data_pos.get("step", start)) != start or int(data_pos.get("batch_size", pipeline.batch_size)) != pipeline.batch_size:
            raise errors.UserError(f"Checkpoint step {start} has data position {data_pos}, which does not match this run "
                             f"(batch_size={pipeline.batch_size}); resume with the config the run was started with.")
        logging.info("Resumed from checkpoint at step %d.", start)
        if is_host0:
            print(f"Resumed from {ckpt.directory}/{start}", flush=True)

    schedule = LoopSchedule.from_config(config)
    num_steps, log_every = schedule.num_steps, schedule.log_every
    writer = MetricWriter(workdir, is_host0, resume_step=None if restored is None else start)
    # One Sampler for the grids and the in-training FID, over the trainer's mesh (every process calls it: the
    # program is global); latent models decode through the VAE at config.vae.path, without it they get no grids.
    latent = config.data.source == "latents"
    vae_path = str(config.get("vae", {}).get("path", "") or "")
    sampler = api.Sampler(config, mesh=trainer.mesh, vae_path=vae_path or None)
    fid_monitor = None
    if schedule.eval_every:
        from imm_jax.evaluation import in_training
        fid_monitor = in_training.TrainingFID(config, workdir, sampler, extractor=fid_extractor, is_host0=is_host0)
    grids = bool(schedule.sample_every) and (not latent or bool(vae_path))
    if schedule.sample_every and not grids and is_host0:
        print("No sample grids: a latent model needs config.vae.path (a local diffusers SD-VAE directory) to "
              "decode them.", flush=True)
    grid_n = int(config.sample.get("grid_size", 64))
    grid_labels = np.arange(grid_n, dtype=np.int32) % sampler.num_classes if sampler.num_classes else None
    sample_ema_index = _sample_ema_index(config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    if is_host0:
        print(f"imm_jax: {config.model.name} with {n_params / 1e6:.2f}M params | mesh {dict(trainer.mesh.shape)} | "
              f"{jax.device_count()} devices ({jax.devices()[0].platform}), {jax.process_count()} process(es) | "
              f"batch {pipeline.batch_size} | steps {start} -> {num_steps}", flush=True)

    metrics_buffer = _MetricBuffer(writer, ckpt, every_step=log_every == 1, last_good=start)
    flush = metrics_buffer.flush
    timer = {"t0": None, "s0": None}
    preempted = False

    def progress(step: int):
        now = time.time()
        if timer["t0"] is None or step <= timer["s0"]:
            ips, eta = float("nan"), float("nan")
        else:
            rate = (step - timer["s0"]) / (now - timer["t0"])
            ips, eta = rate * pipeline.batch_size, (num_steps - step) / rate
            if budget_s:
                eta = min(eta, max(0.0, budget_s - (now - t_start)))
        m = metrics_buffer.last
        if is_host0:
            print(f"step {step}/{num_steps} | loss {m.get('loss', float('nan')):.5f} | grad_norm "
                  f"{m.get('grad_norm', float('nan')):.4f} | lr {m.get('lr', float('nan')):.3g} | "
                  f"{ips:.1f} img/s | ETA {_fmt_time(eta)}", flush=True)

    def save(step: int, st):
        flush(step)
        main_item, ema_item = st.split_for_checkpoint()
        ckpt.save(step, main_item, ema_item, config, input_pipeline.data_position(pipeline, step))

    def sample(step: int, st):
        if not grids:
            return
        ema = st.ema[sample_ema_index]
        for n_steps in config.sample.steps:
            imgs = sampler(grid_n, steps=int(n_steps), labels=grid_labels, seed=int(config.sample.get("seed", 42)),
                           batch_size=grid_n, params=ema)
            if is_host0:
                images.save_png(os.path.join(workdir, "samples", f"step{step:08d}_{int(n_steps)}step.png"),
                                images.make_grid(imgs, int(math.ceil(math.sqrt(grid_n)))))

    def evaluate(step: int, st):
        flush(step)
        t0 = time.time()
        if is_host0:
            print(f"step {step} | FID of {fid_monitor.num_samples} samples at "
                  f"{', '.join(map(str, fid_monitor.steps))} step(s)...", flush=True)
        fids = fid_monitor(st.ema[sample_ema_index])
        if timer["t0"] is not None:
            timer["t0"] += time.time() - t0  # img/s and ETA count training time only
        if is_host0:
            writer.write(step, fids)
            print(f"step {step} | " + " | ".join(f"{k} {v:.2f}" for k, v in fids.items())
                  + f" ({fid_monitor.num_samples} samples, {time.time() - t0:.0f} s)", flush=True)

    step = start
    budget_s = 60.0 * float(tcfg.get("max_train_minutes", 0) or 0)
    t_start = time.time()
    out_of_time = False
    try:
        with _Preemption() as preempt:
            if start < num_steps:
                batches = pipeline.iterate(start, prefetch=int(config.data.get("prefetch", 2)))
                for data_step, batch in batches:
                    assert data_step == step
                    state, metrics = trainer.train_step(state, batch)
                    step += 1
                    metrics_buffer.add(step, metrics)
                    for h in hooks:
                        h(step, state, metrics)
                    if step == start + 1:
                        jax.block_until_ready(metrics)
                        timer["t0"], timer["s0"] = time.time(), step  # rate excludes compilation
                    stop_now = preempt.flag or _any_host_preempted(ckpt, step)
                    if budget_s and step % log_every == 0 and not stop_now:
                        out_of_time = _all_hosts_agree(time.time() - t_start > budget_s)
                        if out_of_time:
                            stop_now = True
                            if is_host0:
                                print(f"Time budget of {budget_s / 60:.1f} min reached "
                                      "(config.train.max_train_minutes).", flush=True)
                    due = schedule.due(step, stopping=stop_now, out_of_time=out_of_time)
                    if "log" in due:
                        flush(step)
                        progress(step)
                    if "checkpoint" in due:
                        save(step, state)
                    if "sample" in due:
                        flush(step)
                        sample(step, state)
                    if "evaluate" in due:
                        evaluate(step, state)
                    if stop_now:
                        preempted = preempt.flag or not out_of_time
                        break
                    if step >= num_steps:
                        break
                batches.close()
            flush(step)
    finally:
        ckpt.close()
        writer.close()
    if is_host0:
        print(("Preempted: checkpoint written at step %d" if preempted else "Done at step %d") % step, flush=True)
    return {"final_step": step, "preempted": preempted, "out_of_time": out_of_time,
            "last_metrics": metrics_buffer.last, "state": state}


def _any_host_preempted(ckpt: checkpointing.Checkpointer, step: int) -> bool:
    if jax.process_count() == 1:
        return False
    try:
        return bool(ckpt.manager.reached_preemption(step))
    except Exception:  # noqa: BLE001 - preemption service not available
        return False


def _all_hosts_agree(flag: bool) -> bool:
    """Process 0's decision, so that every host stops at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _sample_ema_index(config) -> int:
    decays = [float(d) for d in config.train.ema_decays]
    want = config.train.get("sample_ema", None)
    if want is None:
        return int(np.argmin(decays))  # the fastest EMA: meaningful early in training
    if float(want) not in decays:
        raise config_validation.ConfigError(
            f"config.train.sample_ema={want} is not one of config.train.ema_decays={tuple(decays)}.")
    return decays.index(float(want))
