"""Feature statistics, Frechet Inception Distance and Kernel Inception Distance (NumPy, float64).

FID(a, b) = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})
KID(a, b) = unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable

import numpy as np


@dataclasses.dataclass
class Stats:
    """Gaussian statistics of n feature vectors: mu (d,) and sigma (d, d) float64 (unbiased covariance)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_space: str = ""

    def __iter__(self):
        # `mu, sigma = compute_stats(...)` unpacks like a (mu, sigma) pair.
        return iter((self.mu, self.sigma))

    def save(self, path: str) -> None:
        """Write an .npz with keys mu, sigma, n, feature_space."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(path, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), feature_space=np.array(self.feature_space))

    @classmethod
    def load(cls, path: str) -> "Stats":
        with np.load(path) as f:
            missing = {"mu", "sigma"} - set(f.files)
            if missing:
                raise ValueError(f"{path} is not a statistics file (missing {sorted(missing)}; has {f.files}). "
                                 "Make one with `python -m imm_jax.evaluation stats --images X.npz --out stats.npz`")
            n = int(f["n"]) if "n" in f.files else -1
            space = str(f["feature_space"]) if "feature_space" in f.files else ""
            return cls(np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64), n, space)


class StatsAccumulator:
    """Streaming mean and covariance of feature batches, in float64.

    Sums are taken about a fixed shift (the first batch's mean) so that the covariance does not lose
    precision to cancellation when the mean is large relative to the spread.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2:
            raise ValueError(f"features must be (n, d), got {feats.shape}")
        if feats.shape[0] == 0:
            return
        if self._shift is None:
            d = feats.shape[1]
            self._shift = feats.mean(axis=0)
            self._sum = np.zeros(d)
            self._outer = np.zeros((d, d))
        elif feats.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dim changed from {self._shift.shape[0]} to {feats.shape[1]}")
        c = feats - self._shift
        self._sum += c.sum(axis=0)
        self._outer += c.T @ c
        self.n += feats.shape[0]

    def result(self, feature_space: str = "") -> Stats:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mean_c = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mean_c, mean_c)) / (self.n - 1)
        sigma = 0.5 * (sigma + sigma.T)
        return Stats(self._shift + mean_c, sigma, self.n, feature_space)


def stats_from_features(feats: np.ndarray, feature_space: str = "") -> Stats:
    acc = StatsAccumulator()
    acc.update(feats)
    return acc.result(feature_space)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix (eigendecomposition; tiny
    negative eigenvalues from round-off are clipped to 0). Returns a symmetric PSD matrix r with r @ r = a."""
    a = np.asarray(a, np.float64)
    _check_square(a, "a")
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((s1 s2)^{1/2}) for symmetric PSD s1, s2.

    The eigenvalues of s1 s2 are real and non-negative (it is similar to s1^{1/2} s2 s1^{1/2}), and they are
    the squared singular values of s1^{1/2} s2^{1/2}; so the trace is that product's nuclear norm. Taking
    singular values of the product (not square roots of eigenvalues) keeps round-off in the null space at
    eps-level instead of sqrt(eps)-level, and never produces complex parts or NaNs for singular covariances
    (fewer samples than dimensions), where a general sqrtm of s1 s2 struggles.
    """
    s1 = np.asarray(s1, np.float64)
    s2 = np.asarray(s2, np.float64)
    _check_square(s1, "s1")
    _check_square(s2, "s2")
    if s1.shape != s2.shape:
        raise ValueError(f"covariances differ in shape: {s1.shape} vs {s2.shape}")
    return float(np.linalg.svd(sqrtm_psd(s1) @ sqrtm_psd(s2), compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be equal-length vectors, got {mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    tr = np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + tr)


def as_stats(stats) -> Stats:
    """Stats from a Stats, an .npz path, or a (mu, sigma) pair."""
    if isinstance(stats, Stats):
        return stats
    if isinstance(stats, (str, os.PathLike)):
        return Stats.load(os.fspath(stats))
    if isinstance(stats, (tuple, list)) and len(stats) == 2:
        mu, sigma = (np.asarray(s, np.float64) for s in stats)
        return Stats(mu, sigma, -1)
    raise TypeError(f"expected Stats, an .npz path or a (mu, sigma) pair, got {type(stats).__name__}")


def fid(stats_a, stats_b, *, allow_mismatch: bool = False) -> float:
    """FID between two sets of statistics (Stats, .npz paths, or (mu, sigma) pairs). Refuses stats from
    different feature spaces (weights or preprocessing) unless allow_mismatch: such FIDs are meaningless."""
    a, b = as_stats(stats_a), as_stats(stats_b)
    if a.feature_space and b.feature_space and a.feature_space != b.feature_space and not allow_mismatch:
        raise ValueError(f"statistics come from different feature spaces ({a.feature_space!r} vs "
                         f"{b.feature_space!r}); recompute one of them with the same extractor settings")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for rows of x (n, d) and y (m, d) -> (n, m) float64."""
    d = x.shape[1]
    return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel: off-diagonal means of k(x,x), k(y,y), minus 2 mean k(x,y)."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("unbiased MMD needs at least 2 samples per set")
    kxx = polynomial_kernel(x, x)
    kyy = polynomial_kernel(y, y)
    kxy = polynomial_kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kid(feats_a: np.ndarray, feats_b: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over `num_subsets` random subsets of
    min(subset_size, n_a, n_b) vectors drawn without replacement from each set."""
    feats_a = np.asarray(feats_a)
    feats_b = np.asarray(feats_b)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d, got {feats_a.shape} and {feats_b.shape}")
    m = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(feats_a[rng.choice(feats_a.shape[0], m, replace=False)],
                          feats_b[rng.choice(feats_b.shape[0], m, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def compute_stats(images: np.ndarray | Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]], *,
                  extractor=None, total: int | None = None, progress: bool = True) -> Stats:
    """Inception statistics of uint8 images: an (N, H, W, C) array, an iterable of such batches, or a
    callable returning one. `extractor` defaults to a new FeatureExtractor() (installed weights)."""
    from imm_jax.evaluation.features import FeatureExtractor, batches_of
    extractor = extractor or FeatureExtractor()
    if total is None and isinstance(images, np.ndarray):
        total = images.shape[0]
    acc = StatsAccumulator()
    for feats in extractor.iter_features(batches_of(images), total=total, progress=progress):
        acc.update(feats)
    return acc.result(extractor.name)


def _check_square(a: np.ndarray, name: str) -> None:
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {a.shape}")


def cached_stats(cache_path: str, images, *, extractor=None, progress: bool = True) -> Stats:
    """Statistics of `images` (see compute_stats), cached at `cache_path` (.npz).

    Loads the cache when it exists and was made in the same feature space (weights + preprocessing) as
    `extractor`; otherwise computes the statistics and writes the cache. `images` may be a callable so that
    the dataset is only read when the cache is missing.
    """
    from imm_jax.evaluation.features import FeatureExtractor
    extractor = extractor or FeatureExtractor()
    if os.path.isfile(cache_path):
        stats = Stats.load(cache_path)
        if stats.feature_space == extractor.name:
            return stats
    stats = compute_stats(images, extractor=extractor, progress=progress)
    stats.save(cache_path)
    return stats


class FIDEvaluator:
    """FID (and optionally KID) of image batches against fixed reference statistics, e.g. during training.

    Holds one FeatureExtractor, so the Inception program compiles once per image shape and is reused.
    `evaluator(images_uint8)` -> {"fid": float, "n": int}.
    """

    def __init__(self, ref, *, extractor=None, weights_path: str | None = None, batch_size: int = 64):
        from imm_jax.evaluation.features import FeatureExtractor
        self.extractor = extractor or FeatureExtractor(weights_path, batch_size=batch_size)
        self.ref = as_stats(ref)
        if self.ref.feature_space and self.ref.feature_space != self.extractor.name:
            raise ValueError(f"reference statistics were made in feature space {self.ref.feature_space!r}, "
                             f"the extractor is {self.extractor.name!r}; recompute them with the same settings")

    def __call__(self, images: np.ndarray, *, progress: bool = False) -> dict:
        stats = stats_from_features(self.extractor(images, progress=progress), self.extractor.name)
        return {"fid": fid(stats, self.ref), "n": stats.n}
