"""Mutation testing of the math (imm_jax/core): does the fast test suite notice when a formula changes?

    python bench/mutation.py --out bench/results/mutation.json                 # every mutant (hours on 2 cores)
    python bench/mutation.py --modules mmd losses --max-per-module 20 --seed 0  # a sample
    python bench/mutation.py --list                                           # the mutants, without running
    python bench/mutation.py --report --out bench/results/mutation.json       # score and survivors of a run
    python bench/mutation.py --rerun-survivors --out bench/results/mutation.json  # survivors again, new tests

Each mutant is one small edit of one expression in a core module (an arithmetic or comparison operator
swapped, a numeric constant changed, a unary minus dropped, maximum <-> minimum, where's branches swapped),
made on the parsed source (ast) and written into a copy of the package; the tests named in TESTS (the fast ones
that exercise core, including the 2-D toy) then run from a copy of the repository in a subprocess, after a check
that the copy, not the checkout, is what gets imported. A mutant is killed when
the tests fail or time out, survives when they pass. Docstrings and error messages are not mutated. Results are
appended to --out as they finish (an interrupted run resumes); the summary lists the surviving mutants, which
are either missing tests or equivalent mutants (a change that cannot alter any result), to be read by hand;
those found equivalent are listed in EQUIVALENT with the reason and excepted from the score.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("interpolants", "parameterization", "mmd", "losses", "sampling")
TESTS = ["tests/test_interpolants.py", "tests/test_parameterization.py", "tests/test_mmd.py",
         "tests/test_losses.py", "tests/test_sampling.py", "tests/test_toy.py", "tests/test_tuning.py"]
# test_tuning's network tests (per-layer conditioning of the DiT / UNet) call nothing in core; ~90 s per survivor
DESELECT = ["tests/test_tuning.py::test_cond_override_and_offset_reproduce_default_and_reach_every_layer",
            "tests/test_tuning.py::test_unet_override_refuses_class_conditional_but_offset_works"]

# Surviving mutants read by hand and found equivalent (no input the module's contract allows gives another
# result), keyed by (module, the mutated source line without its comment, stripped, the mutation): the reason.
EQUIVALENT = {
    ("mmd", "DIST_EPS = 1e-8", "1e-08 -> 2e-08"):
        "the distance floor: kernel values at coincident particles are exp(-w 1e-8 / D) = 1 in float32 either "
        "way, and the floor's gradient is 0 either way",
    ("mmd", "return jnp.exp(-weight * jnp.sqrt(jnp.maximum(sq, DIST_EPS ** 2)) / d)", "2 -> 3"):
        "the squared-distance floor 1e-16 -> 1e-24: kernel values move by <= w 1e-8 / D and the gradient stays "
        "finite (|d dist / dx| <= 1)",
    ("mmd", "d = a.shape[-1]", "drop unary minus"):
        "kernel_matrix takes (M, D) arrays, so shape[1] is shape[-1]",
    ("losses", "base = e < delta", "Lt -> LtE"):
        "at eta_t == delta the step lands at r = 0, which the final clip raises to s: the base case's r = s",
    ("losses", "base = r < 0", "Lt -> LtE"):
        "the 't' mapping at r == 0: either way r ends at s (the base case, or r = 0 clipped up to s)",
    ("losses", "if min_gap > 0:", "Gt -> GtE"):
        "with min_gap = 0, minimum(r, t - 0) is r, since r <= t",
    ("losses", 'k_ramp_steps=int(imm.get("k_ramp_steps", 0) or 0))', "0 -> 1"):
        "get's default, read only for a config without k_ramp_steps, which has no k_end either (base.py brings both): "
        "without k_end, k_ramp_steps is never read (the line's other '0 -> 1', the 'or 0', is killed by "
        "test_objective_defaults_are_the_papers_cifar10_recipe)",
    ("losses", "return 1.0 / jnp.maximum(jnp.abs(self.param.c_out(s, t)), 1e-12)", "1e-12 -> 2e-12"):
        "the floor acts only where |c_out(s, t)| < 2e-12, i.e. s = t up to ~1e-11 (r = s = t): both passes then "
        "return the same x_t, k_tt = k_rr = k_tr and the group's MMD is 0 for any kernel weight",
}

_BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}
_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq}
_CALL_SWAP = {"maximum": "minimum", "minimum": "maximum", "max": "min", "min": "max"}


def _skip_nodes(tree) -> set[int]:
    """ids of nodes inside docstrings, raise statements and f-strings (messages, not math)."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            skip |= {id(n) for n in ast.walk(body[0])}
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def mutation_sites(source: str) -> list[dict]:
    """Every mutation of `source`: [{"index", "line", "kind", "desc"}], in a stable order."""
    tree = ast.parse(source)
    skip = _skip_nodes(tree)
    sites = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
            sites.append(dict(line=line, kind="binop",
                              desc=f"{type(node.op).__name__} -> {_BINOP_SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP_SWAP:
            sites.append(dict(line=line, kind="compare",
                              desc=f"{type(node.ops[0]).__name__} -> {_CMP_SWAP[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            sites.append(dict(line=line, kind="const", desc=f"{node.value!r} -> {_const_mutant(node.value)!r}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sites.append(dict(line=line, kind="neg", desc="drop unary minus"))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in _CALL_SWAP:
                sites.append(dict(line=line, kind="call", desc=f"{name} -> {_CALL_SWAP[name]}"))
            elif name == "where" and len(node.args) == 3:
                sites.append(dict(line=line, kind="where", desc="where(c, a, b) -> where(c, b, a)"))
    for i, s in enumerate(sites):
        s["index"] = i
    return sites


def _const_mutant(v):
    if isinstance(v, int):
        return v + 1
    return 0.0 if v == 1.0 else (1.0 if v == 0.0 else v * 2.0)


def mutate(source: str, index: int) -> str:
    """`source` with mutation site `index` applied (same walk order as mutation_sites)."""
    tree = ast.parse(source)
    skip = _skip_nodes(tree)
    i = -1
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        hit = None
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
            hit = lambda n: setattr(n, "op", _BINOP_SWAP[type(n.op)]())
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP_SWAP:
            hit = lambda n: setattr(n, "ops", [_CMP_SWAP[type(n.ops[0])]()])
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            hit = lambda n: setattr(n, "value", _const_mutant(n.value))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            hit = lambda n: setattr(n, "op", ast.UAdd())
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in _CALL_SWAP:
                def hit(n):
                    if isinstance(n.func, ast.Attribute):
                        n.func.attr = _CALL_SWAP[n.func.attr]
                    else:
                        n.func.id = _CALL_SWAP[n.func.id]
            elif name == "where" and len(node.args) == 3:
                hit = lambda n: setattr(n, "args", [n.args[0], n.args[2], n.args[1]])
        if hit is None:
            continue
        i += 1
        if i == index:
            hit(node)
            return ast.unparse(ast.fix_missing_locations(tree))
    raise IndexError(f"mutation site {index} not found")


def _env(package_root: str) -> dict:
    return dict(os.environ, PYTHONPATH=package_root, JAX_PLATFORMS="cpu")


def check_copy_is_imported(package_root: str) -> None:
    """The tests must import the mutated copy, not the checkout (an editable install or the working directory
    would otherwise shadow it and every mutant would 'survive')."""
    code = "import imm_jax.core.mmd as m, imm_jax.configs as c; print(m.__file__); print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=package_root, env=_env(package_root),
                         capture_output=True, text=True, check=True).stdout.split()
    if not all(os.path.realpath(f).startswith(os.path.realpath(package_root)) for f in out):
        raise SystemExit(f"the package copy is shadowed: imports resolve to {out}")


def tests_for(module: str | None) -> list[str]:
    """TESTS with the mutated module's own test file first (pytest -x stops at the first failure, so a mutant its
    own tests kill costs one file, not the whole list); every file runs for a survivor."""
    own = f"tests/test_{module}.py"
    return ([own] if own in TESTS else []) + [t for t in TESTS if t != own]


def run_tests(package_root: str, timeout: float, module: str | None = None) -> tuple[str, float]:
    """'killed' | 'survived' | 'timeout' for the package copy at package_root, and seconds taken."""
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            *tests_for(module), *(f"--deselect={t}" for t in DESELECT)],
                           cwd=package_root, env=_env(package_root), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    return ("survived" if r.returncode == 0 else "killed"), time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", nargs="*", default=list(MODULES), choices=MODULES)
    p.add_argument("--max-per-module", type=int, default=0, help="random sample of this many per module (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run")
    p.add_argument("--out", default="bench/results/mutation.json")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--report", action="store_true", help="print the score and survivors of --out and exit")
    p.add_argument("--rerun-survivors", action="store_true",
                   help="run only the surviving, not-equivalent mutants of --out again (after adding tests)")
    args = p.parse_args(argv)

    plan = []
    for m in args.modules:
        src = open(os.path.join(ROOT, "imm_jax", "core", f"{m}.py")).read()
        sites = mutation_sites(src)
        if args.max_per_module and len(sites) > args.max_per_module:
            sites = sorted(random.Random(f"{args.seed}-{m}").sample(sites, args.max_per_module),
                           key=lambda s: s["index"])
        plan += [dict(module=m, **s) for s in sites]
    if args.list:
        for s in plan:
            print(f"{s['module']}.py:{s['line']} [{s['index']}] {s['kind']}: {s['desc']}")
        print(f"{len(plan)} mutants")
        return 0

    results = json.load(open(args.out))["mutants"] if os.path.isfile(args.out) else []
    if args.report:
        return report(results)
    if args.rerun_survivors:
        again = {(r["module"], r["index"]) for r in results if r["outcome"] == "survived" and not equivalence(r)}
        results = [r for r in results if (r["module"], r["index"]) not in again]
        plan = [s for s in plan if (s["module"], s["index"]) in again]
    done = {(r["module"], r["index"]) for r in results}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(ROOT, "imm_jax"), os.path.join(tmp, "imm_jax"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        # imm_jax.configs is the repository's configs/ (installed by package_dir); the tests run from the copy
        for src, dst in (("configs", "imm_jax/configs"), ("configs", "configs"), ("tests", "tests"),
                         ("examples", "examples")):
            shutil.copytree(os.path.join(ROOT, src), os.path.join(tmp, dst),
                            ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        shutil.copy(os.path.join(ROOT, "setup.cfg"), tmp)
        check_copy_is_imported(tmp)
        baseline, secs = run_tests(tmp, args.timeout)
        if baseline != "survived":
            raise SystemExit(f"the unmutated tests do not pass ({baseline}); fix that first")
        print(f"baseline: tests pass in {secs:.0f} s; {len(plan) - len(done & {(s['module'], s['index']) for s in plan})}"
              f" mutants to run", flush=True)
        for s in plan:
            if (s["module"], s["index"]) in done:
                continue
            path = os.path.join(tmp, "imm_jax", "core", f"{s['module']}.py")
            original = open(os.path.join(ROOT, "imm_jax", "core", f"{s['module']}.py")).read()
            with open(path, "w") as f:
                f.write(mutate(original, s["index"]))
            outcome, secs = run_tests(tmp, args.timeout, s["module"])
            with open(path, "w") as f:
                f.write(original)
            results.append(dict(copy.deepcopy(s), outcome=outcome, seconds=round(secs, 1)))
            print(f"{s['module']}.py:{s['line']} {s['desc']}: {outcome} ({secs:.0f} s)", flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(dict(command=" ".join(sys.argv), mutants=results), f, indent=1)
            os.replace(args.out + ".tmp", args.out)
    return report(results)


def source_line(module: str, line: int) -> str:
    """Line `line` of imm_jax/core/<module>.py without its comment, stripped ('' past the end): EQUIVALENT's key."""
    lines = open(os.path.join(ROOT, "imm_jax", "core", f"{module}.py")).read().splitlines()
    return lines[line - 1].split("  #")[0].strip() if 0 < line <= len(lines) else ""


def equivalence(result: dict) -> str | None:
    """The recorded reason if this surviving mutant is listed in EQUIVALENT (matched on the current source)."""
    return EQUIVALENT.get((result["module"], source_line(result["module"], result["line"]), result["desc"]))


def report(results: list[dict]) -> int:
    """Print the score (killed / all but the equivalent mutants) and every survivor."""
    killed = sum(r["outcome"] != "survived" for r in results)
    timeouts = sum(r["outcome"] == "timeout" for r in results)
    survivors = [r for r in results if r["outcome"] == "survived"]
    equivalent = [r for r in survivors if equivalence(r)]
    scored = len(results) - len(equivalent)
    print(f"{len(results)} mutants run: {killed} killed ({timeouts} by timeout), {len(survivors)} survived, "
          f"{len(equivalent)} of them equivalent")
    print(f"mutation score (equivalent mutants excepted): {killed}/{scored} ({100 * killed / max(scored, 1):.1f}%)")
    for r in survivors:
        why = equivalence(r)
        print(f"  {'equivalent' if why else 'survived'}: {r['module']}.py:{r['line']} {r['kind']}: {r['desc']}"
              + (f" ({why})" if why else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
