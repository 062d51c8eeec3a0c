"""PCA kernels against scikit-learn's PCA(svd_solver="full")."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA

from skanomaly.functional import pca_fit, pca_inverse_transform, pca_transform


def _data(n, d, seed=0):
    """Correlated data with clearly separated variances."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(5.0, 0.2, d)
    return (rng.normal(size=(n, d)) * scales) @ np.linalg.qr(rng.normal(size=(d, d)))[0] + 3.0


def _sklearn(x, n_components):
    return PCA(n_components=n_components, svd_solver="full").fit(x)


@pytest.mark.parametrize(("n", "d", "n_components"), [(50, 6, None), (50, 6, 3), (5, 12, 4),
                                                      (5, 12, 2), (40, 40, 0.9)])
def test_matches_sklearn(n, d, n_components):
    x = _data(n, d)
    ref = _sklearn(x, n_components)
    fit = pca_fit(torch.tensor(x), n_components)
    assert fit.n_components == ref.n_components_
    # Same sign convention as scikit-learn >= 1.5, so no sign alignment is needed.
    np.testing.assert_allclose(fit.components.numpy(), ref.components_, atol=1e-10)
    np.testing.assert_allclose(fit.explained_variance.numpy(), ref.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(fit.explained_variance_ratio.numpy(),
                               ref.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(fit.singular_values.numpy(), ref.singular_values_, rtol=1e-10)
    np.testing.assert_allclose(fit.mean.numpy(), ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(float(fit.noise_variance), ref.noise_variance_, rtol=1e-10,
                               atol=1e-14)
    new = _data(7, d, seed=1)
    z = pca_transform(torch.tensor(new), fit)
    np.testing.assert_allclose(z.numpy(), ref.transform(new), atol=1e-10)
    np.testing.assert_allclose(pca_inverse_transform(z, fit).numpy(),
                               ref.inverse_transform(ref.transform(new)), atol=1e-10)


def test_sign_convention_and_orthonormality():
    fit = pca_fit(torch.tensor(_data(30, 5, seed=3)))
    comps = fit.components
    largest = comps.gather(1, comps.abs().argmax(1, keepdim=True))
    assert bool((largest > 0).all())
    torch.testing.assert_close(comps @ comps.T, torch.eye(5, dtype=comps.dtype))


def test_full_reconstruction_and_shapes():
    x = torch.tensor(_data(20, 4))
    fit = pca_fit(x)
    assert fit.components.shape == (4, 4) and fit.mean.shape == (4,)
    assert fit.noise_variance.shape == () and float(fit.noise_variance) == 0.0
    torch.testing.assert_close(pca_inverse_transform(pca_transform(x, fit), fit), x)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1.0 - 1e-6, exclude_min=True, exclude_max=True))
def test_fractional_n_components_matches_sklearn(fraction):
    x = _data(60, 8, seed=5)
    assert pca_fit(torch.tensor(x), fraction).n_components == _sklearn(x, fraction).n_components_


def test_fraction_threshold_is_strict():
    # k components are kept once the cumulative ratio is STRICTLY above the fraction.
    fit = pca_fit(torch.tensor(_data(60, 8, seed=2)))
    cumsum = torch.cumsum(fit.explained_variance_ratio, 0)
    x = torch.tensor(_data(60, 8, seed=2))
    for j in range(5):
        assert pca_fit(x, float(cumsum[j]) - 1e-9).n_components == j + 1
        assert pca_fit(x, float(cumsum[j]) + 1e-9).n_components == j + 2


def test_float32():
    x = _data(80, 6, seed=4)
    ref = _sklearn(x, 4)
    fit = pca_fit(torch.tensor(x, dtype=torch.float32), 4)
    assert fit.components.dtype == torch.float32 and fit.noise_variance.dtype == torch.float32
    np.testing.assert_allclose(fit.components.numpy(), ref.components_, atol=1e-4)
    np.testing.assert_allclose(fit.explained_variance.numpy(), ref.explained_variance_, rtol=1e-4)
    z = pca_transform(torch.tensor(x[:5], dtype=torch.float32), fit)
    assert z.dtype == torch.float32
    np.testing.assert_allclose(z.numpy(), ref.transform(x[:5]), atol=1e-3)


def test_transform_follows_input_dtype():
    fit = pca_fit(torch.tensor(_data(20, 3)), 2)
    z = pca_transform(torch.tensor(_data(4, 3), dtype=torch.float32), fit)
    assert z.dtype == torch.float32 and z.shape == (4, 2)


def test_inputs_not_mutated():
    x = torch.tensor(_data(20, 4))
    copy = x.clone()
    fit = pca_fit(x, 2)
    z = pca_transform(x, fit)
    z_copy = z.clone()
    pca_inverse_transform(z, fit)
    assert torch.equal(x, copy) and torch.equal(z, z_copy)


def test_integer_input_is_promoted():
    x = torch.tensor([[0, 1], [2, 5], [4, 8], [7, 7]])
    fit = pca_fit(x)
    ref = _sklearn(x.numpy().astype(float), None)
    assert fit.components.dtype == torch.get_default_dtype()
    np.testing.assert_allclose(fit.explained_variance.numpy(), ref.explained_variance_, rtol=1e-5)


@pytest.mark.parametrize("bad", [0, 5, -1, 1.0, 1.5, 0.0, -0.2])
def test_bad_n_components(bad):
    with pytest.raises(ValueError, match="n_components"):
        pca_fit(torch.tensor(_data(10, 4)), bad)


@pytest.mark.parametrize("bad", ["mle", True, [2]])
def test_n_components_type(bad):
    with pytest.raises(TypeError, match="n_components"):
        pca_fit(torch.tensor(_data(10, 4)), bad)


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        pca_fit(torch.ones(1, 3))
    x = torch.tensor(_data(10, 3))
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pca_fit(x)
    with pytest.raises(ValueError, match="2-D"):
        pca_fit(torch.ones(5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pca_fit(_data(5, 2))
    fit = pca_fit(torch.tensor(_data(10, 3)), 2)
    with pytest.raises(ValueError, match="columns"):
        pca_transform(torch.ones(2, 4, dtype=torch.float64), fit)
    with pytest.raises(ValueError, match="columns"):
        pca_inverse_transform(torch.ones(2, 3, dtype=torch.float64), fit)
    with pytest.raises(ValueError, match="infinity"):
        pca_transform(torch.full((2, 3), float("inf")), fit)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.tensor(_data(40, 6))
    cpu, gpu = pca_fit(x, 0.9), pca_fit(x.cuda(), 0.9)
    assert gpu.n_components == cpu.n_components and gpu.components.is_cuda
    torch.testing.assert_close(gpu.components.cpu(), cpu.components)
    torch.testing.assert_close(pca_transform(x.cuda(), gpu).cpu(), pca_transform(x, cpu))


# ------------------------------------------------------------------ finite in, finite out

@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-100, 1e100, 1e150])
def test_any_representable_float64_scale(scale):
    # squares of 1e-200 underflow float64 and of 1e160 overflow it; the PCA is scale-free
    x = _data(30, 4)
    ref = _sklearn(x, None)
    fit = pca_fit(torch.tensor(x * scale))
    np.testing.assert_allclose(fit.components.numpy(), ref.components_, atol=1e-10)
    np.testing.assert_allclose(fit.explained_variance_ratio.numpy(),
                               ref.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(fit.singular_values.numpy() / scale, ref.singular_values_,
                               rtol=1e-10)
    if scale >= 1e-150:  # the variances themselves are representable
        np.testing.assert_allclose(fit.explained_variance.numpy() / scale / scale,
                                   ref.explained_variance_, rtol=1e-10)
    new = _data(5, 4, seed=3)
    z = pca_transform(torch.tensor(new * scale), fit)
    np.testing.assert_allclose(z.numpy() / scale, ref.transform(new), rtol=1e-9, atol=1e-9)
    back = pca_inverse_transform(z, fit)
    np.testing.assert_allclose(back.numpy() / scale, ref.inverse_transform(ref.transform(new)),
                               rtol=1e-9)


def test_overflow_is_reported_or_avoided():
    x = torch.tensor([[1e30, 0.0], [-1e30, 1.0], [0.0, 2.0]])  # variance 1e60: not float32
    with pytest.raises(ValueError, match="variances .* exceed the range of torch.float32"):
        pca_fit(x)
    fit64 = pca_fit(x.double())
    np.testing.assert_allclose(fit64.explained_variance_ratio.numpy(),
                               _sklearn(x.double().numpy(), None).explained_variance_ratio_)
    # x - mean overflows float32, its projection on the diagonal does not
    fit = pca_fit(torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.5, 0.0]]), 1)
    fit = fit._replace(mean=torch.tensor([-3e38, 3e38]))
    z = pca_transform(torch.tensor([[3e38, -3e38], [3e38, -2.9e38]]), fit)
    centred = torch.tensor([[6e38, 6e38], [-6e38, -5.9e38]], dtype=torch.float64)
    expected = (fit.components.double() @ centred).T
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e33)
    with pytest.raises(ValueError, match="projections exceed the range"):
        pca_transform(torch.tensor([[3.4e38, 3.4e38]]), fit._replace(mean=torch.tensor(
            [-3.4e38, -3.4e38])))


def test_constant_data_and_half_precision():
    fit = pca_fit(torch.ones(5, 3))
    assert torch.equal(fit.explained_variance_ratio, torch.zeros(3))
    assert torch.equal(fit.explained_variance, torch.zeros(3))
    assert pca_fit(torch.ones(5, 3), 0.5).n_components == 3
    x16 = torch.tensor(_data(20, 3), dtype=torch.float16)
    fit16 = pca_fit(x16)
    assert fit16.components.dtype == torch.float32
    ref = _sklearn(x16.double().numpy(), None)
    np.testing.assert_allclose(fit16.explained_variance_ratio.numpy(),
                               ref.explained_variance_ratio_, rtol=1e-4)
    assert pca_transform(x16, fit16).dtype == torch.float32
    with pytest.raises(ValueError, match="0 features \\(axis 1"):
        pca_fit(torch.zeros(4, 0))
    with pytest.raises(ValueError, match="0 sample"):
        pca_fit(torch.zeros(0, 3))
    bad = fit._replace(mean=torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="fit.mean contains NaN"):
        pca_transform(torch.ones(2, 3), bad)
