"""A sample's scores do not depend on the batch it is scored in: bitwise.

Each sample is scored alone (the reference), then in random batches and orders drawn by
hypothesis; ``score_samples``, ``decision_function``, ``predict`` and ``anomaly_map``
(at feature resolution and upsampled) must return the very same bits.
"""

import functools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)
from skanomaly import base

N_QUERIES = 23


NAMES = ["gaussian", "padim", "padim-woodbury", "patchcore", "dfm", "dfkde"]


@functools.lru_cache(maxsize=None)
def _case(name):
    """(fitted detector, queries, outputs of each query scored alone)."""
    detector, X = _fitted(name)
    return detector, X, _alone(detector, X)


def _fitted(name):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(60, 6, 4, 4)).astype(np.float32)
    vectors = rng.normal(size=(120, 5)) @ rng.normal(size=(5, 5))
    queries_maps = rng.normal(size=(N_QUERIES, 6, 4, 4)).astype(np.float32)
    queries_vectors = rng.normal(size=(N_QUERIES, 5)) * 1.5
    common = dict(device="cpu")
    make = {
        "gaussian": lambda: (GaussianDetector(**common).fit(vectors), queries_vectors),
        "padim": lambda: (PaDiMDetector(random_state=0, **common).fit(maps), queries_maps),
        "padim-woodbury": lambda: (PaDiMDetector(random_state=0, **common).fit(maps[:5]),
                                   queries_maps),
        "patchcore": lambda: (PatchCoreDetector(random_state=0, **common).fit(maps),
                              queries_maps),
        "dfm": lambda: (DFMDetector(pooling_kernel_size=2, **common).fit(maps), queries_maps),
        "dfkde": lambda: (DFKDEDetector(random_state=0, **common).fit(vectors),
                          queries_vectors),
    }
    return make[name]()


def _outputs(detector, X):
    out = {
        "score_samples": detector.score_samples(X),
        "decision_function": detector.decision_function(X),
        "predict": detector.predict(X),
    }
    if hasattr(detector, "anomaly_map"):
        out["anomaly_map"] = detector.anomaly_map(X)
        out["anomaly_map_upsampled"] = detector.anomaly_map(X, output_size=12, sigma=1.5)
    return out


def _alone(detector, X):
    """Outputs of each sample scored on its own, stacked."""
    singles = [_outputs(detector, X[i : i + 1]) for i in range(len(X))]
    return {k: np.concatenate([s[k] for s in singles]) for k in singles[0]}


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(data=st.data())
def test_scores_are_bitwise_batch_invariant(name, data):
    detector, X, alone = _case(name)
    order = data.draw(st.permutations(range(len(X))))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(X) - 1), max_size=4)))
    shuffled = X[np.array(order)]
    pieces = [_outputs(detector, part) for part in np.split(shuffled, cuts)]
    for key, expected in alone.items():
        got = np.concatenate([p[key] for p in pieces])
        np.testing.assert_array_equal(got, expected[np.array(order)], err_msg=key)


@pytest.mark.parametrize("name", ["gaussian", "padim", "dfm"])
def test_many_fixed_blocks_are_invariant_too(name):
    # force several scoring blocks (and a padded last one) on a small batch
    detector, X = _fitted(name)
    with mock.patch.object(base, "_BLOCK_NUMBERS", 1), mock.patch.object(base, "_MIN_BLOCK", 2):
        assert detector._block_size() == 2
        whole = _outputs(detector, X)
        singles = _alone(detector, X)
    for key in whole:
        np.testing.assert_array_equal(whole[key], singles[key], err_msg=key)
