"""partial_fit defers the refresh of factors, memory bank and threshold to the first read.

References: the same stream refreshed after every batch (``finalize``: the eager model of
the moment detectors, bitwise), the one-shot fit (numpy and scikit-learn), and model files
and pickles taken while a refresh is pending.
"""

import pickle

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)
from skanomaly.persistence import load_model, save_model

from _streams import correlated_vectors, low_rank_maps


_maps, _vectors = low_rank_maps, correlated_vectors


CASES = {
    "gaussian": (lambda: GaussianDetector(device="cpu"), _vectors),
    "padim": (lambda: PaDiMDetector(n_features=4, random_state=0, device="cpu"), _maps),
    "patchcore": (lambda: PatchCoreDetector(max_bank_size=40, random_state=0, device="cpu"),
                  _maps),
    "dfm": (lambda: DFMDetector(n_components=5, pooling_kernel_size=2, device="cpu"), _maps),
    "dfkde": (lambda: DFKDEDetector(n_components=3, max_training_points=80, random_state=0,
                                    device="cpu"), _vectors),
}
cases = pytest.mark.parametrize("name", list(CASES))


def _stream(det, X, n_batches, finalize=False):
    for batch in np.array_split(X, n_batches):
        det.partial_fit(batch)
        if finalize:
            det.finalize()
    return det


@pytest.mark.parametrize("name", ["gaussian", "padim"])
def test_moment_detectors_deferred_equal_eager_bitwise(name):
    make, data = CASES[name]
    X, Q = data(120), data(7, seed=1)
    lazy, eager = _stream(make(), X, 6), _stream(make(), X, 6, finalize=True)
    assert "_stale" in vars(lazy) and "_stale" not in vars(eager)
    for attr in (*lazy._deferred, "offset_", "calibration_", "covariance_"):
        np.testing.assert_array_equal(getattr(lazy, attr), getattr(eager, attr), err_msg=attr)
    np.testing.assert_array_equal(lazy.score_samples(Q), eager.score_samples(Q))


def test_gaussian_attributes_read_after_partial_fit_are_those_of_the_data_seen():
    X = _vectors(150, d=5)
    det = GaussianDetector(device="cpu").partial_fit(X[:50]).partial_fit(X[50:])
    reference = LedoitWolf(store_precision=False).fit(X)  # an independent estimate
    np.testing.assert_allclose(det.location_, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(det.covariance_, reference.covariance_, rtol=1e-10)
    assert det.shrinkage_ == pytest.approx(reference.shrinkage_, rel=1e-10)


@cases
def test_every_read_sees_the_model_of_every_batch(name):
    make, data = CASES[name]
    X, Q = data(120), data(7, seed=1)
    det = _stream(make(), X[:80], 4)
    assert det.n_samples_seen_ == 80  # kept up to date as the batches come
    first = det.score_samples(Q)  # refreshes
    det.partial_fit(X[80:])
    assert det.n_samples_seen_ == 120
    assert not np.array_equal(det.score_samples(Q), first)  # the last batch counts
    assert det.offset_ == det.finalize().offset_


@cases
def test_pickle_and_model_file_of_a_pending_refresh(name, tmp_path):
    make, data = CASES[name]
    X, Q = data(100), data(7, seed=1)
    det = _stream(make(), X, 5)
    twin = pickle.loads(pickle.dumps(det))
    saved = tmp_path / "model.skanomaly"
    save_model(make_pipeline(det), saved, image_size=4)  # compact: the model is read
    loaded = load_model(saved)[0][-1]
    expected = det.score_samples(Q)
    np.testing.assert_array_equal(twin.score_samples(Q), expected)
    np.testing.assert_array_equal(loaded.score_samples(Q), expected)
    assert twin.offset_ == loaded.offset_ == det.offset_


def test_finalize_on_an_unfitted_detector_raises_and_is_a_no_op_when_up_to_date():
    with pytest.raises(NotFittedError):
        GaussianDetector().finalize()
    det = GaussianDetector(device="cpu").fit(_vectors(40))
    before = dict(vars(det))
    assert det.finalize() is det and vars(det).keys() == before.keys()


def test_a_refresh_that_fails_leaves_the_stream_pending(monkeypatch):
    X = _vectors(60, d=6)
    det = GaussianDetector(device="cpu").partial_fit(X[:20]).partial_fit(X[20:40])
    with monkeypatch.context() as m:
        m.setattr(GaussianDetector, "_refresh_factors",
                  lambda self: (_ for _ in ()).throw(ValueError("late failure")))
        for _ in range(2):
            with pytest.raises(ValueError, match="late failure"):
                det.finalize()
            assert "_stale" in vars(det) and "offset_" not in vars(det)
    det.partial_fit(X[40:])
    reference = _stream(GaussianDetector(device="cpu"), X, 3)
    np.testing.assert_array_equal(det.score_samples(X[:5]), reference.score_samples(X[:5]))
    assert det.offset_ == reference.offset_
