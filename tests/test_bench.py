"""The benchmark scripts start and write their JSON (bench/ is run by hand; these keep it runnable).

Each runs the script as a user would, in a fresh process, at the smallest size it takes.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, *args, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_sampling_bench_on_fake_devices(tmp_path):
    # --devices sets the fake device count before jax starts (common.setup); 2 devices split the batch.
    result = run_bench("sampling.py", "--batch", "2", "--steps", "1", "--iters", "1",
                       "--devices", "2", tmp_path=tmp_path)
    assert {r["devices"] for r in result["rows"]} == {2}
    assert [(r["steps"], r["cfg"]) for r in result["rows"]] == [(1, None), (1, 1.5)]
    assert result["machine"]["keep_freed_memory"] in (True, False)


@pytest.mark.slow
def test_vs_torch_checks_the_networks_agree_then_times_both(tmp_path):
    pytest.importorskip("torch")
    result = run_bench("vs_torch.py", "--batch", "2", "--parts", "forward", "sample",
                       "--steps", "1", "--rounds", "1", "--warmup", "0", tmp_path=tmp_path)
    same = result["same_function"]
    assert same["params_torch"] == same["params_jax"]
    assert same["forward_max_abs_diff"] <= 1e-4 * max(1.0, same["forward_max_abs"])
    assert same["sample_2step_cfg_max_abs_diff"] <= 1e-4 * max(1.0, same["sample_max_abs"])
    assert [r["part"] for r in result["rows"]] == ["forward", "sample 1 step", "sample 1 step, CFG 1.5"]
    assert all(r["torch_s"] > 0 and r["jax_s"] > 0 for r in result["rows"])


def test_mutation_harness_sites_are_real_single_edits():
    # bench/mutation.py's score is only meaningful if every listed site is applied, changes the code, and changes
    # one expression (the unparsed mutant differs from the unparsed original in exactly one line).
    import ast
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import mutation
    finally:
        sys.path.pop(0)
    for module in mutation.MODULES:
        src = open(os.path.join(ROOT, "imm_jax", "core", f"{module}.py")).read()
        base = ast.unparse(ast.parse(src)).splitlines()
        sites = mutation.mutation_sites(src)
        assert len(sites) >= 20, module
        for s in sites:
            mutant = mutation.mutate(src, s["index"]).splitlines()
            assert len(mutant) == len(base)
            assert sum(a != b for a, b in zip(mutant, base)) == 1, (module, s)
        with pytest.raises(IndexError):
            mutation.mutate(src, len(sites))
    order = mutation.tests_for("mmd")
    assert order[0] == "tests/test_mmd.py" and sorted(order) == sorted(mutation.TESTS)
    # Each mutant listed as equivalent still names a mutation site of the current source (the list must not rot).
    for module, text, desc in mutation.EQUIVALENT:
        src = open(os.path.join(ROOT, "imm_jax", "core", f"{module}.py")).read()
        assert any(mutation.source_line(module, s["line"]) == text and s["desc"] == desc
                   for s in mutation.mutation_sites(src)), (module, text, desc)
