"""Two processes on loopback (gloo CPU collectives, 4 fake devices each) == one process with 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path):
    common = ["-m", "imm_jax.main", "--config=configs/tiny.py"]
    base_env = dict(os.environ, JAX_PLATFORMS="cpu")
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable] + common + [f"--workdir={tmp_path / 'two'}", "--multihost",
                                     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                     f"--process_id={i}"],
        cwd=ROOT, env=dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    # the one-process run alongside: it fills the cores while the two wait on each other's collectives
    procs.append(subprocess.Popen([sys.executable] + common + [f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
                                  env=dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "2 process(es)" in outs[0][0] and "8 devices" in outs[0][0]
    a, b = read(tmp_path / "two"), read(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    # Same data, same keys, same math; only the all-reduce order differs (gloo vs in-process).
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-5)
    # both processes took part in the checkpoint
    assert {"3", "6"} <= set(os.listdir(tmp_path / "two" / "checkpoints"))
