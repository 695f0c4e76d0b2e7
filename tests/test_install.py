"""A non-editable install works from outside the checkout: the wheel holds every subpackage and the configs,
`python -m imm_jax.main --help` runs, and --config=configs/tiny.py trains 2 steps from another directory."""
import configparser
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_cfg_lists_every_subpackage():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    listed = set(cfg["options"]["packages"].split())
    found = {"imm_jax.configs"} | {
        os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "imm_jax"))
        if "__init__.py" in files}
    assert listed == found, f"setup.cfg [options] packages: add {sorted(found - listed)}, drop {sorted(listed - found)}"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv with the wheel built from this checkout installed; dependencies borrowed from this
    interpreter's site-packages through a .pth line (no downloads; this checkout is not on its path)."""
    tmp = tmp_path_factory.mktemp("install")
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "runs",
                                                              "*.egg-info", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, cwd=tmp)
    (wheel,) = os.listdir(tmp / "dist")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    with open(os.path.join(purelib, "_borrowed_deps.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run(pip + ["--python", py, "install", "--no-deps", str(tmp / "dist" / wheel)], check=True)
    return py, tmp


def _run(py, args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return subprocess.run([py] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_install_runs_from_outside_the_checkout(fresh_venv):
    py, tmp = fresh_venv
    where = _run(py, ["-c", "import imm_jax, imm_jax.configs.base as b; print(imm_jax.__file__); print(b.__file__)"],
                 cwd=tmp)
    assert where.returncode == 0, where.stderr
    assert all(not line.startswith(ROOT) and str(tmp) in line for line in where.stdout.split()), where.stdout
    help_ = _run(py, ["-m", "imm_jax.main", "--help"], cwd=tmp)
    # absl exits with status 1 after printing --help
    assert "--workdir" in help_.stdout and "Traceback" not in help_.stderr, help_.stderr[-2000:]
    run = _run(py, ["-m", "imm_jax.main", "--config=configs/tiny.py", f"--workdir={tmp / 'run'}",
                    "--config.train.num_steps=2", "--config.mesh.data=1"], cwd=tmp)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "steps 0 -> 2" in run.stdout and os.path.isdir(tmp / "run" / "checkpoints" / "2")
    bad = _run(py, ["-m", "imm_jax.main", "--config=configs/nope.py", f"--workdir={tmp / 'x'}"], cwd=tmp)
    assert bad.returncode != 0 and "configs/fashion_mnist.py" in bad.stderr and "Traceback" not in bad.stderr
