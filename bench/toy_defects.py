"""Does the 2-D regression test (tests/test_toy.py) catch real defects in the IMM loss?

    python bench/toy_defects.py                       # every defect, seed 0 (~20 s each on 2 cores)
    python bench/toy_defects.py --defect r_equals_t --seeds 0 1 2
    python bench/toy_defects.py --defect none --seeds 0 1 2 3 4 5 6 7 8 9   # the unmodified loss

Each defect is a textual edit of imm_jax/core/losses.py (or mmd.py) applied to a copy of the module's source; the
copy is executed as a module and its `imm_loss` / `IMMObjective` train the toy of examples/toy2d.py through
`run_check`, whose stats are compared with the test's bounds (`toy2d.BOUNDS`). The installed package is not
modified. Prints one line per (defect, seed): the bounds broken, or "all bounds hold".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (file, [(old, new), ...]); `old` must occur exactly once in the file.
DEFECTS = {
    "none": ("losses.py", []),
    "target_grad": ("losses.py", [  # gradient flows through the target pass
        ("network_fn(net, jax.lax.stop_gradient(params), train=train", "network_fn(net, params, train=train"),
        ("y_r = jax.lax.stop_gradient(param.apply(target_fn, x_r, ss, rr, labels))",
         "y_r = param.apply(target_fn, x_r, ss, rr, labels)"),
    ]),
    "bandwidth_no_cout": ("losses.py", [  # kernel weight 1 instead of 1/|c_out(s,t)|
        ("kernel_weight=objective.kernel_weight(s, t)", "kernel_weight=jnp.ones_like(s)"),
    ]),
    "r_equals_t": ("losses.py", [  # no inductive step: the target is the online map itself
        ("return s, objective.r(s, t, step), t", "return s, t, t"),
    ]),
    "fresh_noise_x_r": ("losses.py", [  # x_r built from a second noise draw instead of x_t's eps
        ("x_r = interpolants.add_noise(x, eps, rr,",
         "x_r = interpolants.add_noise(x, interpolants.prior_noise(jax.random.fold_in(k_eps, 1), x.shape, "
         "objective.param.sigma_d), rr,"),
    ]),
    "group_reshape": ("losses.py", [  # particles grouped across (s, t) groups
        ("grouped = lambda y: y.reshape((g, m) + y.shape[1:])",
         "grouped = lambda y: y.reshape((m, g) + y.shape[1:]).swapaxes(0, 1)"),
    ]),
    "u_statistic": ("mmd.py", [  # diagonal pairs dropped from k_tt, k_rr and k_tr
        ("def _group_terms(y_t, y_r, weight, kernel):\n"
         "    k_tt = jnp.mean(kernel_matrix(y_t, y_t, weight, kernel))\n"
         "    k_rr = jnp.mean(kernel_matrix(y_r, y_r, weight, kernel))\n"
         "    k_tr = jnp.mean(kernel_matrix(y_t, y_r, weight, kernel))",
         "def _offdiag(k):\n"
         "    m = k.shape[0]\n"
         "    return (jnp.sum(k) - jnp.trace(k)) / max(m * (m - 1), 1)\n\n\n"
         "def _group_terms(y_t, y_r, weight, kernel):\n"
         "    k_tt = _offdiag(kernel_matrix(y_t, y_t, weight, kernel))\n"
         "    k_rr = _offdiag(kernel_matrix(y_r, y_r, weight, kernel))\n"
         "    k_tr = _offdiag(kernel_matrix(y_t, y_r, weight, kernel))"),
    ]),
    "no_weight": ("losses.py", [  # w(t) = 1 (paper Table 4: worse, but it still trains)
        ("per_group = w * (k_tt + k_rr - 2.0 * k_tr)", "per_group = (k_tt + k_rr - 2.0 * k_tr)"),
    ]),
    "s_from_zero": ("losses.py", [  # s ~ U(0, t) instead of U(t_min, t)
        ("s = lo + jax.random.uniform(k_s, (num_groups,), jnp.float32) * (t - lo)",
         "s = jax.random.uniform(k_s, (num_groups,), jnp.float32) * t"),
    ]),
}


def _load_toy():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import toy2d
    return toy2d


def mutated_module(name: str, edits, overrides=None) -> types.ModuleType:
    """imm_jax.core.<name> executed from its source with `edits` applied; overrides rebinds module globals."""
    import imm_jax.core
    path = os.path.join(os.path.dirname(imm_jax.core.__file__), name)
    src = open(path).read()
    for old, new in edits:
        if src.count(old) != 1:
            raise SystemExit(f"defect edit not found exactly once in {path}: {old!r}")
        src = src.replace(old, new)
    mod = types.ModuleType(f"imm_jax.core._mutant_{name[:-3]}")
    mod.__dict__["__package__"] = "imm_jax.core"
    sys.modules[mod.__name__] = mod  # dataclasses resolve annotations through sys.modules
    exec(compile(src, f"<mutant {name}>", "exec"), mod.__dict__)
    for k, v in (overrides or {}).items():
        setattr(mod, k, v)
    return mod


def losses_with(defect: str) -> types.ModuleType:
    file, edits = DEFECTS[defect]
    if file == "mmd.py":
        return mutated_module("losses.py", [], {"mmd": mutated_module("mmd.py", edits)})
    return mutated_module("losses.py", edits)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--defect", nargs="+", default=[d for d in DEFECTS if d != "none"], choices=list(DEFECTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--json", default="", help="also write the stats to this JSON file")
    args = p.parse_args(argv)
    toy = _load_toy()
    rows = []
    for defect in args.defect:
        mod = losses_with(defect)
        base = toy.objective("imm")
        obj = mod.IMMObjective(param=base.param, particles=base.particles, k=base.k)
        for seed in args.seeds:
            t0 = time.time()
            stats = toy.run_check(seed, imm_loss=mod.imm_loss, imm_obj=obj)
            bad = toy.violations(stats)
            rows.append({"defect": defect, "seed": seed, "stats": stats, "violations": bad})
            short = {c: {k: round(v, 3) for k, v in s.items()} for c, s in stats.items()}
            print(f"{defect} seed {seed} ({time.time() - t0:.0f} s): "
                  f"{'; '.join(bad) if bad else 'all bounds hold'} | {short}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
