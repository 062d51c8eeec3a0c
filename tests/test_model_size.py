"""A model file the size of the model: one copy of what scoring needs, streaming state on request.

References: the bits of the unsaved detector's scores (scores must not change), numpy's
triangles and covariance, and hand counts of the numbers a PaDiM model holds.
"""

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)
from skanomaly.persistence import load_model, save_model
from skanomaly.functional._packing import PackedMatrices

from _streams import correlated_vectors, low_rank_maps

warnings.filterwarnings("ignore", message=".*too few.*")


_maps = functools.partial(low_rank_maps, h=3, w=3)
_vectors = functools.partial(correlated_vectors, d=6)


CASES = {
    "padim": (lambda: PaDiMDetector(n_features=5, random_state=0, device="cpu"), _maps),
    "gaussian": (lambda: GaussianDetector(device="cpu"), _vectors),
    "patchcore": (lambda: PatchCoreDetector(max_bank_size=40, random_state=0, device="cpu"),
                  _maps),
    "dfm": (lambda: DFMDetector(n_components=4, device="cpu"), _maps),
    "dfkde": (lambda: DFKDEDetector(n_components=3, max_training_points=30, random_state=0,
                                    device="cpu"), _vectors),
}
cases = pytest.mark.parametrize("name", list(CASES))


def _streamed(name):
    make, data = CASES[name]
    det = make()
    for batch in np.split(data(60), [25]):
        det.partial_fit(batch)
    return det


# ------------------------------------------------------------- PackedMatrices
@pytest.mark.parametrize("keep, other", [("upper", "zero"), ("lower", "zero"),
                                         ("lower", "mirror"), ("upper", "mirror")])
def test_packed_matrices_give_back_the_same_bits(keep, other):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 30, 30))
    if other == "zero":
        a = np.triu(a) if keep == "upper" else np.tril(a)
    else:
        a = a + a.transpose(0, 2, 1)
    # entries that break the pattern: last-bit asymmetries, a -0.0, a stray value
    a[1, 2, 5] = np.nextafter(a[1, 2, 5], np.inf)
    a[2, 0, 29] = -0.0
    a[3, 29, 0] = 7.0
    packed = pickle.dumps(PackedMatrices(a, keep, other))
    back = pickle.loads(packed)
    assert isinstance(back, np.ndarray) and back.dtype == a.dtype
    np.testing.assert_array_equal(back.view(np.uint64), a.view(np.uint64))
    assert len(packed) < 0.55 * a.nbytes
    tensor = pickle.loads(pickle.dumps(PackedMatrices(torch.from_numpy(a), keep, other)))
    assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, torch.from_numpy(a))


def test_packed_matrices_store_whole_what_does_not_pack():
    a = np.random.default_rng(0).normal(size=(3, 8, 8))  # neither triangular nor symmetric
    back = pickle.loads(pickle.dumps(PackedMatrices(a, "upper", "zero")))
    np.testing.assert_array_equal(back, a)
    small = np.eye(2)[None]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(PackedMatrices(small, "upper",
                                                                           "zero"))), small)


# ----------------------------------------------------------------------- PaDiM
def test_padim_keeps_one_factor_and_derives_the_covariance():
    X = _maps(40)
    det = PaDiMDetector(n_features=5, random_state=0, device="cpu").fit(X)
    big = {k for k, v in vars(det).items() if isinstance(v, np.ndarray) and v.ndim == 3}
    assert big == {"precision_cholesky_"}
    assert "_moments" not in vars(det)  # a one-shot fit keeps no scatter
    f = X[:, det.feature_indices_].reshape(40, 5, 9).transpose(2, 0, 1)
    reference = np.stack([np.cov(p, rowvar=False) for p in f])
    np.testing.assert_allclose(det.covariance_, reference, rtol=1e-8, atol=1e-12)
    streamed = PaDiMDetector(n_features=5, random_state=0, device="cpu").partial_fit(X)
    assert "_moments" in vars(streamed)  # a stream keeps its exact moments
    np.testing.assert_allclose(streamed.covariance_, reference, rtol=1e-10)
    compact = streamed._without_streaming_state()
    assert "_moments" not in vars(compact) and "_moments" in vars(streamed)
    np.testing.assert_allclose(compact.covariance_, reference, rtol=1e-8, atol=1e-12)
    assert not hasattr(PaDiMDetector(), "covariance_")


def test_padim_fit_continues_as_a_stream_from_its_factors():
    X, more, Q = _maps(40), _maps(25, seed=4), _maps(6, seed=5)
    det = PaDiMDetector(n_features=5, random_state=0, device="cpu").fit(X)
    det.partial_fit(more)
    whole = PaDiMDetector(n_features=5, random_state=0, device="cpu").fit(
        np.concatenate([X, more]))
    assert det.n_samples_seen_ == 65
    np.testing.assert_allclose(det.mean_, whole.mean_, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(det.covariance_, whole.covariance_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(det.score_samples(Q), whole.score_samples(Q), rtol=1e-8)


def test_padim_pickle_holds_the_triangle_of_its_factor():
    X = _maps(40, c=40, h=4, w=4)
    det = PaDiMDetector(n_features=30, random_state=0, device="cpu").fit(X)
    p, d = 16, 30
    compact = pickle.dumps(det._without_streaming_state())
    numbers = p * d * (d + 1) // 2 + p * d  # packed factor and means
    assert numbers * 8 <= len(compact) < numbers * 8 + 20_000
    whole = pickle.dumps(det)  # a fit keeps no moments: little beyond the factor
    assert len(whole) < 2.6 * numbers * 8
    Q = _maps(7, seed=3, c=40, h=4, w=4)
    np.testing.assert_array_equal(pickle.loads(compact).score_samples(Q), det.score_samples(Q))
    np.testing.assert_array_equal(pickle.loads(compact).anomaly_map(Q), det.anomaly_map(Q))


# --------------------------------------------------------- every detector
@cases
def test_without_streaming_state_scores_the_same_and_refuses_partial_fit(name):
    det = _streamed(name)
    make, data = CASES[name]
    Q = data(9, seed=5)
    det.finalize()  # partial_fit deferred the refresh: saving would do it (see below)
    before = {k: v for k, v in vars(det).items() if k != "_device_cache"}
    compact = pickle.loads(pickle.dumps(det._without_streaming_state()))
    assert vars(det).keys() - {"_device_cache"} == before.keys()  # det is untouched
    assert not set(det._streaming_state) & set(vars(compact))
    np.testing.assert_array_equal(compact.score_samples(Q), det.score_samples(Q))
    assert compact.offset_ == det.offset_
    with pytest.raises(ValueError, match="saved without its streaming state"):
        compact.partial_fit(data(10, seed=6))
    compact.fit(data(30, seed=7))  # a new fit starts afresh and streams again
    compact.partial_fit(data(10, seed=6))


@cases
def test_partial_fit_after_a_round_trip_with_the_streaming_state(name):
    make, data = CASES[name]
    a, b = _streamed(name), pickle.loads(pickle.dumps(_streamed(name)))
    more, Q = data(20, seed=8), data(9, seed=5)
    a.partial_fit(more)
    b.partial_fit(more)
    np.testing.assert_array_equal(a.score_samples(Q), b.score_samples(Q))
    assert a.offset_ == b.offset_


@pytest.mark.parametrize("keep", [False, True])
def test_save_model_leaves_out_the_streaming_state_unless_asked(keep, tmp_path):
    X = _maps(40, c=20, h=4, w=4)
    model = make_pipeline(FunctionTransformer(),
                          PaDiMDetector(n_features=16, random_state=0, device="cpu"))
    model.fit(X[:20])
    model[-1].partial_fit(X[20:])
    path = tmp_path / "m.skanomaly"
    meta = save_model(model, path, image_size=32, keep_streaming_state=keep)
    assert meta["streaming_state"] is keep and "_moments" in vars(model[-1])
    loaded, meta = load_model(path)
    assert meta["streaming_state"] is keep
    Q = _maps(5, seed=2, c=20, h=4, w=4)
    np.testing.assert_array_equal(loaded.score_samples(Q), model.score_samples(Q))
    more = _maps(10, seed=9, c=20, h=4, w=4)
    if keep:
        loaded[-1].partial_fit(more)
        model[-1].partial_fit(more)
        np.testing.assert_array_equal(loaded.score_samples(Q), model.score_samples(Q))
    else:
        with pytest.raises(ValueError, match="keep_streaming_state=True"):
            loaded[-1].partial_fit(more)


def test_gaussian_covariance_is_derived_not_stored():
    from sklearn.covariance import LedoitWolf

    X = _vectors(80)
    det = GaussianDetector(reg=0.5, device="cpu").fit(X)
    assert "covariance_" not in vars(det)
    reference = LedoitWolf().fit(X).covariance_
    np.testing.assert_allclose(det.covariance_, reference, rtol=1e-9, atol=1e-12)
    compact = pickle.loads(pickle.dumps(det._without_streaming_state()))
    np.testing.assert_allclose(compact.covariance_, reference, rtol=1e-8, atol=1e-12)
    assert not hasattr(GaussianDetector(), "covariance_")


def test_copies_keep_plain_arrays():
    """copy.copy hands __getstate__'s objects over unpickled: no packed wrapper leaks."""
    import copy

    X = _maps(30)
    det = _streamed("padim")
    for twin in (copy.copy(det), copy.deepcopy(det)):
        assert type(twin.precision_cholesky_) is np.ndarray
        assert type(twin._moments.scatter) is torch.Tensor
        np.testing.assert_array_equal(twin.score_samples(X), det.score_samples(X))
        np.testing.assert_array_equal(twin._moments.scatter, det._moments.scatter)
