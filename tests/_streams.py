"""Seeded data for the streaming tests (test_partial_fit, test_deferred_refresh,
test_model_size): shared so that the three files fit the same kind of data."""

import numpy as np


def low_rank_maps(n, seed=0, c=6, h=4, w=4):
    """(n, c, h, w) feature maps near a 4-dimensional subspace, plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, c * h * w))
    return (rng.normal(size=(n, 4)) @ basis + 0.3 * rng.normal(size=(n, c * h * w))).reshape(
        n, c, h, w)


def correlated_vectors(n, seed=0, d=8):
    """(n, d) correlated vectors with mean 2."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 2.0
