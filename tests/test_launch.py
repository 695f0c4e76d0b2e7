"""Launchers: --dry-run output of launch/tpu_pod.sh (2-worker TPU) and launch/slurm_gpu.sh (2-node job),
and the real (non-dry) paths against fake gcloud/sbatch executables that record their argv."""
import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sh")


def _run(script, *args, env=None, check=True):
    p = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _commands(out):
    """The '+ ...' lines of a dry run, split into argv lists."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _remote(argv):
    return next(a[len("--command="):] for a in argv if a.startswith("--command="))


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH entry with gcloud/sbatch/git stand-ins that append their argv to calls.log."""
    d = tmp_path / "bin"
    d.mkdir()
    log = tmp_path / "calls.log"
    for name in ("gcloud", "sbatch", "git"):
        f = d / name
        f.write_text(f'#!/bin/bash\nprintf "%s\\0" {name} "$@" >> {log}\nprintf "\\n" >> {log}\n')
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{d}:{os.environ['PATH']}")
    return env, log


def _calls(log):
    if not log.exists():
        return []
    return [c.rstrip("\0").split("\0") for c in log.read_text().split("\n") if c.strip("\0")]


def test_tpu_dry_run_two_workers(fake_bin):
    env, log = fake_bin
    p = _run(TPU, "--dry-run", "up", "--name", "imm-xl", "--zone", "us-central2-b", "--project", "proj",
             "--accelerator-type", "v4-16", "--workdir", "gs://bkt/runs/xl", "--data", "gs://bkt/latents",
             "--", "--config.data.batch_size=4096", env=env)
    assert _calls(log) == []  # a dry run executes nothing
    assert "v4-16: 2 worker(s), 8 JAX devices" in p.stdout
    cmds = _commands(p.stdout)
    create, archive, scp, install, sync, train = cmds
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "imm-xl", "--zone=us-central2-b",
                      "--project=proj", "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base"]
    assert archive[:3] == ["git", "-C", ROOT] and "HEAD" in archive
    for c in (scp, install, sync, train):
        assert c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", c[4]] and "--worker=all" in c
    assert scp[4] == "scp" and "jax[tpu]" in _remote(install) and "pip install -q -e ~/imm_jax" in _remote(install)
    assert "gcloud storage rsync --recursive gs://bkt/latents /tmp/imm_latents" in _remote(sync)
    remote = _remote(train)
    assert "IMM_JAX_MULTIHOST=1" in remote and ">> ~/imm_train.log" in remote and "~/imm_train.pid" in remote
    inner = shlex.split(remote)
    trainer = shlex.split(inner[inner.index("-c") + 1].split(" && touch")[0])
    assert trainer == ["python3", "-m", "imm_jax.main", "--config=configs/imagenet256.py:variant=XL/2",
                       "--workdir=gs://bkt/runs/xl", "--multihost", "--config.data.path=/tmp/imm_latents",
                       "--config.data.batch_size=4096"]


def test_tpu_other_commands_dry_run(fake_bin):
    env, log = fake_bin
    base = ["--dry-run", "--name", "t", "--accelerator-type", "v4-16"]
    stop = _commands(_run(TPU, *base, "stop", env=env).stdout)
    assert len(stop) == 1 and "--worker=all" in stop[0] and "kill -TERM" in _remote(stop[0])
    logs = _commands(_run(TPU, *base, "logs", "--follow", env=env).stdout)
    assert "--worker=0" in logs[0] and "tail -n 50 -f ~/imm_train.log" in _remote(logs[0])
    assert _commands(_run(TPU, *base, "delete", env=env).stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=us-central2-b", "--quiet"]]
    status = _commands(_run(TPU, *base, "status", env=env).stdout)
    assert status[0][4] == "describe"
    # watch shows the preemption recovery: delete, create (spot), setup, train (resumes from --workdir).
    w = _run(TPU, *base, "--spot", "watch", "--workdir", "gs://b/w", env=env)
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in _commands(w.stdout)]
    assert verbs == ["describe", "delete", "create", "git", "scp", "ssh", "ssh"]
    assert "--spot" in _commands(w.stdout)[2]
    assert _calls(log) == []
    assert "1 worker(s), 4 JAX devices" in _run(TPU, "--dry-run", "--accelerator-type", "v4-8", "status",
                                                env=env).stdout
    assert "4 worker(s), 16 JAX devices" in _run(TPU, "--dry-run", "--accelerator-type", "v5litepod-16",
                                                 "status", env=env).stdout


def test_tpu_errors(fake_bin):
    env, _ = fake_bin
    p = _run(TPU, "--dry-run", "train", env=env, check=False)
    assert p.returncode == 2 and "--workdir" in p.stderr
    p = _run(TPU, "--dry-run", "--bogus", "create", env=env, check=False)
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr
    p = _run(TPU, "--dry-run", env=env, check=False)
    assert p.returncode == 2 and "no command" in p.stderr


def test_tpu_real_mode_calls_gcloud(fake_bin):
    env, log = fake_bin
    _run(TPU, "create", "--name", "imm-xl", "--accelerator-type", "v4-16", "--spot", env=env)
    assert _calls(log) == [["gcloud", "compute", "tpus", "tpu-vm", "create", "imm-xl", "--zone=us-central2-b",
                            "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base", "--spot"]]


def test_slurm_dry_run_two_nodes(fake_bin, tmp_path):
    env, log = fake_bin
    p = _run(SLURM, "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account",
             "acct", "--workdir", "/shared/runs/xl", "--data", "/shared/latents", "--venv", "/shared/venv",
             "--", "--config.data.batch_size=4096", env=env)
    assert _calls(log) == []
    out = p.stdout
    assert "2 node(s) x 8 GPU(s) = 16 processes (one per GPU)" in out
    script = out[out.index("#!/bin/bash"):out.index("# then:")]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=acct", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "export IMM_JAX_MULTIHOST=1", "source /shared/venv/bin/activate",
                 "trap requeue USR1", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in [s.strip() for s in script.splitlines()], line
    assert "--gpus-per-task" not in script  # every task must see all GPUs of its node
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun.rstrip(" &"))
    assert argv[argv.index("python"):] == [
        "python", "-m", "imm_jax.main", "--config=configs/imagenet256.py:variant=XL/2",
        "--workdir=/shared/runs/xl", "--multihost", "--config.data.path=/shared/latents",
        "--config.data.batch_size=4096"]
    f = tmp_path / "job.sbatch"
    f.write_text(script)
    assert subprocess.run(["bash", "-n", str(f)]).returncode == 0
    assert _commands(out) == [["mkdir", "-p", "/shared/runs/xl/slurm"], ["sbatch", "/shared/runs/xl/slurm/imm_imm.sbatch"]]


def test_slurm_real_mode_writes_and_submits(fake_bin, tmp_path):
    env, log = fake_bin
    wd = tmp_path / "run"
    _run(SLURM, "--nodes", "2", "--gpus-per-node", "4", "--workdir", str(wd), "--job-name", "t", env=env)
    script = wd / "slurm" / "imm_t.sbatch"
    assert _calls(log) == [["sbatch", str(script)]]
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=4" in text
    p = _run(SLURM, "--dry-run", env=env, check=False)
    assert p.returncode == 2 and "--workdir is required" in p.stderr
