"""Spatial kernels against scipy.ndimage and hand-computed bilinear interpolation."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from skanomaly.functional import gaussian_blur2d, gaussian_kernel1d, upsample_bilinear


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0, 2.7, 4.0])
@pytest.mark.parametrize("truncate", [1.0, 4.0])
def test_kernel_matches_scipy_impulse_response(sigma, truncate):
    kernel = gaussian_kernel1d(sigma, truncate, dtype=torch.float64)
    radius = int(truncate * sigma + 0.5)
    assert kernel.shape == (2 * radius + 1,)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    expected = ndimage.gaussian_filter1d(impulse, sigma, mode="constant", truncate=truncate)
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (2, 3), (7, 5), (32, 45)])
@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.5, 4.0])
def test_blur_matches_scipy_mirror_everywhere(shape, sigma):
    # Includes maps smaller than the kernel radius, where mirroring repeats.
    image = np.random.default_rng(0).normal(size=shape)
    got = gaussian_blur2d(torch.tensor(image), sigma)
    expected = ndimage.gaussian_filter(image, sigma, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


def test_blur_anisotropic_and_batched():
    maps = np.random.default_rng(1).normal(size=(2, 3, 20, 17))
    got = gaussian_blur2d(torch.tensor(maps), (1.5, 3.0), truncate=3.0)
    expected = ndimage.gaussian_filter(maps, (0, 0, 1.5, 3.0), mode="mirror", truncate=3.0)
    assert got.shape == maps.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    got3 = gaussian_blur2d(torch.tensor(maps[0]), 2.0)
    np.testing.assert_allclose(got3.numpy(), ndimage.gaussian_filter(maps[0], (0, 2, 2),
                                                                     mode="mirror"), atol=1e-10)


def test_blur_float32_and_constant():
    image = np.random.default_rng(2).normal(size=(3, 24, 24))
    got = gaussian_blur2d(torch.tensor(image, dtype=torch.float32), 4.0)
    assert got.dtype == torch.float32
    expected = ndimage.gaussian_filter(image, (0, 4, 4), mode="mirror")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    constant = torch.full((2, 9, 4), 3.5, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur2d(constant, 6.0), constant)


def _bilinear_reference(image, height, width):
    """Half-pixel-centre bilinear interpolation with edge clamping, written out in numpy."""
    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    r0, r1, fr = axis(image.shape[0], height)
    c0, c1, fc = axis(image.shape[1], width)
    top = image[r0][:, c0] * (1 - fc) + image[r0][:, c1] * fc
    bottom = image[r1][:, c0] * (1 - fc) + image[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def test_upsample_hand_computed_2x2():
    got = upsample_bilinear(torch.tensor([[[0.0, 4.0], [8.0, 12.0]]], dtype=torch.float64), 4)
    # Output samples sit at input coordinates -0.25 (clamped), 0.25, 0.75 and 1.25 (clamped).
    rows = np.array([0.0, 2.0, 6.0, 8.0])
    cols = np.array([0.0, 1.0, 3.0, 4.0])
    np.testing.assert_allclose(got[0].numpy(), rows[:, None] + cols[None, :])


@pytest.mark.parametrize(("size", "out"), [((5, 7), (16, 9)), ((8, 8), (3, 5)), ((1, 4), (3, 2))])
def test_upsample_matches_numpy_reference(size, out):
    image = np.random.default_rng(3).normal(size=size)
    got = upsample_bilinear(torch.tensor(image), out)
    np.testing.assert_allclose(got.numpy(), _bilinear_reference(image, *out), atol=1e-12)


def test_upsample_shapes_and_constant():
    for shape in [(6, 5), (2, 6, 5), (2, 3, 6, 5)]:
        x = torch.full(shape, -1.25, dtype=torch.float32)
        got = upsample_bilinear(x, (13, 11))
        assert got.shape == (*shape[:-2], 13, 11) and got.dtype == torch.float32
        torch.testing.assert_close(got, torch.full_like(got, -1.25))


def test_inputs_not_mutated():
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0))
    copy = x.clone()
    gaussian_blur2d(x, 2.0)
    upsample_bilinear(x, 16)
    assert torch.equal(x, copy)


def test_errors():
    x = torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur2d(x, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur2d(x, (1.0, 2.0, 3.0))
    with pytest.raises(TypeError, match="sigma"):
        gaussian_kernel1d("2")
    with pytest.raises(ValueError, match="truncate"):
        gaussian_kernel1d(1.0, truncate=-1.0)
    with pytest.raises(ValueError, match="2 or 3 or 4-D"):
        gaussian_blur2d(torch.zeros(8), 1.0)
    with pytest.raises(ValueError, match="2 or 3 or 4-D"):
        upsample_bilinear(torch.zeros(1, 1, 1, 4, 4), 8)
    with pytest.raises(ValueError, match="empty"):
        gaussian_blur2d(torch.zeros(2, 0, 3), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_blur2d(torch.full((3, 3), float("nan")), 1.0)
    with pytest.raises(ValueError, match="size"):
        upsample_bilinear(x, 0)
    with pytest.raises(ValueError, match="size"):
        upsample_bilinear(x, (4, 4, 4))
    with pytest.raises(TypeError, match="size"):
        upsample_bilinear(x, 4.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    blurred = gaussian_blur2d(x.cuda(), (1.0, 5.0))
    assert blurred.is_cuda
    torch.testing.assert_close(blurred.cpu(), gaussian_blur2d(x, (1.0, 5.0)))
    torch.testing.assert_close(upsample_bilinear(x.cuda(), (20, 11)).cpu(),
                               upsample_bilinear(x, (20, 11)))


# ------------------------------------------------------------------ finite in, finite out

def test_tiny_sigma_is_the_identity_and_huge_sigma_is_refused():
    assert gaussian_kernel1d(1e-300, 1e300, dtype=torch.float32).tolist() == [0.0, 1.0, 0.0]
    image = torch.randn(2, 5, 6, dtype=torch.float64)
    assert torch.equal(gaussian_blur2d(image, 1e-300), image)
    with pytest.raises(ValueError, match="radius of 4e\\+300 samples"):
        gaussian_blur2d(image, 1e300)
    with pytest.raises(ValueError, match="radius"):
        gaussian_kernel1d(1.0, 1e300)
    with pytest.raises(TypeError, match="floating"):
        gaussian_kernel1d(1.0, dtype=torch.int64)


@pytest.mark.parametrize("shape", [(1, 3), (5, 7), (2, 2)])
def test_kernel_much_wider_than_the_map_is_folded(shape):
    # sigma 60: a 481-sample kernel mirrored many times over a map of a few pixels
    image = np.random.default_rng(9).normal(size=shape)
    got = gaussian_blur2d(torch.tensor(image), 60.0)
    expected = ndimage.gaussian_filter(image, 60.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_top_of_the_range_stays_finite():
    top = torch.finfo(torch.float32).max
    x = torch.full((1, 6, 6), top)
    x[0, 0, 0] = -top
    blurred = gaussian_blur2d(x, 1.0)
    up = upsample_bilinear(x, (13, 9))
    for out in (blurred, up):
        assert bool(torch.isfinite(out).all()) and float(out.max()) <= top
    np.testing.assert_allclose(blurred.double().numpy(), ndimage.gaussian_filter(
        x.double().numpy(), (0, 1, 1), mode="mirror"), rtol=1e-5, atol=1e33)
    half = torch.full((4, 4), 65504.0, dtype=torch.float16)
    assert torch.equal(gaussian_blur2d(half, 2.0), half)
    assert upsample_bilinear(half, 7).dtype == torch.float16


def test_half_precision_computed_in_float32():
    image = np.random.default_rng(10).normal(size=(9, 11)).astype(np.float16)
    got = gaussian_blur2d(torch.tensor(image), 1.5)
    assert got.dtype == torch.float16
    expected = ndimage.gaussian_filter(image.astype(np.float64), 1.5, mode="mirror")
    np.testing.assert_allclose(got.double().numpy(), expected, atol=4e-3)
    assert gaussian_kernel1d(1e5, 1.0, dtype=torch.float16).sum().item() == pytest.approx(1, 1e-2)


def test_postprocess_anomaly_map_checks_its_arguments():
    from skanomaly.anomaly_map import postprocess_anomaly_map

    maps = torch.rand(2, 4, 4, dtype=torch.float64)
    out = postprocess_anomaly_map(maps, (8, 6), sigma=1.0)
    expected = ndimage.gaussian_filter(upsample_bilinear(maps, (8, 6)).numpy(), (0, 1, 1),
                                       mode="mirror")
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)
    assert torch.equal(postprocess_anomaly_map(maps, 4, sigma=0), maps)
    with pytest.raises(TypeError, match="torch.Tensor"):
        postprocess_anomaly_map(maps.numpy(), 8)
    with pytest.raises(ValueError, match="finite"):
        postprocess_anomaly_map(maps, 8, sigma=float("nan"))
    with pytest.raises(TypeError, match="sigma"):
        postprocess_anomaly_map(maps, 8, sigma=True)
    with pytest.raises(TypeError, match="output_size"):
        postprocess_anomaly_map(maps, 8.5)
    with pytest.raises(ValueError, match="output_size"):
        postprocess_anomaly_map(maps, (0, 3))
    with pytest.raises(ValueError, match="empty spatial"):
        postprocess_anomaly_map(torch.zeros(2, 0, 3), 8)
    assert postprocess_anomaly_map(torch.zeros(0, 3, 3), 5).shape == (0, 5, 5)
