"""Mahalanobis kernels against scikit-learn, scipy and numpy inverses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import EmpiricalCovariance

from skanomaly.functional import (
    mahalanobis,
    mahalanobis_woodbury,
    precision_cholesky,
    regularized_cholesky,
    woodbury_factor,
)


def _gaussians(rng, p, n, d):
    """Training data (P, n, d) with correlated features, their means and covariances."""
    mix = rng.normal(size=(p, d, d))
    x = rng.normal(size=(p, n, d)) @ mix + rng.normal(size=(p, 1, d))
    mean = x.mean(axis=1)
    covs = np.stack([np.cov(xi, rowvar=False).reshape(d, d) for xi in x])
    return x, mean, covs


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def test_matches_sklearn_empirical_covariance():
    rng = np.random.default_rng(0)
    (train,), _, _ = _gaussians(rng, 1, 50, 5)
    queries = rng.normal(size=(20, 5)) * 3
    est = EmpiricalCovariance().fit(train)
    args = (_t(queries), _t(est.location_))
    out = mahalanobis(*args, covariance=_t(est.covariance_), squared=True)
    np.testing.assert_allclose(out.numpy(), est.mahalanobis(queries), rtol=1e-9)
    factor = regularized_cholesky(_t(est.covariance_))
    np.testing.assert_allclose(mahalanobis(*args, cholesky=factor).numpy(),
                               np.sqrt(est.mahalanobis(queries)), rtol=1e-9)


def test_batched_positions_match_scipy():
    rng = np.random.default_rng(1)
    p, n_train, d, n_query = 6, 30, 4, 7
    _, mean, covs = _gaussians(rng, p, n_train, d)
    queries = rng.normal(size=(n_query, p, d)) * 2
    out = mahalanobis(_t(queries), _t(mean), covariance=_t(covs))
    assert out.shape == (n_query, p)
    ref = np.array([[scipy_mahalanobis(queries[i, j], mean[j], np.linalg.inv(covs[j]))
                     for j in range(p)] for i in range(n_query)])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9)


def test_extra_leading_dims_and_squared():
    rng = np.random.default_rng(2)
    _, mean, covs = _gaussians(rng, 3, 20, 4)
    queries = rng.normal(size=(2, 5, 3, 4))
    out = mahalanobis(_t(queries), _t(mean), covariance=_t(covs), squared=True)
    assert out.shape == (2, 5, 3)
    flat = mahalanobis(_t(queries.reshape(10, 3, 4)), _t(mean), covariance=_t(covs))
    np.testing.assert_allclose(out.reshape(10, 3).numpy(), flat.numpy() ** 2, rtol=1e-12)
    # a single sample per position: x (P, d) -> (P,)
    single = mahalanobis(_t(queries[0, 0]), _t(mean), covariance=_t(covs), squared=True)
    np.testing.assert_allclose(single.numpy(), out[0, 0].numpy(), rtol=1e-12)


def _direct_reference(train, queries, reg, ddof):
    """numpy: covariance + reg I, explicit inverse, quadratic form per position."""
    mean = train.mean(axis=1)
    d = train.shape[-1]
    out = np.empty(queries.shape[:-1])
    for j, xj in enumerate(train):
        prec = np.linalg.inv(np.cov(xj, rowvar=False, ddof=ddof) + reg * np.eye(d))
        v = queries[:, j] - mean[j]
        out[:, j] = np.einsum("nd,de,ne->n", v, prec, v)
    return out


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 8), extra=st.integers(1, 20), p=st.integers(1, 4),
       reg=st.sampled_from([1e-3, 0.01, 1.0, 10.0]), ddof=st.integers(0, 1),
       seed=st.integers(0, 2**16))
def test_woodbury_equals_direct_path(n, extra, p, reg, ddof, seed):
    d = n + extra  # fewer samples than features
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(p, n, d)) * rng.uniform(0.5, 3, size=d)
    queries = np.concatenate([rng.normal(size=(4, p, d)), train[:, :2].transpose(1, 0, 2)])
    mean = train.mean(axis=1)
    centered = _t(train - mean[:, None])
    factor = woodbury_factor(centered, reg, ddof=ddof)
    assert factor.shape == (p, n, n)
    out = mahalanobis_woodbury(_t(queries), _t(mean), centered, factor, reg, squared=True)
    ref = _direct_reference(train, queries, reg, ddof)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-8)
    assert (out >= 0).all()
    # factor=None builds the same factor; distances (not squared) are the square roots
    dist = mahalanobis_woodbury(_t(queries), _t(mean), centered, None, reg, ddof=ddof)
    np.testing.assert_allclose(dist.numpy(), np.sqrt(ref), rtol=1e-8)


def test_woodbury_single_gaussian_and_float32():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(5, 40))
    queries = rng.normal(size=(6, 40))
    mean = train.mean(axis=0)
    ref = _direct_reference(train[None], queries[:, None], 0.5, 1)[:, 0]
    xc = _t(train - mean)
    out = mahalanobis_woodbury(_t(queries), _t(mean), xc, woodbury_factor(xc, 0.5), 0.5,
                               squared=True)
    assert out.shape == (6,)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10)
    out32 = mahalanobis_woodbury(_t(queries).float(), _t(mean).float(), xc.float(), None,
                                 0.5, squared=True)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-4)


def test_regularized_cholesky_singular_then_regularised():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4, 6))  # 4 samples in 6-D: rank-deficient covariances
    covs = np.stack([np.cov(xi, rowvar=False) for xi in x])
    covs[1] = np.eye(6)  # one healthy matrix in the batch
    with pytest.raises(ValueError, match=r"2 of 3 .*not positive-definite.*increase reg"):
        regularized_cholesky(_t(covs))
    factor = regularized_cholesky(_t(covs), reg=0.1)
    ref = np.linalg.cholesky(covs + 0.1 * np.eye(6))
    np.testing.assert_allclose(factor.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64():
    rng = np.random.default_rng(5)
    _, mean, covs = _gaussians(rng, 4, 60, 8)
    queries = rng.normal(size=(10, 4, 8))
    ref = mahalanobis(_t(queries), _t(mean), covariance=_t(covs), reg=0.01)
    out = mahalanobis(_t(queries).float(), _t(mean).float(), covariance=_t(covs).float(),
                      reg=0.01)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4)


def test_precision_cholesky_matches_numpy_inverse_and_scipy():
    rng = np.random.default_rng(11)
    p, d, n_query = 5, 7, 9
    _, mean, covs = _gaussians(rng, p, 40, d)
    upper = precision_cholesky(regularized_cholesky(_t(covs), reg=0.01))
    precisions = np.linalg.inv(covs + 0.01 * np.eye(d))
    np.testing.assert_allclose((upper @ upper.mT).numpy(), precisions, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(upper.numpy(), np.triu(upper.numpy()))
    queries = rng.normal(size=(n_query, p, d)) * 3
    out = mahalanobis(_t(queries), _t(mean), precision_cholesky=upper)
    ref = np.array([[scipy_mahalanobis(queries[i, j], mean[j], precisions[j])
                     for j in range(p)] for i in range(n_query)])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9)
    # the GEMM path and the triangular-solve path agree
    by_solve = mahalanobis(_t(queries), _t(mean), covariance=_t(covs), reg=0.01)
    np.testing.assert_allclose(out.numpy(), by_solve.numpy(), rtol=1e-10)


def test_wide_batched_covariance_d200():
    rng = np.random.default_rng(6)
    p, d = 4, 200
    x = rng.normal(size=(p, 300, d))
    covs = np.stack([np.cov(xi, rowvar=False) for xi in x])
    mean = x.mean(axis=1)
    queries = rng.normal(size=(5, p, d))
    out = mahalanobis(_t(queries), _t(mean), covariance=_t(covs), reg=0.01, squared=True)
    ref = np.stack([np.einsum("nd,nd->n", queries[:, j] - mean[j],
                              np.linalg.solve(covs[j] + 0.01 * np.eye(d),
                                              (queries[:, j] - mean[j]).T).T)
                    for j in range(p)], axis=1)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-8)


def test_inputs_not_mutated():
    rng = np.random.default_rng(7)
    train, mean, covs = _gaussians(rng, 2, 5, 9)
    tensors = [_t(a) for a in (rng.normal(size=(3, 2, 9)), mean, covs, train - mean[:, None])]
    before = [t.clone() for t in tensors]
    q, mu, c, xc = tensors
    mahalanobis(q, mu, covariance=c, reg=0.5)
    factor = regularized_cholesky(c, reg=0.5)
    factor_copy = factor.clone()
    mahalanobis(q, mu, precision_cholesky=precision_cholesky(factor))
    assert torch.equal(factor, factor_copy)
    mahalanobis_woodbury(q, mu, xc, woodbury_factor(xc, 0.5), 0.5)
    for b, t in zip(before, tensors):
        assert torch.equal(b, t)


def test_errors():
    eye = torch.eye(3, dtype=torch.float64)
    x, mu = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="square"):
        regularized_cholesky(torch.ones(3, 4))
    with pytest.raises(ValueError, match="reg"):
        regularized_cholesky(eye, reg=-1.0)
    with pytest.raises(ValueError, match="reg"):
        regularized_cholesky(eye, reg=float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        regularized_cholesky(torch.full((3, 3), float("nan")))
    with pytest.raises(TypeError):
        regularized_cholesky(np.eye(3))
    with pytest.raises(ValueError, match="exactly one"):
        mahalanobis(x, mu)
    with pytest.raises(ValueError, match="exactly one"):
        mahalanobis(x, mu, cholesky=eye, covariance=eye)
    with pytest.raises(ValueError, match="exactly one"):
        mahalanobis(x, mu, cholesky=eye, precision_cholesky=eye)
    with pytest.raises(ValueError, match="reg applies only"):
        mahalanobis(x, mu, precision_cholesky=eye, reg=0.1)
    with pytest.raises(ValueError, match="positive diagonal"):
        precision_cholesky(-eye)
    with pytest.raises(ValueError, match="square"):
        precision_cholesky(torch.ones(3, 4))
    with pytest.raises(ValueError, match="reg applies only"):
        mahalanobis(x, mu, cholesky=eye, reg=0.1)
    with pytest.raises(ValueError, match="shape"):
        mahalanobis(torch.zeros(4, 5, dtype=torch.float64), mu, cholesky=eye)
    with pytest.raises(ValueError, match="shape"):
        mahalanobis(x, mu, cholesky=torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        mahalanobis(x, mu, covariance=eye.expand(2, 3, 3))
    with pytest.raises(ValueError, match="positive diagonal"):
        mahalanobis(x, mu, cholesky=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        mahalanobis(torch.full((4, 3), float("nan")), mu, cholesky=eye)
    with pytest.raises(ValueError, match="reg"):
        woodbury_factor(x, 0.0)
    with pytest.raises(ValueError, match="sample"):
        woodbury_factor(x[:1], 0.1)
    with pytest.raises(ValueError, match="shape"):
        mahalanobis_woodbury(x, mu, torch.zeros(4, 5, dtype=torch.float64), None, 0.1)
    with pytest.raises(ValueError, match="shape"):
        mahalanobis_woodbury(x, mu, x, eye, 0.1)
    with pytest.raises(ValueError, match="reg"):
        mahalanobis_woodbury(x, mu, x, None, -1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(8)
    train = _t(rng.normal(size=(3, 5, 12)))
    mean = train.mean(1)
    xc = train - mean[:, None]
    covs = xc.mT @ xc / 4
    queries = _t(rng.normal(size=(7, 3, 12)))
    ref = mahalanobis(queries, mean, covariance=covs, reg=0.1)
    out = mahalanobis(queries.cuda(), mean.cuda(), covariance=covs.cuda(), reg=0.1)
    torch.testing.assert_close(out.cpu(), ref)
    wood = mahalanobis_woodbury(queries.cuda(), mean.cuda(), xc.cuda(), None, 0.1)
    torch.testing.assert_close(wood.cpu(), ref)


# ------------------------------------------------------------------ finite in, finite out

def _unit_problem(seed=20, p=3, d=5):
    rng = np.random.default_rng(seed)
    train, mean, covs = _gaussians(rng, p, 40, d)
    queries = rng.normal(size=(6, p, d)) * 2 + mean
    ref = np.array([[scipy_mahalanobis(queries[i, j], mean[j], np.linalg.inv(covs[j]))
                     for j in range(p)] for i in range(len(queries))])
    return train, queries, mean, covs, ref


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-20, 1e20, 1e150, 1e300])
def test_any_finite_float64_scale(scale):
    # distances are scale-free: x, mean and L scaled together give the same distances
    train, queries, mean, covs, ref = _unit_problem()
    args = (_t(queries * scale), _t(mean * scale))
    if 1e-150 < scale < 1e150:  # the covariance itself is representable
        out = mahalanobis(*args, covariance=_t(covs * scale * scale))
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9)
    factor = regularized_cholesky(_t(covs)) * scale
    np.testing.assert_allclose(mahalanobis(*args, cholesky=factor).numpy(), ref, rtol=1e-9)
    upper = precision_cholesky(factor)
    np.testing.assert_allclose(mahalanobis(*args, precision_cholesky=upper).numpy(), ref,
                               rtol=1e-9)
    sq = mahalanobis(*args, precision_cholesky=upper, squared=True)
    np.testing.assert_allclose(sq.numpy(), ref**2, rtol=1e-9)


def test_covariance_of_1e300_factorises():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(300, 200))
    cov = np.cov(x, rowvar=False)
    factor = regularized_cholesky(_t(cov * 1e300))  # the plain sums overflow float64
    np.testing.assert_allclose(factor.numpy(), np.linalg.cholesky(cov) * 1e150, rtol=1e-9,
                               atol=1e-12 * 1e150)
    tiny = regularized_cholesky(_t(cov * 1e-300), reg=1e-302)
    np.testing.assert_allclose(tiny.numpy(), np.linalg.cholesky(cov + 0.01 * np.eye(200))
                               * 1e-150, rtol=1e-9, atol=1e-162)


@pytest.mark.parametrize("scale", [1e-25, 1e15, 1e19])
def test_any_finite_float32_scale(scale):
    train, queries, mean, covs, ref = _unit_problem(seed=22)
    q32, m32 = _t(queries * scale).float(), _t(mean * scale).float()
    factor = regularized_cholesky(_t(covs)).float() * scale
    out = mahalanobis(q32, m32, cholesky=factor)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-3)
    cov32 = _t(covs * scale**2).float()
    if bool(torch.isfinite(cov32).all()) and float(cov32.abs().max()) > 1e-37:
        np.testing.assert_allclose(mahalanobis(q32, m32, covariance=cov32).numpy(), ref,
                                   rtol=2e-3)


def test_overflowing_differences_are_rescaled_or_reported():
    # x - mean overflows float32 but the distance, 6e38 / 1e30, is representable
    x = torch.tensor([[3e38], [-3e38]])
    out = mahalanobis(x, torch.tensor([-3e38]), cholesky=torch.tensor([[1e30]]))
    torch.testing.assert_close(out, torch.tensor([6e8, 0.0]))
    with pytest.raises(ValueError, match="exceed the range of torch.float32"):
        mahalanobis(x, torch.tensor([-3e38]), cholesky=torch.tensor([[1e-30]]))
    with pytest.raises(ValueError, match="squared Mahalanobis distances exceed"):
        mahalanobis(x, torch.tensor([-3e38]), cholesky=torch.tensor([[1e10]]), squared=True)


def test_woodbury_any_finite_scale():
    rng = np.random.default_rng(23)
    train = rng.normal(size=(2, 4, 12))
    mean = train.mean(1)
    queries = rng.normal(size=(3, 2, 12))
    ref = _direct_reference(train, queries, 0.5, 1)
    for scale, dtype, rtol in [(1e-150, torch.float64, 1e-9), (1e150, torch.float64, 1e-9),
                               (1e-18, torch.float32, 1e-3), (1e18, torch.float32, 1e-3)]:
        xc = _t((train - mean[:, None]) * scale).to(dtype)
        out = mahalanobis_woodbury(_t(queries * scale).to(dtype), _t(mean * scale).to(dtype),
                                   xc, None, 0.5 * scale**2, squared=True)
        assert out.dtype == dtype
        np.testing.assert_allclose(out.double().numpy(), ref, rtol=rtol)


def test_half_precision_is_computed_in_float32():
    train, queries, mean, covs, ref = _unit_problem(seed=24)
    for half in (torch.float16, torch.bfloat16):
        q, mu = _t(queries).to(half), _t(mean).to(half)
        out = mahalanobis(q, mu, covariance=_t(covs).to(half), reg=1e-3)
        assert out.dtype == torch.float32
        exact = mahalanobis(q.double(), mu.double(), covariance=_t(covs).to(half).double(),
                            reg=1e-3)
        np.testing.assert_allclose(out.numpy(), exact.numpy(), rtol=1e-4)
        factor = regularized_cholesky(_t(covs).to(half))
        assert factor.dtype == torch.float32
        assert precision_cholesky(factor.to(half)).dtype == torch.float32
        xc = _t(train - mean[:, None]).to(half)
        assert woodbury_factor(xc, 0.1).dtype == torch.float32
        assert mahalanobis_woodbury(q, mu, xc, None, 0.1).dtype == torch.float32


def test_symmetry_and_triangularity_are_checked():
    cov = torch.tensor([[2.0, 0.5], [-0.5, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric: matrix 0"):
        mahalanobis(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                    covariance=cov)
    batch = torch.eye(2, dtype=torch.float64).repeat(3, 1, 1)
    batch[2, 0, 1] = 1e-3
    with pytest.raises(ValueError, match="matrix 2"):
        regularized_cholesky(batch)
    # rounding-level asymmetry (well below sqrt(eps) of the scale) is accepted
    nearly = torch.tensor([[2.0, 0.5], [0.5 + 1e-12, 1.0]], dtype=torch.float64) * 1e200
    torch.testing.assert_close(regularized_cholesky(nearly),
                               torch.linalg.cholesky(torch.tensor([[2.0, 0.5], [0.5, 1.0]],
                                                                  dtype=torch.float64)) * 1e100)
    x, mu = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    full = torch.tensor([[2.0, 0.3], [0.5, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="lower-triangular"):
        mahalanobis(x, mu, cholesky=full)
    with pytest.raises(ValueError, match="lower-triangular"):
        precision_cholesky(full)
    with pytest.raises(ValueError, match="upper-triangular"):
        mahalanobis(x, mu, precision_cholesky=full)
    xc = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="lower-triangular"):
        mahalanobis_woodbury(x, mu, xc, torch.ones(3, 3, dtype=torch.float64), 0.1)


def test_empty_axes_are_named():
    eye = torch.eye(2)
    with pytest.raises(ValueError, match="0 x 0"):
        regularized_cholesky(torch.zeros(0, 0))
    with pytest.raises(ValueError, match="0 x 0"):
        precision_cholesky(torch.zeros(3, 0, 0))
    with pytest.raises(ValueError, match="0 features \\(axis 0"):
        mahalanobis(torch.zeros(3, 0), torch.zeros(0), cholesky=torch.zeros(0, 0))
    with pytest.raises(ValueError, match="0 positions \\(axis 0"):
        mahalanobis(torch.zeros(3, 0, 2), torch.zeros(0, 2), cholesky=torch.zeros(0, 2, 2))
    with pytest.raises(ValueError, match="0 features"):
        woodbury_factor(torch.zeros(4, 0), 0.1)
    with pytest.raises(ValueError, match="0 sample"):
        woodbury_factor(torch.zeros(0, 3), 0.1, ddof=-1)
    # no queries: an empty result, not an error
    assert mahalanobis(torch.zeros(0, 2), torch.zeros(2), cholesky=eye).shape == (0,)
    assert mahalanobis(torch.zeros(0, 4, 2), torch.zeros(4, 2),
                       precision_cholesky=eye.expand(4, 2, 2)).shape == (0, 4)
    xc = torch.ones(4, 2)
    assert mahalanobis_woodbury(torch.zeros(0, 2), torch.zeros(2), xc, None, 0.1).shape == (0,)
    with pytest.raises(ValueError, match="exceeds the range"):
        regularized_cholesky(eye, reg=1e300)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 16, 100, 101])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tril_inverse_matches_scipy(d, dtype):
    from scipy.linalg import solve_triangular

    from skanomaly.functional import tril_inverse

    rng = np.random.default_rng(d)
    a = rng.normal(size=(3, 2, d, 2 * d))
    lower = np.linalg.cholesky(a @ a.swapaxes(-1, -2) / (2 * d) + 0.1 * np.eye(d))
    # entries above the diagonal are not read
    noisy = lower + np.triu(rng.normal(size=lower.shape), 1)
    before = torch.as_tensor(noisy, dtype=dtype)
    copy = before.clone()
    got = tril_inverse(before)
    assert torch.equal(before, copy) and got.dtype == dtype and got.shape == before.shape
    expected = np.stack([[solve_triangular(m.astype(np.float64), np.eye(d), lower=True)
                          for m in batch] for batch in lower.astype(
                              np.float32 if dtype == torch.float32 else np.float64)])
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(got.numpy(), expected, rtol=0,
                               atol=tol * np.abs(expected).max())
    assert np.all(np.triu(got.numpy(), 1) == 0)


def test_tril_inverse_rejects_non_square():
    from skanomaly.functional import tril_inverse

    with pytest.raises(ValueError):
        tril_inverse(torch.zeros(3, 4, dtype=torch.float64))


def test_tril_inverse_and_precision_cholesky_write_into_out_views():
    from skanomaly.functional import precision_cholesky, tril_inverse

    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, 40, 30))
    lower = torch.as_tensor(np.linalg.cholesky(a.swapaxes(-1, -2) @ a / 40 + 0.1 * np.eye(30)))
    plain = tril_inverse(lower)
    block = torch.full((8, 30, 30), 7.0, dtype=torch.float64)  # stale entries are cleared
    got = tril_inverse(lower, out=block[2:7].mT)
    # the products read the transposed blocks they wrote: equal up to rounding
    assert got.data_ptr() == block[2].data_ptr() and torch.equal(got, block[2:7].mT)
    np.testing.assert_allclose(got.numpy(), plain.numpy(), rtol=0,
                               atol=1e-13 * float(plain.abs().max()))
    assert torch.equal(got.triu(1), torch.zeros_like(got))
    assert torch.equal(block[:2], torch.full((2, 30, 30), 7.0, dtype=torch.float64))
    upper = torch.empty(5, 30, 30, dtype=torch.float64)
    assert precision_cholesky(lower, out=upper) is upper
    assert torch.equal(upper, precision_cholesky(lower))
    np.testing.assert_allclose((upper @ upper.mT).numpy(),
                               np.linalg.inv((lower @ lower.mT).numpy()), rtol=1e-9)
    with pytest.raises(ValueError, match="out must be"):
        tril_inverse(lower, out=torch.empty(5, 30, 29, dtype=torch.float64))


def test_cholesky_ex_split_over_threads_is_bitwise_one_call():
    from skanomaly.functional.mahalanobis import cholesky_ex

    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 80, 48))
    a = torch.as_tensor(x.swapaxes(-1, -2) @ x / 80)
    a[450] = -torch.eye(48, dtype=torch.float64)  # not positive-definite, in a later chunk
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        factor, info = cholesky_ex(a.view(3, 200, 48, 48))
    finally:
        torch.set_num_threads(threads)
    ref_factor, ref_info = torch.linalg.cholesky_ex(a)
    assert factor.shape == (3, 200, 48, 48) and info.shape == (3, 200)
    assert torch.equal(factor.reshape(600, 48, 48)[:450], ref_factor[:450])
    assert torch.equal(info.reshape(600), ref_info) and int(info.reshape(600)[450]) == 1
    np.testing.assert_allclose(ref_factor[:450].numpy(), np.linalg.cholesky(
        (x.swapaxes(-1, -2) @ x / 80)[:450]), rtol=1e-10, atol=1e-12)
