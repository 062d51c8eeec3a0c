"""GaussianDetector against scikit-learn's covariance estimators."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.covariance import EmpiricalCovariance, LedoitWolf, ShrunkCovariance

from skanomaly import GaussianDetector


def _data(n=60, d=5, seed=0, loc=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + loc


@pytest.mark.parametrize(
    "shrinkage, reference",
    [
        (None, EmpiricalCovariance()),
        ("ledoit-wolf", LedoitWolf()),
        (0.0, ShrunkCovariance(shrinkage=0.0)),
        (0.3, ShrunkCovariance(shrinkage=0.3)),
        (1.0, ShrunkCovariance(shrinkage=1.0)),
    ],
)
@pytest.mark.parametrize("loc", [0.0, 1e3])
def test_matches_sklearn_covariance_estimators(shrinkage, reference, loc, device):
    X, Xq = _data(loc=loc), _data(n=20, seed=1, loc=loc)
    det = GaussianDetector(shrinkage=shrinkage, device=device).fit(X)
    reference.fit(X)
    np.testing.assert_allclose(det.location_, reference.location_, rtol=1e-12)
    np.testing.assert_allclose(det.covariance_, reference.covariance_, rtol=1e-9, atol=1e-9)
    # score_samples is minus the squared Mahalanobis distance, as EllipticEnvelope's.
    np.testing.assert_allclose(det.score_samples(Xq), -reference.mahalanobis(Xq), rtol=1e-8)
    if shrinkage == "ledoit-wolf":
        np.testing.assert_allclose(det.shrinkage_, reference.shrinkage_, rtol=1e-9)


@pytest.mark.parametrize("n, d", [(10, 30), (200, 1), (50, 8)])
def test_ledoit_wolf_shapes(n, d):
    # n < d (shrinkage keeps the estimate invertible) and d == 1 (shrinkage is 0).
    X = np.random.default_rng(3).normal(size=(n, d)) * np.linspace(1, 3, d)
    det = GaussianDetector(shrinkage="ledoit-wolf", device="cpu").fit(X)
    ref = LedoitWolf().fit(X)
    np.testing.assert_allclose(det.shrinkage_, ref.shrinkage_, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(det.score_samples(X), -ref.mahalanobis(X), rtol=1e-7)


def test_reg_adds_a_ridge():
    X, Xq = _data(n=40), _data(n=10, seed=2)
    det = GaussianDetector(shrinkage=None, reg=0.5, device="cpu").fit(X)
    precision = np.linalg.inv(np.cov(X, rowvar=False, bias=True) + 0.5 * np.eye(X.shape[1]))
    v = Xq - X.mean(0)
    np.testing.assert_allclose(-det.score_samples(Xq), np.einsum("ni,ij,nj->n", v, precision, v),
                               rtol=1e-10)
    np.testing.assert_allclose(det.covariance_cholesky_ @ det.covariance_cholesky_.T,
                               det.covariance_ + 0.5 * np.eye(X.shape[1]), rtol=1e-12)


@pytest.mark.parametrize("make_singular", [
    lambda X: np.column_stack([X, X[:, 0] + 2 * X[:, 1]]),  # collinear
    lambda X: np.column_stack([X, np.full(len(X), 3.0)]),  # constant feature
    lambda X: X[:4],  # n_samples <= n_features
])
def test_singular_data_raises_and_shrinkage_or_reg_fix_it(make_singular):
    X = make_singular(_data(n=30, d=4))
    with pytest.raises(ValueError, match="singular.*shrinkage"):
        GaussianDetector(shrinkage=None, device="cpu").fit(X)
    for det in (GaussianDetector(shrinkage=None, reg=1e-3), GaussianDetector()):
        scores = det.set_params(device="cpu").fit(X).score_samples(X)
        assert np.isfinite(scores).all()


@settings(max_examples=20)
@given(cuts=st.lists(st.integers(7, 59), max_size=4, unique=True),
       shrinkage=st.sampled_from([None, "ledoit-wolf", 0.2]))
def test_partial_fit_equals_fit(cuts, shrinkage):
    X = _data(n=60, d=5, loc=50.0)
    whole = GaussianDetector(shrinkage=shrinkage, device="cpu").fit(X)
    part = GaussianDetector(shrinkage=shrinkage, device="cpu")
    for batch in np.split(X, sorted(cuts)):
        part.partial_fit(batch)
    assert part.n_samples_seen_ == len(X)
    np.testing.assert_allclose(part.location_, whole.location_, rtol=1e-13)
    np.testing.assert_allclose(part.covariance_, whole.covariance_, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(part.shrinkage_, whole.shrinkage_, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(part.score_samples(X), whole.score_samples(X), rtol=1e-9)
    # offset_ comes from the leave-one-out scores of the last batch under the updated
    # model: the rows of the whole fit's leave-one-out scores that belong to that batch.
    expected = np.percentile(-whole._leave_one_out(torch.from_numpy(batch)).numpy(),
                             100 * part.contamination)
    assert part.offset_ == pytest.approx(expected, rel=1e-9)
    if len(batch) == len(X):
        assert part.offset_ == pytest.approx(whole.offset_, rel=1e-9)


def test_single_partial_fit_is_fit():
    X = _data()
    a = GaussianDetector(device="cpu").fit(X)
    b = GaussianDetector(device="cpu").partial_fit(X)
    assert a.offset_ == b.offset_
    np.testing.assert_array_equal(a.covariance_, b.covariance_)


def test_failed_partial_fit_leaves_state_unchanged():
    X = _data(n=30, d=4)
    det = GaussianDetector(device="cpu").fit(X)
    before = {k: np.copy(v) for k, v in vars(det).items() if k.endswith("_")}
    with pytest.raises(ValueError, match="4 features"):
        det.partial_fit(X[:, :3])
    after = {k: v for k, v in vars(det).items() if k.endswith("_")}
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])

    fresh = GaussianDetector(shrinkage=None, device="cpu")
    with pytest.raises(ValueError, match="at least 2"):
        fresh.partial_fit(X[:1])
    with pytest.raises(ValueError, match="singular"):
        fresh.partial_fit(X[:3])  # 3 samples, 4 features
    assert not hasattr(fresh, "n_samples_seen_")
    fresh.partial_fit(X)
    np.testing.assert_array_equal(
        fresh.covariance_, GaussianDetector(shrinkage=None, device="cpu").fit(X).covariance_)


def test_float32_and_tensor_input_agree_with_float64():
    X = _data()
    ref = GaussianDetector(device="cpu").fit(X).score_samples(X)
    det32 = GaussianDetector(device="cpu").fit(X.astype(np.float32))
    assert det32.covariance_.dtype == np.float64
    np.testing.assert_allclose(det32.score_samples(X.astype(np.float32)), ref, rtol=1e-4)
    det_t = GaussianDetector(device="cpu").fit(torch.from_numpy(X))
    np.testing.assert_allclose(det_t.score_samples(torch.from_numpy(X)), ref, rtol=1e-12)


@pytest.mark.parametrize("shrinkage, reg", [(None, 0.0), (0.3, 0.1), ("ledoit-wolf", 0.0)])
def test_offset_is_the_quantile_of_leave_one_out_refits(shrinkage, reg):
    # Reference: refit without each sample (shrinkage intensity and target held at the
    # full-data values, as documented) and score the sample left out.
    X = _data(n=30, d=3)
    contamination = 0.2
    det = GaussianDetector(shrinkage=shrinkage, reg=reg, contamination=contamination,
                           device="cpu").fit(X)
    s, target = det.shrinkage_, np.trace(np.cov(X, rowvar=False, bias=True)) / 3
    loo = []
    for i in range(len(X)):
        rest = np.delete(X, i, axis=0)
        c = (1 - s) * np.cov(rest, rowvar=False, bias=True) + (s * target + reg) * np.eye(3)
        r = X[i] - rest.mean(0)
        loo.append(r @ np.linalg.solve(c, r))
    assert det.calibration_ == "leave-one-out"
    assert det.offset_ == pytest.approx(np.percentile(-np.array(loo), 100 * contamination),
                                        rel=1e-10)
