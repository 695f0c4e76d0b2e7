"""Training steps per second of a config on this machine (used to turn a wall-clock budget into step counts).

    python bench/config_step_rate.py configs/fashion_mnist.py configs/fashion_mnist.py:fm --steps 150

Times `--steps` jitted train steps on a fixed random batch after 5 warm-up steps (compilation excluded).
"""
from __future__ import annotations

import argparse
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="config file[:arg]")
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    import jax
    import numpy as np
    from imm_jax import config_files
    from imm_jax.training import train
    for spec in args.configs:
        c = config_files.load(spec)
        tr = train.Trainer(c)
        state = tr.init()
        b, s, ch = int(c.data.batch_size), int(c.model.image_size), int(c.model.in_channels)
        rng = np.random.default_rng(0)
        batch = {"image": jax.device_put(rng.normal(size=(b, s, s, ch)).astype(np.float32), tr.batch_sharding),
                 "label": jax.device_put(np.arange(b, dtype=np.int32) % max(int(c.model.num_classes), 1),
                                         tr.batch_sharding)}
        for _ in range(5):
            state, m = tr.train_step(state, batch)
        jax.block_until_ready(m)
        t0 = time.time()
        for _ in range(args.steps):
            state, m = tr.train_step(state, batch)
        jax.block_until_ready(m)
        rate = args.steps / (time.time() - t0)
        print(f"{spec}: {rate:.2f} steps/s, {rate * b:.1f} img/s (batch {b})", flush=True)


if __name__ == "__main__":
    main()
