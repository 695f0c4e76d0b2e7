"""The whole method on a 2-D mixture: the library's IMM loss and pushforward sampler learn the flow map.

8 Gaussians on a ring (examples/toy2d.py), a small MLP, 3,000 Adam steps of batch 256 for each objective.
IMM's 1- and 2-step samples must be close to fresh data (sliced Wasserstein-1) and cover every mode; flow
matching's 1-step Euler sample (the conditional mean E[x | x_T]) must be far from it. The bounds
(`toy2d.BOUNDS`) hold for seeds 0-9 with a margin and break under each of several injected defects of the
loss (bench/toy_defects.py). Select with `pytest -k toy`.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


@pytest.fixture(scope="module")
def toy():
    import toy2d
    return toy2d


def test_toy_metrics_separate_data_from_collapse(toy):
    """The distances the bounds use: fresh data is near, a single blob at the centre and one mode are far."""
    import jax
    import numpy as np
    data = np.asarray(toy.sample_data(jax.random.PRNGKey(0), 2000))
    near = toy.evaluate(data)
    assert near["sw1"] < 0.03 and near["on_mode"] > 0.99 and near["min_share"] > 0.09
    blob = toy.evaluate(0.05 * np.random.default_rng(0).normal(size=(2000, 2)))
    assert blob["sw1"] > 0.3 and blob["on_mode"] == 0.0
    one_mode = toy.evaluate(np.repeat(toy.ring_modes()[:1], 2000, axis=0))
    assert one_mode["on_mode"] == 1.0 and one_mode["min_share"] == 0.0 and one_mode["sw1"] > 0.3


def test_toy_imm_few_step_samples_match_data_and_fm_one_step_does_not(toy):
    stats = toy.run_check(seed=0)
    assert toy.violations(stats) == [], stats
