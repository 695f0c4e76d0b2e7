"""Where one IMM train step spends its time, per XLA:CPU operation (from a profiler trace).

    python bench/trace_step.py --model dit_s2 --out bench/results/trace_step.json

Traces one compiled step with `jax.profiler` (thunk-level events, one per executed HLO operation), joins the
events with the optimized HLO and prints time per (forward/backward, layer, kind) group: dots with their
FLOPs and GFLOP/s, elementwise fusions, copies, the CPU kernels (imm_jax/kernels: attention with the FLOPs
of the plain-JAX attention's matmuls, the linear layers' products and convolutions with their own). XLA:CPU may run independent operations concurrently, so
per-operation times overlap and sum to more than the step (the first line says by how much); read the groups
as relative costs. Dots that XLA runs through Eigen (e.g. the weight gradients) execute asynchronously: their
events cover only the launch, so a group holding them reads faster than it ran. `gflop` counts
matmuls (dots) only, not convolutions. Writes JSON.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LAYERS = ("qkv", "attn/proj", "fc1", "fc2", "adaLN", "x_embedder", "final_layer", "conv0", "conv1", "skip",
          "attn")


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([^\]]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str) -> dict[str, dict]:
    """Entry-computation instruction name -> op, metadata op_name, dot FLOPs (including fused dots)."""
    comps, cur, entry = {}, None, None
    # The shape is one array type or a tuple "(f32[...]{...}, ...)" (multi-output fusions, custom calls).
    inst = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\([^)]*\)|\S+) ([\w-]+)\((.*)$")
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            cur = comps.setdefault(head.group(1), {})
            entry = head.group(1) if line.startswith("ENTRY") else entry
            continue
        m = inst.match(line)
        if m and cur is not None:
            cur[m.group(1)] = dict(shape=m.group(2), op=m.group(3), rest=m.group(4))

    def dot_flops(comp, ins):
        lhs = comps[comp].get(re.findall(r"%([\w.\-]+)", ins["rest"])[0])
        contracting = re.search(r"lhs_contracting_dims=\{([^}]*)\}", ins["rest"])
        k = 1
        if lhs and contracting:
            ld = _dims(lhs["shape"])
            for i in filter(None, contracting.group(1).split(",")):
                k *= ld[int(i)]
        n = 1
        for d in _dims(ins["shape"]):
            n *= d
        return 2 * n * k

    info = {}
    for name, ins in comps[entry].items():
        called = re.search(r"calls=%([\w.\-]+)", ins["rest"])
        body = comps.get(called.group(1), {}) if called else {}
        dots = [(called.group(1), i) for i in body.values() if i["op"] in ("dot", "convolution")]
        if ins["op"] in ("dot", "convolution"):
            dots.append((entry, ins))
        flops = sum(dot_flops(c, i) for c, i in dots if i["op"] == "dot")
        op_name = re.search(r'op_name="([^"]*)"', ins["rest"])
        target = re.search(r'custom_call_target="(imm_\w+)"', ins["rest"])
        kernel = target.group(1) if ins["op"] == "custom-call" and target else ""
        if kernel.startswith("imm_attention"):  # count the plain-JAX attention's matmuls (2 forward, 4 backward)
            dims = _dims(re.search(r"f32\[[^\]]*\]", ins["shape"]).group(0))
            b, n, h, d = (dims[0], dims[1], dims[3], dims[4]) if kernel.endswith("backward") else dims
            flops = (4 if kernel.endswith("backward") else 2) * 2 * b * h * n * n * d
        elif kernel == "imm_matmul":  # op(A) (M, K) @ op(B) (K, N): K from A's shape and transpose_a
            a_dims = _dims(re.search(r"operand_layout_constraints=\{(f32\[[^\]]*\])", ins["rest"]).group(1))
            k = a_dims[0] if "transpose_a = true" in ins["rest"] else a_dims[1]
            m, n = _dims(ins["shape"])
            flops = 2 * m * n * k
        elif kernel == "imm_conv2d":  # 2 * output elements * k * k * C_in, from the kernel (k, k, C_in, C_out)
            kernel_dims = _dims(re.findall(r"f32\[[^\]]*\]", ins["rest"].split("operand_layout_constraints=")[1])[1])
            out = 1
            for d in _dims(ins["shape"]):
                out *= d
            flops = 2 * out * kernel_dims[0] * kernel_dims[1] * kernel_dims[2]
        info[name] = dict(op=ins["op"], op_name=op_name.group(1) if op_name else "", flops=flops, kernel=kernel,
                          dots=len(dots), convs=sum(i["op"] == "convolution" for _, i in dots))
    return info


def busy_time_ms(events: list[dict]) -> float:
    """Length of the union of the events' [ts, ts + dur] intervals (trace microseconds), in ms."""
    total, end = 0.0, None
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if end is None or start > end:
            total, end = total + (stop - start), stop
        elif stop > end:
            total, end = total + (stop - end), stop
    return total / 1e3


def group(i: dict) -> tuple[str, str, str]:
    if i["kernel"].startswith("imm_attention"):
        return ("backward" if i["kernel"].endswith("backward") else "forward"), "attn/core", "attention kernel"
    direction = "backward" if "transpose(" in i["op_name"] else "forward"
    layer = next((key for key in LAYERS if f"/{key}/" in i["op_name"] or i["op_name"].endswith(f"/{key}")), "other")
    kind = ("dense kernel" if i["kernel"] == "imm_matmul" else "conv kernel" if i["kernel"] == "imm_conv2d"
            else "conv" if i["convs"] else "dot" if i["dots"]
            else "copy" if i["op"] == "copy" else "elementwise/other")
    return direction, layer if kind in ("dot", "conv", "dense kernel", "conv kernel") else "-", kind


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit_s2", choices=["dit_s2", "ddpmpp_narrow"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fused", action="store_true")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the traced one")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "trace_step.json"))
    args = p.parse_args()
    common.setup(1)
    import jax
    import train_step as ts_bench

    run, compiled, _ = ts_bench.compiled_step(args.model, args.batch, args.fused)
    info = parse_hlo(compiled.as_text())
    for _ in range(args.warmup):
        run()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            run()
            step_s = time.perf_counter() - t0
            page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0.ru_minflt
        trace = json.load(gzip.open(glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.defaultdict(lambda: dict(ms=0.0, gflop=0.0, ops=0))
    for e in events:
        if e.get("ph") == "X" and e["name"] in info:
            g = totals[group(info[e["name"]])]
            g["ms"] += e["dur"] / 1e3
            g["gflop"] += info[e["name"]]["flops"] / 1e9
            g["ops"] += 1
    op_ms = sum(g["ms"] for g in totals.values())
    busy_ms = busy_time_ms([e for e in events if e.get("ph") == "X" and e["name"] in info])
    rows = [dict(direction=k[0], layer=k[1], kind=k[2], ms=g["ms"], share=g["ms"] / op_ms, ops=g["ops"],
                 gflop=g["gflop"], gflop_s=g["gflop"] / (g["ms"] / 1e3) if g["gflop"] else None)
            for k, g in sorted(totals.items(), key=lambda kv: -kv[1]["ms"])]
    print(f"traced step {step_s:.2f} s ({page_faults} page faults); operation times sum to {op_ms / 1e3:.2f} s, "
          f"at least one operation runs during {busy_ms / 1e3:.2f} s: {(op_ms - busy_ms) / 1e3:.2f} s of operation "
          "time ran concurrently with other operations (each then gets part of the cores, so its GFLOP/s reads low)")
    common.print_table(rows, ["direction", "layer", "kind", "ms", "share", "ops", "gflop", "gflop_s"])
    common.write_json(args.out, dict(machine=common.machine(), command=" ".join(sys.argv), model=args.model,
                                     step_s=step_s, op_ms=op_ms, busy_ms=busy_ms, page_faults=page_faults,
                                     rows=rows))


if __name__ == "__main__":
    main()
