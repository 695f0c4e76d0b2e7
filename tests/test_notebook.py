"""The Colab demo's code path, run on the tiny config (IPython-only lines are skipped)."""
import json
import os
import sys
import types


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "imm_jax_demo.ipynb")


def notebook_code():
    nb = json.load(open(NOTEBOOK))
    for cell in nb["cells"]:
        assert cell["cell_type"] != "code" or not cell["outputs"], "notebook must be committed without outputs"
    lines = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            lines += [l for l in src.splitlines() if not l.strip().startswith("!")]
    return "\n".join(lines)


def test_demo_runs_on_tiny_config(tmp_path, monkeypatch):
    monkeypatch.setenv("IMM_DEMO_TINY", "1")
    monkeypatch.setenv("IMM_JAX_REPO", ROOT)
    monkeypatch.setenv("IMM_DEMO_WORKDIR", str(tmp_path / "demo"))
    shown = []
    fake = types.ModuleType("IPython.display")
    fake.display = shown.append  # the notebook shows PIL images through IPython.display.display
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", fake)
    exec(compile(notebook_code(), NOTEBOOK, "exec"), {"__name__": "__demo__"})
    assert len(shown) == 8  # 4 step counts + 4 guidance scales
    assert shown[0].width > 0
