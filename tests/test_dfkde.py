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
    "params, n, d, match",
    [
        ({"n_components": 6}, 6, 12, r"n_components=6 .* = 5 .*n_samples = 6"),
        ({"n_components": 2}, 30, 1, r"n_features = 1"),
        ({"n_components": 4, "max_training_points": 4}, 30, 12, r"n_samples = 4"),
    ],
)
def test_too_many_components_raise(params, n, d, match):
    X = np.random.default_rng(0).normal(size=(n, d))
    with pytest.raises(ValueError, match=match):
        DFKDEDetector(device="cpu", **params).fit(X)


@pytest.mark.parametrize(
    "params", [{"feature_scaling": "l2"}, {"bandwidth": -1.0}, {"bandwidth": "silver"},
               {"n_components": 0}, {"max_training_points": 1}],
)
def test_invalid_parameters_raise(data, params):
    with pytest.raises(ValueError):
        DFKDEDetector(device="cpu", **params).fit(data[0])


@pytest.mark.parametrize("scaling", ["scale", "norm", None])
@pytest.mark.parametrize("rank", [0, 1])
def test_components_beyond_data_rank_raise(scaling, rank):
    # Identical points (rank 0) or points on a line (rank 1) with two components.
    X = 3.0 + np.outer(np.linspace(-1.0, 1.0, 20), np.arange(1.0, 6.0)) * rank
    with pytest.raises(ValueError, match=f"span only {rank} dimension"):
        DFKDEDetector(n_components=2, feature_scaling=scaling, device="cpu").fit(X)
