"""The command line: overrides, bad names, train -> samples -> sample mode, real SIGTERM (subprocesses)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, env_extra=None, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "imm_jax.main"] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_unknown_override_is_rejected(tmp_path):
    r = run_main(["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.num_stepz=3"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ("python -m imm_jax.main: error: unknown config field --config.train.num_stepz "
            "(--config.train.num_stepz=3); did you mean --config.train.num_steps?") in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
    r = run_main(["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.imx.k=3"])
    assert r.returncode == 2 and "did you mean --config.imm?" in r.stderr and "config has: data, eval" in r.stderr


def test_validation_error_reaches_the_user(tmp_path):
    args = ["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.data.batch_size=30"]
    r = run_main(args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "python -m imm_jax.main: error: Invalid config:" in r.stderr
    assert "not divisible by config.imm.particles=4" in r.stderr
    # tracebacks on request, for user errors too
    r = run_main(args, env_extra={"IMM_JAX_TRACEBACK": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    r = run_main(["--config=configs/tiny.py", "--config.seed=1"])
    assert r.returncode == 2 and "error: --workdir is required" in r.stderr and "Traceback" not in r.stderr


def test_cli_train_then_sample(tmp_path):
    r = run_main(["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.num_steps=4",
                  "--config.train.sample_every=2", "--config.train.log_every=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 4/4 | loss" in r.stdout and "img/s" in r.stdout and "ETA" in r.stdout
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["train"]["num_steps"] == 4  # the resolved (overridden) config
    assert sorted(os.listdir(tmp_path / "samples")) == [
        "step00000002_1step.png", "step00000002_2step.png", "step00000004_1step.png", "step00000004_2step.png"]
    r = run_main(["--mode=sample", f"--workdir={tmp_path}", "--num_samples=4", "--steps=1", "--steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"1step", "2step"} <= set(os.listdir(tmp_path / "samples_cli"))
    import numpy as np
    x = np.load(tmp_path / "samples_cli" / "2step" / "samples.npz")["arr_0"]  # ADM evaluator layout
    assert x.shape == (4, 8, 8, 1) and x.dtype == np.uint8
    assert os.path.exists(tmp_path / "samples_cli" / "2step" / "grid.png")

    # MTEO: tune the 2-step sampler, then sample with the tuned set; a step count without one is refused.
    r = run_main(["--mode=tune", f"--workdir={tmp_path}", "--steps=2", "--tune_iters=2", "--tune_batch_size=8",
                  "--tune_trajectories=16", "--tune_eval=8", "--tune_teacher_steps=4"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out loss" in r.stdout and "saved to" in r.stdout
    r = run_main(["--mode=sample", f"--workdir={tmp_path}", "--num_samples=4", "--steps=2", "--tuned",
                  f"--out={tmp_path}/tuned"])
    assert r.returncode == 0, r.stderr[-3000:]
    xt = np.load(tmp_path / "tuned" / "2step" / "samples.npz")["arr_0"]
    assert xt.shape == x.shape and xt.dtype == np.uint8
    r = run_main(["--mode=sample", f"--workdir={tmp_path}", "--num_samples=4", "--steps=1", "--tuned",
                  f"--out={tmp_path}/tuned"])
    assert r.returncode != 0 and "no tuned vectors for pushforward 1 steps" in r.stderr


def test_sigterm_to_process_checkpoints(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    p = subprocess.Popen([sys.executable, "-m", "imm_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                          "--config.train.num_steps=100000", "--config.train.ckpt_every=100000"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < 100000
    assert f"Preempted: checkpoint written at step {steps[0]}" in out


@pytest.mark.parametrize("module,args,message", [
    ("imm_jax.evaluation", ["fid", "--samples=/nonexistent.npz", "--ref=/nonexistent_ref.npz"],
     "python -m imm_jax.evaluation: error: [Errno 2] No such file or directory: '/nonexistent.npz'"),
    ("imm_jax.tuning", ["--checkpoint=/nonexistent", "--workdir=/tmp/imm_jax_tune_x"],
     "python -m imm_jax.tuning: error: No checkpoint found under /nonexistent."),
    ("imm_jax.tools.encode_latents", ["--source=folder", "--data_dir=/nonexistent", "--vae=/nonexistent",
                                      "--out=/tmp/imm_jax_lat_x", "--resolution=16"],
     "python -m imm_jax.tools.encode_latents: error: --data_dir=/nonexistent is not a directory."),
])
def test_other_command_lines_report_user_errors(module, args, message):
    """Every CLI: a user error is one line on stderr and exit status 2, without a traceback or library noise."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", module] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == message, r.stderr[-2000:]
