"""PaDiMDetector against an independent per-position numpy computation."""

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skanomaly import PaDiMDetector
from skanomaly.detectors import padim
mahalanobis = importlib.import_module("skanomaly.functional.mahalanobis")


def _maps(n, c=10, h=3, w=4, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(c, c))  # correlated channels
    return np.einsum("nchw,dc->ndhw", rng.normal(size=(n, c, h, w)), mix) + 1e3  # far from 0


def _reference_maps(X_train, X_test, channels, reg):
    """Per-position np.cov(rowvar=False) + reg I, np.linalg.inv and the quadratic form."""
    out = np.empty((len(X_test), *X_train.shape[2:]))
    for h in range(X_train.shape[2]):
        for w in range(X_train.shape[3]):
            f = X_train[:, channels, h, w]
            precision = np.linalg.inv(np.cov(f, rowvar=False) + reg * np.eye(len(channels)))
            v = X_test[:, channels, h, w] - f.mean(0)
            out[:, h, w] = np.sqrt(np.einsum("ni,ij,nj->n", v, precision, v))
    return out


def _reference_leave_one_out(X_train, rows, channels, reg):
    """Image scores of ``X_train[rows]`` by PaDiM refitted without each of them (numpy)."""
    return np.array([_reference_maps(np.delete(X_train, i, axis=0), X_train[i : i + 1],
                                     channels, reg).max() for i in rows])


@pytest.mark.parametrize("solver", ["full", "woodbury"])
def test_offset_is_the_quantile_of_leave_one_out_refits(solver):
    X = _maps(12, c=4, h=2, w=3)
    det = PaDiMDetector(solver=solver, reg=0.5, contamination=0.2, device="cpu").fit(X)
    loo = _reference_leave_one_out(X, range(len(X)), det.feature_indices_, 0.5)
    assert det.calibration_ == "leave-one-out"
    assert det.offset_ == pytest.approx(np.percentile(-loo, 20), rel=1e-9)


@pytest.mark.parametrize("n, reg", [(30, 0.01), (30, 1.0), (30, 0.0), (4, 0.05)])
def test_fit_scores_every_image_by_its_largest_leave_one_out_distance(n, reg, monkeypatch):
    """The fit computes the exact leave-one-out distances only where the in-sample
    distances' bounds say an image's largest may be (none without a ridge): each
    image's score must still be its largest over every position (numpy refits)."""
    X = _maps(n, c=5, h=6, w=6, seed=3)
    seen = {}
    original = PaDiMDetector._set_offset

    def capture(self, scores, method):
        seen["scores"], seen["method"] = np.asarray(scores, dtype=np.float64), method
        return original(self, scores, method)

    monkeypatch.setattr(PaDiMDetector, "_set_offset", capture)
    det = PaDiMDetector(solver="full", reg=reg, device="cpu").fit(X)
    assert seen["method"] == det.calibration_ == "leave-one-out"
    reference = _reference_leave_one_out(X, range(n), det.feature_indices_, reg)
    np.testing.assert_allclose(seen["scores"], reference, rtol=1e-9)


@pytest.mark.parametrize(
    "n_train, solver, expected_solver",
    [(40, "auto", "full"), (6, "auto", "woodbury"), (40, "woodbury", "woodbury"),
     (6, "full", "full")],
)
def test_distances_match_numpy(n_train, solver, expected_solver, device):
    X, X_test = _maps(n_train), _maps(5, seed=1)
    det = PaDiMDetector(n_features=7, reg=0.05, solver=solver, random_state=0, device=device)
    det.fit(X)
    assert det.solver_ == expected_solver
    expected = _reference_maps(X, X_test, det.feature_indices_, 0.05)
    np.testing.assert_allclose(det.anomaly_map(X_test), expected, rtol=1e-9)
    # The image score is the maximum of the map; score_samples negates it.
    np.testing.assert_allclose(det.score_samples(X_test), -expected.max(axis=(1, 2)), rtol=1e-9)


def test_fitted_statistics_layout():
    X = _maps(30)
    det = PaDiMDetector(n_features=6, random_state=3, device="cpu").fit(X)
    h, w, ch = 1, 2, det.feature_indices_
    f = X[:, ch, h, w]
    position = h * X.shape[3] + w  # row-major over the (H, W) grid
    np.testing.assert_allclose(det.mean_[position], f.mean(0), rtol=1e-13)
    np.testing.assert_allclose(det.covariance_[position], np.cov(f, rowvar=False), rtol=1e-10)
    U = det.precision_cholesky_[position]
    np.testing.assert_allclose(U @ U.T, np.linalg.inv(np.cov(f, rowvar=False) + 0.01 * np.eye(6)),
                               rtol=1e-9)
    np.testing.assert_array_equal(U, np.triu(U))
    assert det.mean_.shape == (12, 6) and det.covariance_.shape == (12, 6, 6)
    assert det.n_samples_seen_ == 30 and det.input_shape_ == (10, 3, 4)


def test_feature_subset_is_seeded_and_reproducible():
    X = _maps(12, c=20)
    draws = [PaDiMDetector(n_features=8, random_state=s, device="cpu").fit(X).feature_indices_
             for s in (0, 0, 1)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    for idx in draws:
        assert idx.dtype == np.int64 and len(np.unique(idx)) == 8
        assert (np.diff(idx) > 0).all() and idx.min() >= 0 and idx.max() < 20
    rs = np.random.RandomState(5)
    a = PaDiMDetector(n_features=8, random_state=rs, device="cpu").fit(X).feature_indices_
    b = PaDiMDetector(n_features=8, random_state=np.random.RandomState(5), device="cpu")
    np.testing.assert_array_equal(a, b.fit(X).feature_indices_)
    everything = PaDiMDetector(device="cpu").fit(X).feature_indices_
    np.testing.assert_array_equal(everything, np.arange(20))


def test_fit_leaves_global_rngs_untouched():
    X = _maps(12, c=20)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    PaDiMDetector(n_features=5, random_state=0, device="cpu").fit(X).score_samples(X)
    PaDiMDetector(n_features=5, random_state=None, device="cpu").fit(X)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]


@pytest.mark.parametrize("output_size, shape", [(None, (3, 3, 4)), (12, (3, 12, 12)),
                                                ((9, 16), (3, 9, 16))])
def test_anomaly_map_shapes(output_size, shape):
    X = _maps(20)
    maps = PaDiMDetector(device="cpu").fit(X).anomaly_map(X[:3], output_size=output_size)
    assert maps.shape == shape and maps.dtype == np.float64


def test_two_dimensional_input_is_one_position():
    X = _maps(25, h=1, w=1)
    flat = PaDiMDetector(device="cpu").fit(X[:, :, 0, 0])
    maps = PaDiMDetector(device="cpu").fit(X)
    assert flat.input_shape_ == (10, 1, 1)
    np.testing.assert_array_equal(flat.score_samples(X[:, :, 0, 0]), maps.score_samples(X))
    assert flat.anomaly_map(X[:2, :, 0, 0]).shape == (2, 1, 1)


@settings(max_examples=20)
@given(cuts=st.lists(st.integers(1, 23), max_size=4, unique=True),
       n_train=st.sampled_from([24, 8]))
def test_partial_fit_equals_fit(cuts, n_train):
    # n_train=8 <= d: fit takes the Woodbury solver, partial_fit the full one.
    X, X_test = _maps(n_train), _maps(4, seed=1)
    whole = PaDiMDetector(n_features=9, random_state=0, device="cpu").fit(X)
    part = PaDiMDetector(n_features=9, random_state=0, device="cpu")
    batches = np.split(X, sorted(c for c in cuts if 2 <= c < n_train))
    for batch in batches:
        part.partial_fit(batch)
    assert part.solver_ == "full" and part.n_samples_seen_ == n_train
    np.testing.assert_array_equal(part.feature_indices_, whole.feature_indices_)
    np.testing.assert_allclose(part.mean_, whole.mean_, rtol=1e-13)
    np.testing.assert_allclose(part.anomaly_map(X_test), whole.anomaly_map(X_test), rtol=1e-9)
    if whole.solver_ == "full":
        np.testing.assert_allclose(part.covariance_, whole.covariance_, rtol=1e-9, atol=1e-12)
    # offset_: leave-one-out scores of the last batch under the updated model
    last = range(n_train - len(batches[-1]), n_train)
    loo = _reference_leave_one_out(X, last, part.feature_indices_, part.reg)
    assert part.offset_ == pytest.approx(np.percentile(-loo, 100 * part.contamination),
                                         rel=1e-9)


def test_partial_fit_continues_a_woodbury_fit():
    X = _maps(14)
    det = PaDiMDetector(device="cpu").fit(X[:6])
    assert det.solver_ == "woodbury"
    det.partial_fit(X[6:])
    whole = PaDiMDetector(solver="full", device="cpu").fit(X)
    assert det.solver_ == "full" and not hasattr(det, "centered_features_")
    np.testing.assert_allclose(det.covariance_, whole.covariance_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(det.score_samples(X), whole.score_samples(X), rtol=1e-9)


def test_refit_replaces_the_state_of_the_other_solver():
    X = _maps(20)
    det = PaDiMDetector(device="cpu").fit(X)
    assert hasattr(det, "covariance_")
    det.fit(X[:5])
    assert det.solver_ == "woodbury" and not hasattr(det, "covariance_")
    np.testing.assert_allclose(det.anomaly_map(X), _reference_maps(X[:5], X, np.arange(10), 0.01),
                               rtol=1e-9)


@pytest.mark.parametrize("solver", ["full", "woodbury"])
def test_chunked_scoring_and_fit_agree(monkeypatch, solver):
    X = _maps(30)
    big = PaDiMDetector(solver=solver, device="cpu").fit(X)
    monkeypatch.setattr(padim, "_BLOCK_ELEMENTS", 1)  # fit: one position per block
    monkeypatch.setattr(mahalanobis, "_BLOCK_FEATURES", 1)  # scoring: one position per block
    small = PaDiMDetector(solver=solver, device="cpu").fit(X)
    for name in ("mean_", "covariance_", "precision_cholesky_"):
        if hasattr(big, name):
            np.testing.assert_allclose(getattr(small, name), getattr(big, name),
                                       rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(small.anomaly_map(X), big.anomaly_map(X), rtol=1e-12)


@pytest.mark.parametrize("n_features", [None, 7])
def test_blocks_of_positions_match_numpy(monkeypatch, n_features):
    # uneven blocks (5 positions, then 2), channel subset or not, 3 scoring chunks
    X, X_test = _maps(40, h=3, w=4), _maps(9, h=3, w=4, seed=1)
    monkeypatch.setattr(padim, "_BLOCK_ELEMENTS", 5 * 40 * (n_features or 10))
    monkeypatch.setattr(mahalanobis, "_BLOCK_FEATURES", 5 * (n_features or 10))
    det = PaDiMDetector(n_features=n_features, reg=0.05, random_state=0, device="cpu")
    det.fit(X)
    expected = _reference_maps(X, X_test, det.feature_indices_, 0.05)
    np.testing.assert_allclose(det.anomaly_map(X_test), expected, rtol=1e-9)
    covariance = det.covariance_
    np.testing.assert_array_equal(covariance, covariance.transpose(0, 2, 1))
    # the blocked leave-one-out scores behind the offset
    loo = _reference_leave_one_out(X, range(len(X)), det.feature_indices_, 0.05)
    assert det.offset_ == pytest.approx(np.percentile(-loo, 100 * det.contamination),
                                        rel=1e-9)


def test_invalid_configurations_raise():
    X = _maps(8)
    with pytest.raises(ValueError, match=r"n_features=11 exceeds the 10 feature\(s\)"):
        PaDiMDetector(n_features=11, device="cpu").fit(X)
    with pytest.raises(ValueError, match="reg > 0"):
        PaDiMDetector(reg=0.0, device="cpu").fit(X)  # 8 samples <= 10 features
    with pytest.raises(ValueError, match="reg > 0"):
        PaDiMDetector(reg=0.0, solver="woodbury", device="cpu").fit(_maps(30))
    with pytest.raises(ValueError, match="solver='woodbury'"):
        PaDiMDetector(solver="woodbury", device="cpu").partial_fit(X)
    constant = _maps(30)
    constant[:, 4, 1, 1] = 2.0
    with pytest.raises(ValueError, match="singular.*increase reg"):
        PaDiMDetector(reg=0.0, device="cpu").fit(constant)
    assert np.isfinite(PaDiMDetector(device="cpu").fit(constant).score_samples(constant)).all()
    det = PaDiMDetector(device="cpu").fit(_maps(30))
    with pytest.raises(ValueError, match="per-sample shape"):
        det.score_samples(_maps(2, h=4, w=3))
    with pytest.raises(ValueError, match="10 features"):
        det.partial_fit(_maps(3, c=9))


def test_leave_one_out_from_residuals_matches_refits_with_reused_buffers():
    from skanomaly.functional import leave_one_out_from_residuals

    rng = np.random.default_rng(5)
    buffers = (torch.empty(6, 3, 3, dtype=torch.float64),
               torch.empty(6, 3, 3, dtype=torch.float64),
               torch.empty(6, 9, 3, dtype=torch.float64),
               torch.empty(6, 3, 3, dtype=torch.float64))
    for p in (6, 4):  # a smaller second block reuses the front of the buffers
        x = rng.normal(size=(p, 9, 3))
        mean = x.mean(1, keepdims=True)
        r = torch.as_tensor(x - mean)
        before = r.clone()
        got = leave_one_out_from_residuals(r, r.mT @ r, 9, ddof=1, reg=0.3, squared=False,
                                           buffers=buffers)
        assert torch.equal(r, before) and got.shape == (p, 9)
        for j in range(p):
            for i in range(9):
                rest = np.delete(x[j], i, axis=0)
                cov = np.cov(rest, rowvar=False) + 0.3 * np.eye(3)
                v = x[j, i] - rest.mean(0)
                assert float(got[j, i]) == pytest.approx(
                    np.sqrt(v @ np.linalg.solve(cov, v)), rel=1e-10)
    with pytest.raises(ValueError, match="n_samples >= ddof"):
        leave_one_out_from_residuals(r[:, :2], r.mT @ r, 2, ddof=1)
