"""End to end on the tiny config with 8 fake CPU devices: resume is bit-exact, sharded == single device,
one compilation, SIGTERM checkpoints, NaN guard, EMA/optimizer pieces, metric files."""
import json
import os
import signal
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imm_jax.training import checkpointing, input_pipeline, optim, sharding, train, train_state
from test_config import load


def tiny(**train_overrides):
    c = load("tiny")
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


def losses_by_step(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def run_killed_and_resumed(make_config, tmp_path):
    """Trains make_config() to the end in tmp_path/a, and in tmp_path/b killed at step 5 then resumed (the
    checkpoint is at step 3). Returns (full result, resumed result, losses by step of a, of b)."""
    full = train.train_and_evaluate(make_config(), str(tmp_path / "a"))

    class Killed(Exception):
        pass

    def kill_at_5(step, state, metrics):
        if step == 5:
            raise Killed()

    with pytest.raises(Killed):
        train.train_and_evaluate(make_config(), str(tmp_path / "b"), hooks=[kill_at_5])
    assert checkpointing.Checkpointer(str(tmp_path / "b" / "checkpoints")).all_steps() == [3]
    resumed = train.train_and_evaluate(make_config(), str(tmp_path / "b"))
    return full, resumed, losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")


def test_train_kill_resume_is_bit_exact(tmp_path):
    full, resumed, ref, got = run_killed_and_resumed(tiny, tmp_path)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(ref.values())))
    assert resumed["final_step"] == 6
    for s in range(1, 7):
        assert got[s] == ref[s], (s, got[s], ref[s])  # bit-for-bit, including steps 4-6 after the resume
    for x, y in zip(leaves(full["state"]), leaves(resumed["state"])):
        np.testing.assert_array_equal(x, y)
    # outputs: resolved config, TensorBoard events
    with open(tmp_path / "a" / "config.json") as f:
        assert json.load(f)["imm"]["particles"] == 4
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "a"))
    # metrics.jsonl holds each step once after the resume (steps 4-5 of the killed run were dropped), and the
    # resumed run's TensorBoard file starts by purging what the killed run logged after its checkpoint
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
    from tensorboardX.proto import event_pb2
    purges = []
    for name in os.listdir(tmp_path / "b"):
        if name.startswith("events.out.tfevents"):
            data, off = open(tmp_path / "b" / name, "rb").read(), 0
            while off < len(data):
                (n,) = struct.unpack("<Q", data[off:off + 8])
                ev = event_pb2.Event.FromString(data[off + 12:off + 12 + n])
                if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                    purges.append(ev.step)
                off += 16 + n
    assert purges == [4]


def _two_steps(config, mesh):
    tr = train.Trainer(config, mesh=mesh)
    state = tr.init()
    pipe = input_pipeline.Pipeline(config, tr.mesh)
    out = []
    for step in range(2):
        state, m = tr.train_step(state, pipe.global_batch(step))
        out.append(jax.device_get(m))
    return state, out


@pytest.fixture(scope="module")
def single_device_steps():
    """Two steps of the tiny config on one device: the reference of the sharded and FSDP steps."""
    c = tiny()
    return _two_steps(c, sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))


def test_sharded_step_matches_single_device(single_device_steps):
    c = tiny()
    st8, m8 = _two_steps(c, sharding.make_mesh(c.mesh))
    st1, m1 = single_device_steps
    for a, b in zip(m8, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    for x, y in zip(leaves(st8.params), leaves(st1.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # the 8-device state really is laid out on 8 devices
    assert len(jax.tree.leaves(st8.params)[0].sharding.device_set) == 8


def test_fsdp_step_matches_single_device(single_device_steps):
    c = tiny()
    c.mesh.fsdp = 2
    c.mesh.fsdp_min_size = 256  # shard the tiny model's larger matrices over "fsdp"
    st, m = _two_steps(c, sharding.make_mesh(c.mesh))
    sharded = [x for x in jax.tree.leaves(st.params) if not x.sharding.is_fully_replicated]
    assert sharded, "expected some parameters sharded over fsdp"
    # optimizer moments follow their parameters' layout
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(st.opt_state))
    st1, m1 = single_device_steps
    for a, b in zip(m, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
    for x, y in zip(leaves(st.params), leaves(st1.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_retrace_is_refused():
    c = tiny()
    tr = train.Trainer(c)
    state = tr.init()
    batch = input_pipeline.Pipeline(c, tr.mesh).global_batch(0)
    state, _ = tr.train_step(state, batch)
    state, _ = tr.train_step(state, batch)  # same shapes: no retrace
    smaller = {k: v[:16] for k, v in batch.items()}
    with pytest.raises(train.RetraceError):
        tr.train_step(state, smaller)


def test_sigterm_writes_checkpoint_and_stops(tmp_path):
    def term_at_2(step, state, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    c = tiny(num_steps=50, ckpt_every=100)
    before = signal.getsignal(signal.SIGTERM)
    out = train.train_and_evaluate(c, str(tmp_path), hooks=[term_at_2])
    assert out["preempted"] and out["final_step"] == 2
    assert checkpointing.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is not left behind


def test_time_budget_stops_with_checkpoint(tmp_path):
    c = tiny(num_steps=50, ckpt_every=100, log_every=2)
    c.train.max_train_minutes = 1e-9
    out = train.train_and_evaluate(c, str(tmp_path))
    assert out["out_of_time"] and not out["preempted"] and out["final_step"] == 2
    assert checkpointing.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]


def test_nan_guard_names_window_and_keeps_good_checkpoint(tmp_path, monkeypatch):
    orig = input_pipeline.Pipeline.local_batch

    def poisoned(self, step):
        b = orig(self, step)
        if step == 4:  # data for update 5
            b["image"] = b["image"] * np.nan
        return b

    monkeypatch.setattr(input_pipeline.Pipeline, "local_batch", poisoned)
    c = tiny(num_steps=8, log_every=2, ckpt_every=3)
    with pytest.raises(FloatingPointError) as e:
        train.train_and_evaluate(c, str(tmp_path))
    msg = str(e.value)
    assert "at step 5" in msg and "(4, 6]" in msg and "checkpoints/3" in msg
    ck = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    assert ck.all_steps() == [3]
    _, ema = checkpointing.restore_for_sampling(str(tmp_path))
    assert all(np.all(np.isfinite(x)) for x in leaves(ema))


def test_invalid_config_is_rejected_before_work(tmp_path):
    c = tiny()
    c.data.batch_size = 30
    with pytest.raises(ValueError, match="particles"):
        train.train_and_evaluate(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_ema_update_matches_numpy():
    p = {"w": jnp.array([1.0, 2.0])}
    e = ({"w": jnp.array([0.0, 0.0])}, {"w": jnp.array([4.0, 4.0])})
    out = train_state.ema_update(e, p, (0.9, 0.5))
    np.testing.assert_allclose(out[0]["w"], 0.9 * np.zeros(2) + 0.1 * np.array([1.0, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(out[1]["w"], 0.5 * np.array([4.0, 4.0]) + 0.5 * np.array([1.0, 2.0]), rtol=1e-6)


def _adam_family_numpy(name, grads, p0, lr, b1, b2, eps, wd):
    """Parameter trajectory of AdamW (decoupled decay, Loshchilov & Hutter) or RAdam (Liu et al.; L2 decay added
    to the gradient and the rectification switched on once rho_t > 5, as torch.optim.RAdam), float64."""
    p, m, v = p0.astype(np.float64), 0.0, 0.0
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64) + (wd * p if name == "radam" else 0.0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        if name == "adamw":
            p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
        else:
            rho = rho_inf - 2.0 * t * b2 ** t / (1.0 - b2 ** t)
            if rho > 5.0:
                r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
                p = p - lr * r * m_hat / (np.sqrt(v_hat) + eps)
            else:
                p = p - lr * m_hat
        out.append(p)
    return out


@pytest.mark.parametrize("name", ["adamw", "radam"])
def test_optimizers_match_numpy_references(name):
    # 12 steps: RAdam's un-rectified first steps (rho_t <= 5 until step 6 with b2 = 0.999), then rectified ones.
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=5).astype(np.float32) for _ in range(12)]
    p0 = rng.normal(size=5).astype(np.float32)
    cfg = dict(name=name, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, warmup_steps=0, grad_clip=0.0)
    tx, _ = optim.make_optimizer(ml_collections.ConfigDict(cfg))
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    ref = _adam_family_numpy(name, grads, p0, cfg["lr"], cfg["b1"], cfg["b2"], cfg["eps"], cfg["weight_decay"])
    for g, want in zip(grads, ref):
        u, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=2e-5, atol=1e-6)


def test_optimizers_warmup_and_clipping():
    base = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=4, grad_clip=0.0)
    _, sched = optim.make_optimizer(ml_collections.ConfigDict(dict(base, name="adam")))
    np.testing.assert_allclose([float(sched(i)) for i in (0, 2, 4, 10)], [0.0, 5e-3, 1e-2, 1e-2], rtol=1e-6)
    params = {"w": jnp.ones(3)}
    g = {"w": jnp.array([30.0, 40.0, 0.0])}
    for name in ("radam", "adamw", "adam"):
        tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(base, name=name, warmup_steps=0)))
        u, _ = tx.update(g, tx.init(params), params)
        assert np.all(np.isfinite(np.asarray(u["w"])))
    # adam's first step moves every coordinate with a nonzero gradient by lr
    tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(base, name="adam", warmup_steps=0)))
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"])[:2], [-1e-2, -1e-2], rtol=1e-4)
    # clipping: the update equals the update for the clipped gradient
    tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(base, name="adamw", warmup_steps=0, grad_clip=1.0)))
    u1, _ = tx.update(g, tx.init(params), params)
    tx2 = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    u2, _ = tx2.update({"w": g["w"] / 50.0}, tx2.init(params), params)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-5)
    with pytest.raises(ValueError, match="not known"):
        optim.make_optimizer(ml_collections.ConfigDict(dict(base, name="sgd")))


def test_metric_writer_tensorboard_events(tmp_path):
    """metrics.jsonl and a TensorBoard event file with the same scalars (records parsed independently)."""
    from tensorboardX.proto import event_pb2

    w = train.MetricWriter(str(tmp_path), enabled=True)
    w.write(7, {"loss": 0.25, "fid_1step": 31.5})
    w.write(8, {"loss": 0.125})
    w.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"step": 7, "loss": 0.25, "fid_1step": 31.5}, {"step": 8, "loss": 0.125}]
    (name,) = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents")]
    data, off, scalars = open(tmp_path / name, "rb").read(), 0, []
    while off < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack("<Q", data[off:off + 8])
        event = event_pb2.Event.FromString(data[off + 12:off + 12 + n])
        scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        off += 16 + n
    assert off == len(data)
    assert scalars == [(7, "loss", 0.25), (7, "fid_1step", 31.5), (8, "loss", 0.125)]


def test_k_schedule_follows_the_optimizer_step(tmp_path):
    """With config.imm.k_end the logged k rises with the step (stages of k_ramp_steps / 2 steps here)."""
    c = tiny(log_every=1)
    c.imm.k, c.imm.k_end, c.imm.k_ramp_steps = 4, 5, 4
    train.train_and_evaluate(c, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        ks = {r["step"]: r["k"] for r in map(json.loads, f) if "k" in r}
    # the metrics of step n come from the update at state.step = n - 1
    assert ks == {1: 4.0, 2: 4.0, 3: 5.0, 4: 5.0, 5: 5.0, 6: 5.0}


def test_loop_schedule_says_what_is_due():
    s = train.LoopSchedule(num_steps=10, log_every=2, ckpt_every=3, sample_every=4, eval_every=5)
    assert s.due(1) == set()
    assert s.due(4) == {"log", "sample"}
    assert s.due(6) == {"log", "checkpoint"}
    assert s.due(5) == {"evaluate"}
    assert s.due(10) == {"log", "checkpoint", "sample", "evaluate"}  # the last step: all, 10 % 4 != 0 too
    assert s.due(7, stopping=True) == {"log", "checkpoint"}  # preempted: checkpoint and exit
    assert s.due(7, stopping=True, out_of_time=True) == {"log", "checkpoint", "sample", "evaluate"}
    never = train.LoopSchedule(num_steps=10, log_every=1, ckpt_every=5)
    assert never.due(10) == {"log", "checkpoint"} and never.due(3) == {"log"}


def test_resume_with_another_batch_size_is_refused(tmp_path):
    """The checkpoint records the data position (step, batch size); resuming with a different batch size would
    silently change which examples come next, so it is an error that says what to do."""
    c = tiny()
    c.train.num_steps = 3
    train.train_and_evaluate(c, str(tmp_path))
    c2 = tiny()
    c2.data.batch_size = 64
    with pytest.raises(ValueError, match=r"Checkpoint step 3 has data position .*'batch_size': 32.*batch_size=64.*"
                                         r"resume with the config the run was started with"):
        train.train_and_evaluate(c2, str(tmp_path))
