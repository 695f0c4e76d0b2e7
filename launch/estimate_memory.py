"""Per-device memory estimate for the ImageNet-256 DiT configs (the table in launch/README.md).

    python launch/estimate_memory.py            # CPU is fine: nothing is executed, only compiled

State (exact, from jax.eval_shape param counts): params + grads + Adam (m, v) + one EMA copy per decay,
all float32, replicated per device (mesh.fsdp = 1) or divided by the fsdp axis size.
Activations (estimate): the IMM training step (loss + grad, online pass and stop-gradient target pass)
of DiT-S/2 is compiled on CPU at two batch sizes and XLA's memory_analysis() temp size gives bytes per
sample; other sizes scale it by depth * hidden (all /2 models have 256 tokens). A reduced-depth XL/2 is
compiled too, to check the scaling. GPU/TPU compilers fuse differently, so treat the result as a guide.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1024 ** 3
VARIANTS = ("S/2", "B/2", "L/2", "XL/2")


REMAT = False


def _config(variant, **overrides):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "imagenet256", os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet256.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(f"variant={variant}")
    config.model.remat = REMAT
    for k, v in overrides.items():
        setattr(config.model, k, v)
    return config


def _abstract(config, batch):
    from imm_jax import networks
    net = networks.build(config.model)
    s = config.model.image_size
    x = jax.ShapeDtypeStruct((batch, s, s, config.model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(lambda k: net.init(k, jnp.zeros(x.shape), jnp.zeros(t.shape), jnp.zeros(t.shape),
                                               jnp.zeros(y.shape, jnp.int32))["params"], jax.random.key(0))
    return net, params, x, y


def param_count(variant):
    _, params, _, _ = _abstract(_config(variant), 4)
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def step_temp_bytes(config, batch):
    """XLA temp bytes of one compiled IMM loss+grad step at `batch` (CPU compile)."""
    from imm_jax.core import losses
    net, params, x, y = _abstract(config, batch)
    objective = losses.IMMObjective.from_config(config.imm, num_classes=int(config.model.num_classes))

    def step(p, x, y, key):
        return jax.value_and_grad(lambda p: losses.imm_loss(net, p, x, y, key, objective=objective)[0])(p)

    key = jax.eval_shape(lambda: jax.random.key(0))
    compiled = jax.jit(step).lower(params, x, y, key).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs=2, default=(8, 16))
    p.add_argument("--num_ema", type=int, default=2, help="EMA copies (configs/imagenet256.py keeps 2)")
    p.add_argument("--remat", action="store_true", help="measure with model.remat=True")
    args = p.parse_args()
    global REMAT
    REMAT = args.remat
    b1, b2 = args.batches

    base = _config("S/2")
    t1, t2 = step_temp_bytes(base, b1), step_temp_bytes(base, b2)
    per_sample_s = (t2 - t1) / (b2 - b1)
    fixed = t1 - b1 * per_sample_s
    print(f"DiT-S/2{' (remat)' if REMAT else ''} IMM step temp: batch {b1}: {t1 / 2**20:.1f} MiB, batch {b2}: {t2 / 2**20:.1f} MiB "
          f"-> {per_sample_s / 2**20:.2f} MiB/sample + {fixed / 2**20:.1f} MiB")
    from imm_jax.networks import dit
    dims = {v: (dit.resolve_dims(_config(v).model)["depth"], dit.resolve_dims(_config(v).model)["hidden_size"])
            for v in VARIANTS}
    ds, hs = dims["S/2"]

    # Check the depth*hidden scaling on a 2-block XL/2 (XL width and heads).
    xl2 = _config("XL/2", depth=2)
    c1, c2 = step_temp_bytes(xl2, b1), step_temp_bytes(xl2, b2)
    measured = (c2 - c1) / (b2 - b1)
    predicted = per_sample_s * (2 * dims["XL/2"][1]) / (ds * hs)
    print(f"scaling check, XL/2 with depth 2: measured {measured / 2**20:.2f} MiB/sample, "
          f"predicted {predicted / 2**20:.2f} MiB/sample (ratio {measured / predicted:.2f})")

    print("\n| model | params | state (params+grads+Adam+%d EMA, fp32) | activations / sample (fp32 est.) |"
          " max batch/device at 16 / 32 / 80 GiB |" % args.num_ema)
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        n = param_count(v)
        state = 4 * n * (1 + 1 + 2 + args.num_ema)
        d, h = dims[v]
        act = per_sample_s * (d * h) / (ds * hs)
        fits = []
        for cap in (16, 32, 80):
            free = 0.9 * cap * GIB - state - max(fixed, 0.0)  # 10% headroom
            fits.append(str(max(0, int(free // act) // 4 * 4)) if free > 0 else "0")
        print(f"| {v} | {n / 1e6:.2f}M | {state / GIB:.2f} GiB | {act / 2**20:.1f} MiB | {' / '.join(fits)} |")


if __name__ == "__main__":
    main()
