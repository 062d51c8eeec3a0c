"""Gaussian KDE kernels against scipy.stats.gaussian_kde."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import gaussian_kde, multivariate_normal

from skanomaly.functional import gaussian_kde_logpdf, kde_covariance
from skanomaly.functional.kde import GaussianKDE


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


def _loo_reference(data, weights, bandwidth):
    """Leave-one-out log densities by hand: the kernels of the other points, their weights
    renormalised, with the kernel covariance of scipy's KDE of the FULL dataset."""
    n = len(data)
    w = np.full(n, 1.0 / n) if weights is None else weights / weights.sum()
    covariance = gaussian_kde(data.T, bw_method=bandwidth, weights=weights).covariance
    out = np.empty(n)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        log_kernels = [multivariate_normal(data[j], covariance).logpdf(data[i]) for j in others]
        out[i] = logsumexp(log_kernels, b=w[others] / w[others].sum())
    return out


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("bandwidth", ["scott", 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_leave_one_out_matches_brute_force(d, bandwidth, weighted):
    data, weights, _ = _problem(40, d, seed=d + 20)
    weights = weights if weighted else None
    expected = _loo_reference(data, weights, bandwidth)
    for chunk_size in (None, 1, 7):  # the excluded kernel must follow the chunks
        got = gaussian_kde_logpdf(_t(data), _t(data), bandwidth, _t(weights),
                                  leave_one_out=True, chunk_size=chunk_size)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    full = gaussian_kde_logpdf(_t(data), _t(data), bandwidth, _t(weights))
    assert bool((got < full).all())  # a point's own kernel is the nearest


def test_leave_one_out_of_a_zero_weight_sample_is_its_full_density():
    data, weights, _ = _problem(30, 2, seed=5)
    weights[4] = 0.0
    loo = gaussian_kde_logpdf(_t(data), _t(data), weights=_t(weights), leave_one_out=True)
    full = gaussian_kde_logpdf(_t(data), _t(data), weights=_t(weights))
    assert loo[4] == full[4]
    np.testing.assert_allclose(loo.numpy(), _loo_reference(data, weights, "scott"), rtol=1e-10)


def test_leave_one_out_needs_one_point_per_sample():
    data, _, points = _problem(30, 2)
    with pytest.raises(ValueError, match="one point per dataset sample"):
        gaussian_kde_logpdf(_t(points), _t(data), leave_one_out=True)


def test_fitted_kernel_is_reusable_and_equals_the_function():
    data, weights, points = _problem(60, 3, seed=8)
    kde = GaussianKDE(_t(data), "silverman", _t(weights))
    ref = gaussian_kde(data.T, bw_method="silverman", weights=weights)
    assert kde.factor == pytest.approx(ref.factor, rel=1e-14)
    assert kde.neff == pytest.approx(ref.neff, rel=1e-12)
    assert (kde.n_samples, kde.n_features, kde.dtype) == (60, 3, torch.float64)
    for _ in range(2):
        torch.testing.assert_close(
            kde.logpdf(_t(points)),
            gaussian_kde_logpdf(_t(points), _t(data), "silverman", _t(weights)), rtol=0, atol=0)
    np.testing.assert_allclose(kde.covariance().numpy(), ref.covariance, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e-300, 1e-150, 2.0**-600, 1e150, 2.0**700, 1e300])
def test_any_finite_scale_gives_the_same_density(scale):
    # Diagonal scalings: log p_{sX}(s y) = log p_X(y) - d log s, with per-feature scales.
    data, weights, points = _problem(50, 3, seed=4)
    per_feature = np.array([1.0, 2.0**-30, 3.0**5])  # features of very different sizes
    base = gaussian_kde_logpdf(_t(points * per_feature), _t(data * per_feature),
                               weights=_t(weights))
    scaled_w = _t(weights * 1e300)  # huge weights normalise without overflowing
    got = gaussian_kde_logpdf(_t(points * per_feature * scale), _t(data * per_feature * scale),
                              weights=scaled_w)
    assert bool(torch.isfinite(got).all())
    np.testing.assert_allclose(got.numpy(), base.numpy() - 3 * np.log(scale), rtol=1e-12,
                               atol=1e-9)
    expected = gaussian_kde(data.T, weights=weights).logpdf(points.T)
    np.testing.assert_allclose(base.numpy(), expected - np.log(per_feature).sum(), rtol=1e-10)
    if scale in (1e-150, 1e150):
        np.testing.assert_allclose(kde_covariance(_t(data * scale)).numpy(),
                                   gaussian_kde(data.T).covariance * scale**2, rtol=1e-12)
    else:  # the variances are beyond float64; the densities above were not
        with pytest.raises(ValueError, match="beyond the float range"):
            kde_covariance(_t(data * scale))


def test_log_density_beyond_the_float_range_raises():
    data, _, _ = _problem(40, 2)
    far = torch.tensor([[1e300, -1e300]], dtype=torch.float64)
    with pytest.raises(ValueError, match="beyond the float range"):
        gaussian_kde_logpdf(far, _t(data))
    # 1e150 kernel widths out: a finite log density near -1e300, exact.
    point = data.mean(0) + 1e150
    got = gaussian_kde_logpdf(_t(point[None]), _t(data))
    assert np.isfinite(got.item()) and got.item() < -1e299
    np.testing.assert_allclose(got.numpy(), gaussian_kde(data.T).logpdf(point[:, None]),
                               rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    data, _, points = _problem(100, 2, seed=6)
    data_h, points_h = torch.tensor(data).to(dtype), torch.tensor(points).to(dtype)
    got = gaussian_kde_logpdf(points_h, data_h)
    assert got.dtype == torch.float32
    # The same values (rounded to half precision) in float64, through scipy.
    expected = gaussian_kde(data_h.double().numpy().T).logpdf(points_h.double().numpy().T)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-3)
    assert kde_covariance(data_h).dtype == torch.float32
    assert data_h.dtype == dtype  # not modified


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_input_is_promoted(dtype):
    data = np.array([[0, 1], [2, 5], [3, 3], [7, 1], [4, 4], [1, 6]])
    got = gaussian_kde_logpdf(torch.tensor(data, dtype=dtype), torch.tensor(data, dtype=dtype))
    assert got.dtype == torch.get_default_dtype()
    expected = gaussian_kde(data.T.astype(float)).logpdf(data.T.astype(float))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_bool_dataset_works_and_singular_errors_blame_the_data():
    rng = np.random.default_rng(0)
    data = rng.random(size=(40, 3)) > 0.5
    got = gaussian_kde_logpdf(torch.tensor(data), torch.tensor(data))
    expected = gaussian_kde(data.T.astype(float)).logpdf(data.T.astype(float))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="3 samples for 3 features"):
        kde_covariance(torch.tensor(data[:3]))
    with pytest.raises(ValueError, match=r"constant feature \(column 0\)"):
        kde_covariance(torch.tensor([[0.1, 0.0], [0.1, 1.0], [0.1, 2.0], [0.1, 4.0]]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    data, weights, points = (torch.tensor(a) for a in _problem(100, 3))
    got = gaussian_kde_logpdf(points.cuda(), data.cuda(), weights=weights.cuda())
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), gaussian_kde_logpdf(points, data, weights=weights))
