"""DFMDetector against numpy pooling, scikit-learn PCA and scipy's Gaussian."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA
from sklearn.utils.estimator_checks import parametrize_with_checks

from skanomaly.detectors import DFMDetector
from test_common import EXPECTED_FAILED_CHECKS  # the checks every detector fails by design


def _upsample(maps, size):
    """Bilinear resize with half-pixel centres clamped at the edges (align_corners=False)."""
    for axis, (n_in, n_out) in enumerate(zip(maps.shape[1:], size), start=1):
        at = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        maps = np.apply_along_axis(lambda v: np.interp(at, np.arange(n_in), v), axis, maps)
    return maps


def _pool(X, k):
    """Average pooling with kernel = stride = k (floor mode), per axis capped at its size."""
    n, c, h, w = X.shape
    kh, kw = min(k, h), min(k, w)
    oh, ow = h // kh, w // kw
    return X[:, :, : oh * kh, : ow * kw].reshape(n, c, oh, kh, ow, kw).mean(axis=(3, 5))


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    # Low-rank structure across channels so that 0.97 keeps a handful of components.
    basis = rng.normal(size=(6, 4 * 3 * 3))
    train = rng.normal(size=(60, 6)) @ basis + 0.1 * rng.normal(size=(60, 36))
    test = rng.normal(size=(15, 6)) @ basis + 0.3 * rng.normal(size=(15, 36))
    # Upsampled to (C, H, W) = (4, 9, 10), which pooling by 4 maps to (4, 2, 2),
    # dropping the remainders.
    maps = np.repeat(np.repeat(np.vstack([train, test]).reshape(75, 4, 3, 3), 3, axis=2), 4, axis=3)
    maps = maps[..., :9, :10] + 0.05 * rng.normal(size=(75, 4, 9, 10))
    return maps[:60], maps[60:]


@pytest.mark.parametrize("n_components", [0.97, 0.5, 3])
def test_fre_matches_sklearn_reconstruction(maps, device, n_components):
    train, test = maps
    det = DFMDetector(n_components=n_components, device=device).fit(train)
    vtrain, vtest = _pool(train, 4).reshape(60, -1), _pool(test, 4)
    pca = PCA(n_components=n_components, svd_solver="full").fit(vtrain)
    assert det.n_components_ == pca.n_components_
    assert det.pooled_shape_ == (4, 2, 2)
    np.testing.assert_allclose(det.explained_variance_ratio_, pca.explained_variance_ratio_)
    err = (vtest.reshape(15, -1) - pca.inverse_transform(pca.transform(vtest.reshape(15, -1))))
    err = err.reshape(vtest.shape) ** 2
    np.testing.assert_allclose(-det.score_samples(test), err.sum(axis=(1, 2, 3)), rtol=1e-8)
    np.testing.assert_allclose(det.anomaly_map(test), _upsample(err.sum(axis=1), (9, 10)),
                               rtol=1e-8, atol=1e-12)


def test_fraction_keeps_sklearn_not_anomalib_count(maps):
    train, _ = maps
    vtrain = _pool(train, 4).reshape(60, -1)
    det = DFMDetector(device="cpu").fit(train)
    ratio = PCA(svd_solver="full").fit(vtrain).explained_variance_ratio_
    # scikit-learn: smallest k with cumulative ratio > 0.97; anomalib keeps one fewer.
    assert det.n_components_ == np.searchsorted(np.cumsum(ratio), 0.97, side="right") + 1
    assert np.cumsum(ratio)[det.n_components_ - 1] > 0.97 >= np.cumsum(ratio)[det.n_components_ - 2]


def test_nll_matches_anomalib_formula_and_scipy(maps, device):
    train, test = maps
    det = DFMDetector(score_type="nll", device=device).fit(train)
    pca = PCA(n_components=0.97, svd_solver="full").fit(_pool(train, 4).reshape(60, -1))
    z_train = pca.transform(_pool(train, 4).reshape(60, -1))
    z_test = pca.transform(_pool(test, 4).reshape(15, -1))
    # anomalib's SingleClassGaussian, in numpy: SVD of the centred data / sqrt(n).
    mean = z_train.mean(axis=0)
    u, s, _ = np.linalg.svd((z_train - mean).T / np.sqrt(len(z_train)), full_matrices=False)
    anomalib = (((z_test - mean) @ (u / s)) ** 2).sum(axis=1) + 2 * np.log(s).sum()
    np.testing.assert_allclose(-det.score_samples(test), anomalib, rtol=1e-8)
    # ... which is twice the Gaussian NLL minus k log(2 pi).
    k = pca.n_components_
    logpdf = multivariate_normal(mean, np.cov(z_train.T, bias=True)).logpdf(z_test)
    np.testing.assert_allclose(-det.score_samples(test), -2 * logpdf - k * np.log(2 * np.pi),
                               rtol=1e-8)
    np.testing.assert_allclose(det.gaussian_mean_, mean, atol=1e-10)
    # the covariance of the PCA coordinates, exactly diagonal (from the singular values)
    covariance = np.cov(z_train.T, bias=True)
    np.testing.assert_allclose(det.gaussian_covariance_, covariance,
                               atol=1e-10 * covariance.max())
    assert np.count_nonzero(det.gaussian_covariance_ - np.diag(np.diag(
        det.gaussian_covariance_))) == 0


def test_nll_has_no_anomaly_map(maps):
    det = DFMDetector(score_type="nll", device="cpu").fit(maps[0])
    with pytest.raises(ValueError, match="score_type='nll'.*score_type='fre'"):
        det.anomaly_map(maps[1])
    det.set_params(score_type="fre").fit(maps[0])
    assert not hasattr(det, "gaussian_mean_")
    assert det.anomaly_map(maps[1]).shape == (15, 9, 10)


@pytest.mark.parametrize("kernel, hw, pooled", [(4, (3, 5), (1, 1)), (1, (3, 5), (3, 5)),
                                                (2, (1, 1), (1, 1)), (2, (5, 4), (2, 2))])
def test_pooling_shapes(kernel, hw, pooled):
    X = np.random.default_rng(0).normal(size=(20, 3, *hw))
    det = DFMDetector(pooling_kernel_size=kernel, device="cpu").fit(X)
    assert det.pooled_shape_ == (3, *pooled)
    assert det.anomaly_map(X[:2]).shape == (2, *hw)
    v = _pool(X, kernel).reshape(20, -1)
    pca = PCA(0.97, svd_solver="full").fit(v)
    fre = ((v - pca.inverse_transform(pca.transform(v))) ** 2).sum(axis=1)
    np.testing.assert_allclose(-det.score_samples(X), fre, rtol=1e-7, atol=1e-12)


def test_2d_input_is_one_position(maps):
    X = _pool(maps[0], 4).reshape(60, -1)
    det = DFMDetector(device="cpu").fit(X)
    assert det.pooled_shape_ == (16, 1, 1)
    assert det.anomaly_map(X[:3]).shape == (3, 1, 1)


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_ranks_obvious_anomaly_first(maps, device, score_type):
    train, test = maps
    # Far along the principal subspace (seen by "nll") and off it (seen by "fre").
    outlier = 6.0 * test[:1] + 5.0 * np.random.default_rng(1).normal(size=test[:1].shape)
    det = DFMDetector(score_type=score_type, device=device).fit(train)
    scores = det.score_samples(np.concatenate([test, outlier]))
    assert scores.argmin() == len(test)


def test_input_not_mutated_float32_tensor(maps):
    train = torch.tensor(maps[0], dtype=torch.float32)
    before = train.clone()
    det = DFMDetector(device="cpu").fit(train)
    assert torch.equal(train, before)
    assert det.components_.dtype == np.float64


@pytest.mark.parametrize(
    "params, n, match",
    [({"n_components": 30}, 20, "n_components=30"),
     ({"n_components": 20, "score_type": "nll"}, 20, "span only 19 dimension"),
     ({}, 1, "n_samples = 1")],
)
def test_fit_errors(params, n, match):
    X = np.random.default_rng(0).normal(size=(n, 4, 2, 4))
    with pytest.raises(ValueError, match=match):
        DFMDetector(pooling_kernel_size=1, device="cpu", **params).fit(X)


@pytest.mark.parametrize("params", [{"score_type": "kde"}, {"n_components": 1.5},
                                    {"n_components": 0}, {"pooling_kernel_size": 0}])
def test_invalid_parameters_raise(maps, params):
    with pytest.raises(ValueError):
        DFMDetector(device="cpu", **params).fit(maps[0])


# tests/test_common.py runs the checks on the default ("fre") detector.
@parametrize_with_checks([DFMDetector(score_type="nll", device="cpu")],
                         expected_failed_checks=lambda estimator: EXPECTED_FAILED_CHECKS)
def test_nll_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _fre_reference(train, test, kernel=4, n_components=0.97):
    vtrain = _pool(train, kernel).reshape(len(train), -1)
    vtest = _pool(test, kernel).reshape(len(test), -1)
    pca = PCA(n_components, svd_solver="full").fit(vtrain)
    return ((vtest - pca.inverse_transform(pca.transform(vtest))) ** 2).sum(axis=1)


@pytest.mark.parametrize("scale", [1e-140, 2.0**-400, 1.0, 2.0**400, 1e140])
@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_scores_at_any_representable_scale(maps, scale, score_type):
    train, test = maps
    train_copy = train * scale
    det = DFMDetector(score_type=score_type, device="cpu").fit(train_copy)
    np.testing.assert_array_equal(train_copy, train * scale)  # not modified
    got = -det.score_samples(test * scale)
    assert np.isfinite(got).all() and np.isfinite(det.offset_)
    unit = DFMDetector(score_type=score_type, device="cpu").fit(train)
    if score_type == "fre":  # squared errors scale as the square
        np.testing.assert_allclose(got, _fre_reference(train * scale, test * scale), rtol=1e-8)
        np.testing.assert_allclose(got / scale**2, -unit.score_samples(test), rtol=1e-8)
    else:  # log det of the covariance shifts by 2 k log(scale); Mahalanobis is invariant
        shift = 2 * unit.n_components_ * np.log(scale)
        np.testing.assert_allclose(got, -unit.score_samples(test) + shift, rtol=1e-8,
                                   atol=1e-8 * abs(shift))


@pytest.mark.parametrize("scale, match", [(1e-200, "underflow"), (1e-300, "underflow"),
                                          (1e200, "overflow"), (1e300, "overflow")])
def test_scales_beyond_float64_squares_raise(maps, scale, match):
    train, test = maps
    with pytest.raises(ValueError, match=f"{match}.*rescale"):
        DFMDetector(device="cpu").fit(train * scale)
    fitted = DFMDetector(device="cpu").fit(train)
    if scale > 1:
        with pytest.raises(ValueError, match="overflow"):
            fitted.score_samples(test * scale)
    else:  # queries near 0 are fine
        assert np.isfinite(fitted.score_samples(test * scale)).all()


def test_scores_that_overflow_raise_instead_of_inf():
    # Training points spread over 1e-140, a query at 1e149: its Mahalanobis distance
    # (1e289 standard deviations, squared) is beyond float64.
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 3, 2, 2)) * 1e-140
    det = DFMDetector(score_type="nll", pooling_kernel_size=1, device="cpu").fit(train)
    with pytest.raises(ValueError, match="(?i)Mahalanobis.*range|range.*Mahalanobis"):
        det.score_samples(np.full((1, 3, 2, 2), 1e149))
    assert np.isfinite(det.score_samples(np.full((1, 3, 2, 2), 1e-120))).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64, bool])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_input_dtypes(maps, dtype, container):
    train, test = maps
    train_d = (train > 0) if dtype is bool else (train * (100 if dtype is np.int64 else 1))
    train_d = train_d.astype(dtype)
    test_d = (test > 0).astype(dtype) if dtype is bool else (
        test * (100 if dtype is np.int64 else 1)).astype(dtype)
    before = train_d.copy()
    make = np.asarray if container == "numpy" else torch.from_numpy
    det = DFMDetector(device="cpu").fit(make(train_d))
    np.testing.assert_array_equal(train_d, before)
    # every dtype is cast to float64 before pooling (float32 exactly, its values kept)
    rtol = 1e-8
    np.testing.assert_allclose(-det.score_samples(make(test_d)),
                               _fre_reference(train_d.astype(np.float64),
                                              test_d.astype(np.float64)), rtol=rtol, atol=1e-9)


def test_float32_maps_near_float32_max_pool_without_overflow(maps):
    # 16-cell pooling sums of 1e37 overflow float32: maps are pooled in float64.
    train, test = (m.astype(np.float32) * np.float32(1e37) for m in maps)
    det = DFMDetector(device="cpu").fit(torch.from_numpy(train))
    got = -det.score_samples(torch.from_numpy(test))
    expected = _fre_reference(train.astype(np.float64), test.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    # a row's pooling does not depend on the batch
    np.testing.assert_array_equal(-det.score_samples(torch.from_numpy(test[3:4])), got[3:4])


@pytest.mark.parametrize("shape, axis", [((20, 0, 4, 4), "feature/channel"),
                                         ((20, 3, 0, 4), "height"), ((20, 3, 4, 0), "width"),
                                         ((20, 0), "feature/channel")])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_empty_axes_raise_naming_the_axis(shape, axis, container):
    X = np.zeros(shape)
    X = torch.from_numpy(X) if container == "torch" else X
    with pytest.raises(ValueError, match=f"(empty {axis}|0 feature)"):
        DFMDetector(device="cpu").fit(X)


@pytest.mark.parametrize("n_train, channels", [(40, 30), (60, 4)])  # pooled d 120, 16
@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_cross_fit_scores_match_pca_refitted_per_fold(n_train, channels, score_type):
    # the folds' PCAs come from one Gram matrix, not an SVD each: the out-of-sample
    # scores that set offset_ match a PCA fitted to each fold's complement (scikit-learn
    # for FRE, a DFM fitted on the fold for the likelihood), with fewer training images
    # than pooled features and with more
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(5, channels * 4))
    X = (rng.normal(size=(n_train, 5)) @ basis + 0.2 * rng.normal(size=(n_train, channels * 4)))
    X = np.repeat(np.repeat(X.reshape(n_train, channels, 2, 2), 4, 2), 4, 3)
    X = X + 0.05 * rng.normal(size=X.shape)
    det = DFMDetector(n_components=0.9, score_type=score_type, device="cpu").fit(X)
    assert det.calibration_ == "cross-fit"
    folds = np.arange(n_train) % 5
    expected = np.empty(n_train)
    for k in range(5):
        train, held = X[folds != k], X[folds == k]
        if score_type == "fre":
            expected[folds == k] = _fre_reference(train, held, n_components=0.9)
        else:
            model = DFMDetector(n_components=0.9, score_type="nll", device="cpu").fit(train)
            expected[folds == k] = -model.score_samples(held)
    got = -det._device_cache["fit_normality"]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert det.offset_ == pytest.approx(np.percentile(-expected, 10), rel=1e-9)
