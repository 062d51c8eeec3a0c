"""DFKDEDetector against scikit-learn PCA + scipy.stats.gaussian_kde."""

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde
from sklearn.decomposition import PCA

from skanomaly.detectors import DFKDEDetector


def _reference_scores(train, test, n_components, scaling, bandwidth="scott"):
    """-log density of scipy's KDE on sklearn-PCA features scaled as anomalib does."""
    pca = PCA(n_components=n_components, svd_solver="full").fit(train)
    z_train, z_test = pca.transform(train), pca.transform(test)
    if scaling == "scale":
        max_length = np.linalg.norm(z_train, axis=1).max()
        z_train, z_test = z_train / max_length, z_test / max_length
    elif scaling == "norm":
        z_train = z_train / np.linalg.norm(z_train, axis=1, keepdims=True)
        z_test = z_test / np.linalg.norm(z_test, axis=1, keepdims=True)
    return -gaussian_kde(z_train.T, bw_method=bandwidth).logpdf(z_test.T)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(12, 12))
    return rng.normal(size=(150, 12)) @ mixing, rng.normal(size=(40, 12)) @ mixing


@pytest.mark.parametrize("scaling", ["scale", "norm", None])
@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.4])
def test_scores_match_sklearn_pca_and_scipy_kde(data, device, scaling, bandwidth):
    train, test = data
    det = DFKDEDetector(n_components=4, feature_scaling=scaling, bandwidth=bandwidth,
                        device=device).fit(train)
    expected = _reference_scores(train, test, 4, scaling, bandwidth)
    np.testing.assert_allclose(-det.score_samples(test), expected, rtol=1e-6)
    if scaling == "scale":
        z = PCA(4, svd_solver="full").fit_transform(train)
        np.testing.assert_allclose(det.max_length_, np.linalg.norm(z, axis=1).max(), rtol=1e-10)
    else:
        assert not hasattr(det, "max_length_")
    if scaling == "scale":  # a refit without scaling leaves no stale max_length_
        assert not hasattr(det.set_params(feature_scaling=None).fit(train), "max_length_")


def test_feature_maps_are_global_average_pooled(data):
    train, test = data
    rng = np.random.default_rng(1)
    # Maps whose spatial mean is the data: the detector must see exactly `train`.
    noise = rng.normal(size=(*train.shape, 3, 2))
    maps = train[:, :, None, None] + noise - noise.mean(axis=(2, 3), keepdims=True)
    det = DFKDEDetector(n_components=3, device="cpu").fit(maps)
    assert det.input_shape_ == (12, 3, 2)
    np.testing.assert_allclose(
        -det.score_samples(np.broadcast_to(test[:, :, None, None], (40, 12, 3, 2))),
        _reference_scores(train, test, 3, "scale"), rtol=1e-6,
    )


def test_subsample_is_seeded_randperm(data):
    train, test = data
    det = DFKDEDetector(n_components=3, max_training_points=60, random_state=7,
                        device="cpu").fit(train)
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(7))[:60].numpy()
    assert det.dataset_.shape == (60, 3)
    np.testing.assert_array_equal(det.kde_indices_, keep)
    assert det.n_samples_seen_ == len(train)
    np.testing.assert_allclose(-det.score_samples(test),
                               _reference_scores(train[keep], test, 3, "scale"), rtol=1e-6)
    again = DFKDEDetector(n_components=3, max_training_points=60, random_state=7,
                          device="cpu").fit(train)
    np.testing.assert_array_equal(again.dataset_, det.dataset_)
    other = DFKDEDetector(n_components=3, max_training_points=60, random_state=8,
                          device="cpu").fit(train)
    assert not np.allclose(other.dataset_, det.dataset_)


def test_ranks_obvious_anomaly_first(data, device):
    train, test = data
    outlier = test[:1] + 20.0 * train.std(axis=0)
    det = DFKDEDetector(n_components=4, random_state=0, device=device).fit(train)
    scores = det.score_samples(np.vstack([test, outlier]))
    assert scores.argmin() == len(test)
    assert det.predict(outlier)[0] == -1


def test_input_not_mutated_and_float32_tensor(data):
    train, test = data
    train32 = torch.tensor(train, dtype=torch.float32)
    before = train32.clone()
    det = DFKDEDetector(n_components=4, device="cpu").fit(train32)
    assert torch.equal(train32, before)
    assert det.dataset_.dtype == np.float64
    np.testing.assert_allclose(
        -det.score_samples(test.astype(np.float32)),
        _reference_scores(train32.double().numpy(), test.astype(np.float32), 4, "scale"),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "params, n, d, expected",
    [
        ({}, 150, 12, 12),  # the default 16 capped by the number of features
        ({"n_components": 6}, 6, 12, 5),  # ... by the number of points - 1
        ({"n_components": 2}, 30, 1, 1),  # one feature
        ({"n_components": 4, "max_training_points": 4}, 30, 12, 3),  # ... by the points kept
        ({}, 2, 3, 1),  # two points: one dimension
    ],
)
def test_n_components_is_resolved_to_what_the_data_allow(params, n, d, expected):
    X = np.random.default_rng(0).normal(size=(n, d))
    det = DFKDEDetector(device="cpu", random_state=0, **params).fit(X)
    assert det.n_components_ == expected
    assert det.pca_components_.shape == (expected, d) and det.dataset_.shape[1] == expected
    kept = X
    if "max_training_points" in params:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4].numpy()
        kept = X[keep]
    queries = np.random.default_rng(1).normal(size=(5, d))
    np.testing.assert_allclose(-det.score_samples(queries),
                               _reference_scores(kept, queries, expected, "scale"), rtol=1e-6)


@pytest.mark.parametrize("scaling", ["scale", "norm", None])
def test_components_are_capped_by_the_data_rank(scaling):
    # Points on a line (rank 1) in 5-D: one component, the KDE of scipy in 1-D.
    X = 3.0 + np.outer(np.linspace(-1.0, 1.0, 20) ** 3, np.arange(1.0, 6.0))
    det = DFKDEDetector(n_components=2, feature_scaling=scaling, device="cpu").fit(X)
    assert det.n_components_ == 1
    queries = 3.0 + np.outer([0.1, -0.5, 2.0], np.arange(1.0, 6.0))
    np.testing.assert_allclose(-det.score_samples(queries),
                               _reference_scores(X, queries, 1, scaling), rtol=1e-6)


@pytest.mark.parametrize("make", [lambda X: X, lambda X: X[:, :, None, None] * np.ones((3, 2))])
def test_identical_or_single_points_raise(make):
    X = np.full((20, 5), 3.7)  # the mean of 20 copies of 3.7 is not exactly 3.7
    with pytest.raises(ValueError, match="all 20 training points are the same"):
        DFKDEDetector(device="cpu").fit(make(X))
    with pytest.raises(ValueError, match="n_samples = 1"):
        DFKDEDetector(device="cpu").fit(make(X[:1]))


@pytest.mark.parametrize(
    "params", [{"feature_scaling": "l2"}, {"bandwidth": -1.0}, {"bandwidth": "silver"},
               {"n_components": 0}, {"max_training_points": 1}],
)
def test_invalid_parameters_raise(data, params):
    with pytest.raises(ValueError):
        DFKDEDetector(device="cpu", **params).fit(data[0])


def _pca_points(train, n_components, scaling):
    """The KDE centres by scikit-learn PCA, scaled as anomalib does."""
    z = PCA(n_components=n_components, svd_solver="full").fit_transform(train)
    if scaling == "scale":
        z = z / np.linalg.norm(z, axis=1).max()
    elif scaling == "norm":
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return z


def _leave_one_out_reference(z, bandwidth="scott"):
    """-log density of each centre under the OTHER centres' kernels, by hand, with the
    kernel covariance of scipy's KDE of all the centres."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    covariance = gaussian_kde(z.T, bw_method=bandwidth).covariance
    n = len(z)
    out = np.empty(n)
    for i in range(n):
        others = np.delete(z, i, axis=0)
        out[i] = logsumexp(multivariate_normal(z[i], covariance).logpdf(others)) - np.log(n - 1)
    return -out


@pytest.mark.parametrize("scaling", ["scale", "norm", None])
@pytest.mark.parametrize("contamination", [0.05, 0.2])
def test_offset_is_the_leave_one_out_quantile(data, scaling, contamination):
    train, _ = data
    det = DFKDEDetector(n_components=3, feature_scaling=scaling, contamination=contamination,
                        device="cpu").fit(train)
    assert det.calibration_ == "leave-one-out"
    loo = _leave_one_out_reference(_pca_points(train, 3, scaling))
    np.testing.assert_allclose(det.offset_, np.percentile(-loo, 100 * contamination),
                               rtol=1e-8)
    # leave-one-out is stricter than in-sample: the offset is below the in-sample quantile
    assert det.offset_ < np.percentile(det.score_samples(train), 100 * contamination)


def test_offset_scores_the_points_outside_the_kde_as_new_samples(data):
    train, _ = data
    # 130 KDE points for 12 features: at least ten per feature, so leave-one-out
    det = DFKDEDetector(n_components=3, max_training_points=130, random_state=3,
                        contamination=0.2, device="cpu").fit(train)
    keep = torch.randperm(150, generator=torch.Generator().manual_seed(3))[:130].numpy()
    rest = np.setdiff1d(np.arange(150), keep)
    kept_scores = _leave_one_out_reference(_pca_points(train[keep], 3, "scale"))
    rest_scores = _reference_scores(train[keep], train[rest], 3, "scale")
    expected = np.percentile(-np.concatenate([kept_scores, rest_scores]), 20)
    np.testing.assert_allclose(det.offset_, expected, rtol=1e-8)
    assert det.calibration_ == "leave-one-out"


def test_few_points_per_feature_cross_fit_the_pca_too(data):
    train, _ = data  # 60 KDE points for 12 features
    det = DFKDEDetector(n_components=3, max_training_points=60, random_state=3,
                        device="cpu").fit(train)
    assert det.calibration_ == "cross-fit"


def test_unseen_normals_are_flagged_at_about_contamination():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    train, new = rng.normal(size=(1000, 6)) @ mixing, rng.normal(size=(4000, 6)) @ mixing
    det = DFKDEDetector(contamination=0.1, device="cpu").fit(train)
    flagged = np.mean(det.predict(new) == -1)
    assert abs(flagged - 0.1) < 0.03
    # the in-sample quantile, which counts each point in its own density, flags too many
    in_sample = np.percentile(det.score_samples(train), 10)
    assert np.mean(det.score_samples(new) < in_sample) > flagged


@pytest.mark.parametrize("scale", [1e-300, 1e-150, 2.0**-500, 2.0**600, 1e150, 1e300])
@pytest.mark.parametrize("scaling", ["scale", "norm", None])
def test_any_finite_scale_works(data, scale, scaling):
    train, test = data
    unit = DFKDEDetector(n_components=4, feature_scaling=scaling, device="cpu").fit(train)
    train_s, test_s = train * scale, test * scale
    copy = train_s.copy()
    det = DFKDEDetector(n_components=4, feature_scaling=scaling, device="cpu").fit(train_s)
    np.testing.assert_array_equal(train_s, copy)
    got = det.score_samples(test_s)
    assert np.isfinite(got).all() and np.isfinite(det.offset_)
    # "scale" and "norm" are scale-free; without scaling the density is in units of X
    shift = 4 * np.log(scale) if scaling is None else 0.0
    np.testing.assert_allclose(got, unit.score_samples(test) - shift, rtol=1e-9,
                               atol=1e-9 * abs(shift))
    np.testing.assert_allclose(det.offset_, unit.offset_ - shift, rtol=1e-9,
                               atol=1e-9 * abs(shift))
    np.testing.assert_allclose(det.pca_mean_, unit.pca_mean_ * scale, rtol=1e-9)
    if np.log2(scale).is_integer():  # an exact power of two: the same model, bitwise
        np.testing.assert_array_equal(det.pca_components_, unit.pca_components_)
        assert det.scale_ == unit.scale_ * scale


def test_queries_beyond_the_float_range_raise(data):
    train, test = data
    det = DFKDEDetector(n_components=4, device="cpu").fit(train)
    far = test[:2] * 1e100  # ~1e100 kernel widths out: log density about -1e200, finite
    scores = det.score_samples(far)
    assert np.isfinite(scores).all() and (scores < -1e190).all()
    np.testing.assert_allclose(-scores, _reference_scores(train, far, 4, "scale"), rtol=1e-6)
    with pytest.raises(ValueError, match="beyond the float range"):
        det.score_samples(test[:2] * 1e300)  # log density about -1e600


@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
def test_maps_near_the_float_maximum_are_pooled_without_overflow(data):
    train, test = data
    peak = max(np.abs(train).max(), np.abs(test).max())
    train, test = train / peak, test / peak  # largest |value| is 1

    def maps(x):  # four cells whose sum overflows: 1e308 + 1e308 + 5e307 + 5e307
        m = np.repeat(x[:, :, None, None], 4, axis=2) * 1e308
        m[:, :, 2:] *= 0.5
        return m

    det = DFKDEDetector(n_components=3, device="cpu").fit(maps(train))
    unit = DFKDEDetector(n_components=3, device="cpu").fit(train)
    np.testing.assert_allclose(det.score_samples(maps(test)), unit.score_samples(test),
                               rtol=1e-9)
    np.testing.assert_allclose(det.offset_, unit.offset_, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64, bool])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_input_dtypes(data, dtype, container):
    train, test = data
    if dtype is bool:
        train_d, test_d = train > 0, test > 0
    else:
        factor = 10 if dtype is np.int64 else 1
        train_d, test_d = (train * factor).astype(dtype), (test * factor).astype(dtype)
    before = train_d.copy()
    make = np.asarray if container == "numpy" else torch.from_numpy
    det = DFKDEDetector(n_components=4, device="cpu").fit(make(train_d))
    np.testing.assert_array_equal(train_d, before)
    expected = _reference_scores(train_d.astype(np.float64), test_d.astype(np.float64), 4,
                                 "scale")
    np.testing.assert_allclose(-det.score_samples(make(test_d)), expected, rtol=1e-6)


@pytest.mark.parametrize("shape, axis", [((20, 0, 4, 4), "feature/channel"),
                                         ((20, 3, 0, 4), "height"), ((20, 3, 4, 0), "width"),
                                         ((20, 0), "feature/channel")])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_empty_axes_raise_naming_the_axis(shape, axis, container):
    X = np.zeros(shape)
    X = torch.from_numpy(X) if container == "torch" else X
    with pytest.raises(ValueError, match=f"(empty {axis}|0 feature)"):
        DFKDEDetector(device="cpu").fit(X)


def test_kernel_is_factorised_once_per_fit_and_kept_out_of_pickles(data, monkeypatch):
    import pickle

    from skanomaly.functional import kde

    train, test = data
    built = []
    original = kde.GaussianKDE.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(kde.GaussianKDE, "__init__", counting)
    det = DFKDEDetector(n_components=4, device="cpu").fit(train)
    scores = det.score_samples(test)
    det.score_samples(test[:3])
    assert len(built) == 1
    assert "_device_cache" not in det.__getstate__()  # the kernel is not pickled ...
    loaded = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(loaded.score_samples(test), scores)
    assert len(built) == 2  # ... but rebuilt once, identically, on first use
