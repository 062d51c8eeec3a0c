"""Gaussian KDE kernels against scipy.stats.gaussian_kde."""

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from skanomaly.functional import gaussian_kde_logpdf, kde_covariance


def _problem(n, d, seed=0):
    """Correlated data, sample weights, and query points near and far (10 and 40 bandwidths)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    weights = rng.uniform(0.1, 2.0, size=n)
    spread = data.std(0)
    near = data[:10] + 0.3 * rng.normal(size=(10, d)) * spread
    direction = rng.normal(size=(4, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    far = data.mean(0) + np.outer([10, 10, 40, 40], np.ones(d)) * direction * spread
    return data, weights, np.vstack([near, far])


def _t(a):
    return None if a is None else torch.tensor(a)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.4])
@pytest.mark.parametrize("weighted", [False, True])
def test_logpdf_matches_scipy(d, bandwidth, weighted):
    data, weights, points = _problem(150, d, seed=d)
    weights = weights if weighted else None
    ref = gaussian_kde(data.T, bw_method=bandwidth, weights=weights)
    got = gaussian_kde_logpdf(_t(points), _t(data), bandwidth, _t(weights))
    expected = ref.logpdf(points.T)
    assert got.dtype == torch.float64 and got.shape == (len(points),)
    # The far points (last four) are 10 and 40 bandwidths out; the density may underflow.
    assert np.all(np.isfinite(expected)) and expected[-1] < -100
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(kde_covariance(_t(data), bandwidth, _t(weights)).numpy(),
                               ref.covariance, rtol=1e-12)


def test_far_tail_is_finite_where_density_underflows():
    data, _, _ = _problem(100, 2)
    point = data.mean(0) + 60 * data.std(0)
    ref = gaussian_kde(data.T)
    with np.errstate(divide="ignore"):
        assert np.log(ref.evaluate(point[:, None]))[0] == -np.inf
    got = gaussian_kde_logpdf(torch.tensor(point[None]), torch.tensor(data))
    np.testing.assert_allclose(got.numpy(), ref.logpdf(point[:, None]), rtol=1e-9)


def test_one_dimensional_inputs():
    rng = np.random.default_rng(7)
    data, points = rng.normal(size=40), np.linspace(-6, 6, 9)
    got = gaussian_kde_logpdf(torch.tensor(points), torch.tensor(data), "silverman")
    expected = gaussian_kde(data, bw_method="silverman").logpdf(points)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    assert kde_covariance(torch.tensor(data)).shape == (1, 1)


def test_zero_weights_equal_dropping_samples():
    data, weights, points = _problem(60, 3, seed=11)
    weights[::3] = 0.0
    got = gaussian_kde_logpdf(_t(points), _t(data), weights=_t(weights))
    keep = weights > 0
    expected = gaussian_kde(data[keep].T, weights=weights[keep]).logpdf(points.T)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunking_does_not_change_result(chunk_size):
    data, weights, points = _problem(80, 3, seed=2)
    full = gaussian_kde_logpdf(_t(points), _t(data), weights=_t(weights))
    chunked = gaussian_kde_logpdf(_t(points), _t(data), weights=_t(weights), chunk_size=chunk_size)
    torch.testing.assert_close(chunked, full, rtol=1e-13, atol=0)


def test_float32():
    data, weights, points = _problem(200, 4, seed=3)
    got = gaussian_kde_logpdf(torch.tensor(points, dtype=torch.float32),
                              torch.tensor(data, dtype=torch.float32),
                              weights=torch.tensor(weights, dtype=torch.float32))
    assert got.dtype == torch.float32
    expected = gaussian_kde(data.T, weights=weights).logpdf(points.T)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-3)


def test_mixed_dtypes_promote():
    data, _, points = _problem(50, 2)
    got = gaussian_kde_logpdf(torch.tensor(points, dtype=torch.float32), torch.tensor(data))
    assert got.dtype == torch.float64


def test_inputs_not_mutated():
    data, weights, points = (torch.tensor(a) for a in _problem(50, 2))
    copies = [t.clone() for t in (data, weights, points)]
    gaussian_kde_logpdf(points, data, weights=weights)
    kde_covariance(data, weights=weights)
    assert all(torch.equal(a, b) for a, b in zip((data, weights, points), copies))


def test_singular_data_is_rejected():
    data, _, _ = _problem(30, 3)
    constant = data.copy()
    constant[:, 1] = 2.5
    with pytest.raises(ValueError, match="constant feature"):
        kde_covariance(torch.tensor(constant))
    collinear = data.copy()
    collinear[:, 2] = 2.0 * data[:, 0] - data[:, 1]
    with pytest.raises(ValueError, match="singular"):
        gaussian_kde_logpdf(torch.tensor(collinear[:2]), torch.tensor(collinear))
    with pytest.raises(ValueError, match="singular"):  # scipy raises too (d > n)
        kde_covariance(torch.tensor(data[:3]))
    weights = np.zeros(30)
    weights[:3] = 1.0
    with pytest.raises(ValueError, match="singular"):
        kde_covariance(torch.tensor(data), weights=torch.tensor(weights))


def test_errors():
    data, weights, points = (torch.tensor(a) for a in _problem(30, 2))
    with pytest.raises(ValueError, match="at least 2"):
        kde_covariance(torch.ones(1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        kde_covariance(data, weights=-weights)
    with pytest.raises(ValueError, match="positive sum"):
        kde_covariance(data, weights=torch.zeros(30))
    with pytest.raises(ValueError, match="length"):
        kde_covariance(data, weights=weights[:-1])
    with pytest.raises(ValueError, match="bandwidth"):
        kde_covariance(data, bandwidth="normal_reference")
    with pytest.raises(ValueError, match="bandwidth"):
        kde_covariance(data, bandwidth=-1.0)
    with pytest.raises(TypeError, match="bandwidth"):
        kde_covariance(data, bandwidth=True)
    with pytest.raises(ValueError, match="features"):
        gaussian_kde_logpdf(torch.ones(3, 3, dtype=torch.float64), data)
    with pytest.raises(ValueError, match="features"):  # 1-D points are one feature
        gaussian_kde_logpdf(torch.ones(2, dtype=torch.float64), data)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_kde_logpdf(torch.full((1, 2), float("nan")), data)
    bad = data.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinity"):
        gaussian_kde_logpdf(points, bad)
    with pytest.raises(ValueError, match="1 or 2-D"):
        gaussian_kde_logpdf(points, data[None])
    with pytest.raises(ValueError, match="chunk_size"):
        gaussian_kde_logpdf(points, data, chunk_size=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        gaussian_kde_logpdf(points, data.numpy())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    data, weights, points = (torch.tensor(a) for a in _problem(100, 3))
    got = gaussian_kde_logpdf(points.cuda(), data.cuda(), weights=weights.cuda())
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), gaussian_kde_logpdf(points, data, weights=weights))
