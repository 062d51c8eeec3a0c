"""Gaussian smoothing and bilinear upsampling of 2-D score maps.

:func:`gaussian_blur2d` matches :func:`scipy.ndimage.gaussian_filter` with
``mode="mirror"`` (the "reflect" padding of torch and kornia, which anomalib
uses) for any map size; :func:`upsample_bilinear` is ``F.interpolate`` with
``align_corners=False``, as anomalib's anomaly-map generators.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from ._validation import (
    all_finite,
    as_float_tensor,
    check_finite,
    check_ndim,
    check_positive_int,
    working_dtype,
)

__all__ = ["gaussian_kernel1d", "gaussian_blur2d", "upsample_bilinear"]

_MAX_RADIUS = 2**24  # kernel radius in samples (a 64 MB float32 kernel)


def _check_sigma(sigma, name: str = "sigma") -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, Real):
        raise TypeError(f"{name} must be a real number, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{name} must be finite and positive, got {sigma!r}")
    return float(sigma)


def gaussian_kernel1d(
    sigma: float,
    truncate: float = 4.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel of standard deviation ``sigma`` (in samples).

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels, positive.
    truncate : float, default=4.0
        The kernel radius is ``int(truncate * sigma + 0.5)`` pixels; non-negative.
    dtype : torch.dtype, optional
        Default: ``torch.get_default_dtype()``.
    device : torch.device or str, optional
        Default: CPU.

    Returns
    -------
    Tensor of shape (2 * radius + 1,)
        ``exp(-x**2 / (2 sigma**2))`` for ``x = -radius..radius``, summing to one.

    Raises
    ------
    TypeError
        If ``sigma`` or ``truncate`` is not a real number, or ``dtype`` is not floating.
    ValueError
        If ``sigma`` is not finite and positive, ``truncate`` is negative or infinite,
        or the radius exceeds ``2**24`` samples.

    Notes
    -----
    The kernel of :func:`scipy.ndimage.gaussian_filter` (order 0), and of
    kornia's ``gaussian_blur2d`` with ``kernel_size = 2 * int(4 * sigma + 0.5) + 1``
    as anomalib sets it.

    Examples
    --------
    >>> gaussian_kernel1d(1.0, truncate=1.0, dtype=torch.float64)
    tensor([0.2741, 0.4519, 0.2741], dtype=torch.float64)
    """
    sigma = _check_sigma(sigma)
    if isinstance(truncate, bool) or not isinstance(truncate, Real):
        raise TypeError(f"truncate must be a real number, got {truncate!r}")
    if not (math.isfinite(truncate) and truncate >= 0):
        raise ValueError(f"truncate must be finite and non-negative, got {truncate!r}")
    reach = truncate * sigma + 0.5
    if not reach <= _MAX_RADIUS:
        raise ValueError(f"sigma={sigma!r} with truncate={truncate!r} gives a kernel radius of "
                         f"{reach:.3g} samples; at most 2**24 are supported")
    radius = int(reach)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    work = working_dtype(dtype)  # half precision: computed in float32, rounded at the end
    if sigma > 1e-150:
        x = torch.arange(-radius, radius + 1, dtype=work, device=device)
        kernel = torch.exp(-0.5 / (sigma * sigma) * x**2)  # scipy's arithmetic
    else:  # sigma**2 underflows: the same Gaussian, in float64, without 1 / sigma**2
        x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2).to(work)
    return (kernel / kernel.sum()).to(dtype)


def _blur_matrix(length: int, kernel: torch.Tensor) -> torch.Tensor:
    """``(length, length)`` matrix ``B`` with ``line @ B`` = correlation of ``line`` with
    ``kernel`` under scipy's "mirror" extension (folded into the matrix, so no padding)."""
    radius = kernel.shape[0] // 2
    if length == 1:  # a single sample mirrors onto itself
        return kernel.sum().reshape(1, 1)
    period = 2 * (length - 1)
    offsets = torch.arange(-radius, radius + 1, device=kernel.device)
    if kernel.shape[0] > period:
        # The extension is periodic: fold the kernel onto one period first, so that the
        # memory is O(length**2 + radius) rather than O(length * radius).
        lead = -radius % period
        padded = torch.cat((kernel.new_zeros(lead), kernel,
                            kernel.new_zeros(-(lead + kernel.shape[0]) % period)))
        kernel = padded.reshape(-1, period).sum(0)  # kernel[t]: offsets = t (mod period)
        offsets = torch.arange(period, device=kernel.device)
    outputs = torch.arange(length, device=kernel.device)
    sources = (outputs[:, None] + offsets).remainder(period)
    sources = torch.where(sources < length, sources, period - sources)
    flat = (sources * length + outputs[:, None]).flatten()
    matrix = kernel.new_zeros(length * length)
    return matrix.index_add_(0, flat, kernel.repeat(length)).view(length, length)


def _convex(apply, x: torch.Tensor) -> torch.Tensor:
    """``apply(x)`` for a map ``apply`` whose outputs are convex combinations of inputs.

    Half precision is computed in float32 and rounded back. The exact result lies
    within ``[-max|x|, max|x|]``, so an overflow can only be rounding at the top of the
    range: then the maps are halved (exactly), processed, doubled and clamped.
    """
    dtype = x.dtype
    work = x.to(working_dtype(dtype))
    out = apply(work)
    if not all_finite(out):
        top = torch.finfo(work.dtype).max
        out = apply(work * 0.5).mul_(2.0).clamp_(-top, top)
    out = out.to(dtype)
    if not all_finite(out):  # rounding back to half precision at its very top
        top = torch.finfo(dtype).max
        out = apply(work).clamp_(-top, top).to(dtype)
    return out


def _check_maps(x, name: str = "x") -> torch.Tensor:
    """``x`` validated as finite maps of shape (H, W), (N, H, W) or (N, C, H, W)."""
    x = check_finite(check_ndim(as_float_tensor(x, name), (2, 3, 4), name), name)
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty spatial dimension: shape {tuple(x.shape)}")
    return x


def gaussian_blur2d(x: torch.Tensor, sigma, *, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian blur over the last two dimensions of ``x``, each map separately.

    Parameters
    ----------
    x : Tensor of shape (H, W), (N, H, W) or (N, C, H, W)
        Score maps. Not modified.
    sigma : float or (float, float)
        Standard deviation in pixels, positive; a pair is ``(sigma_h, sigma_w)``.
    truncate : float, default=4.0
        Kernel radius in standard deviations, as :func:`gaussian_kernel1d`.

    Returns
    -------
    Tensor of the shape, dtype and device of ``x``
        The blurred maps (integer and boolean maps give the default float dtype;
        float16 and bfloat16 are computed in float32 and rounded back).

    Raises
    ------
    TypeError
        If ``x`` is not a tensor or ``sigma``/``truncate`` are not real numbers.
    ValueError
        If ``x`` is not 2-, 3- or 4-D, has an empty spatial dimension or holds NaN
        or infinity; if ``sigma`` is not positive or is a sequence not of length 2;
        if the kernel radius exceeds ``2**24`` samples.

    Notes
    -----
    Separable correlation with the kernels of :func:`gaussian_kernel1d`, the border
    extended by mirroring about the edge samples (``d c b | a b c d | c b a``):
    scipy's ``mode="mirror"``, which is torch's and kornia's ``"reflect"`` padding
    used by anomalib. Unlike torch's padding, the mirroring is repeated as scipy
    does when the kernel radius reaches the map size (a map of one pixel is
    extended by replication), so any size works; a kernel wider than the mirror's
    period is first folded onto one period, so the memory does not grow with it.
    Each output is a convex combination of inputs, so it is finite for any finite
    map (rounding at the very top of the range is clamped).

    Each pass is one matrix product with an ``(L, L)`` banded matrix into which the
    mirrored border is folded, so no padded copy is made. That costs
    ``O(H W (H + W))`` operations per map instead of ``O(H W r)``, but runs at BLAS
    speed, well ahead of a direct convolution for score maps up to a few thousand
    pixels a side; the two matrices take ``H**2 + W**2`` entries.

    Examples
    --------
    >>> import torch
    >>> ramp = torch.arange(5.0).repeat(3, 1)  # mirrored edges bend the ramp inwards
    >>> gaussian_blur2d(ramp, 0.8)
    tensor([[0.5469, 1.0456, 2.0000, 2.9544, 3.4531],
            [0.5469, 1.0456, 2.0000, 2.9544, 3.4531],
            [0.5469, 1.0456, 2.0000, 2.9544, 3.4531]])
    """
    x = _check_maps(x)
    sigmas = tuple(sigma) if isinstance(sigma, (tuple, list)) else (sigma, sigma)
    if len(sigmas) != 2:
        raise ValueError(f"sigma must be a number or a pair (sigma_h, sigma_w), got {sigma!r}")
    work = working_dtype(x.dtype)
    kernels = [gaussian_kernel1d(s, truncate, dtype=work, device=x.device) for s in sigmas]
    rows = _blur_matrix(x.shape[-2], kernels[0])
    cols = _blur_matrix(x.shape[-1], kernels[1])
    return _convex(lambda maps: _blur(maps, rows, cols), x)


def _blur(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows^T @ maps @ cols``: the unchecked blur of :func:`gaussian_blur2d` (matrices
    from :func:`_blur_matrix`), for maps (..., H, W) in the matrices' dtype."""
    return torch.matmul(rows.transpose(0, 1), maps @ cols)


def _interpolate(maps: torch.Tensor, size) -> torch.Tensor:
    """The unchecked resize of :func:`upsample_bilinear`: (N, C, h, w) -> (N, C, *size)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def bilinear_matrix(n_in: int, n_out: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """``(n_out, n_in)`` matrix ``A``: ``A @ line`` is the bilinear resize of ``line``
    (``align_corners=False``, torch's source index ``(i + 0.5) n_in / n_out - 0.5``,
    clamped at 0), so ``A_h @ maps @ A_w.T`` is :func:`_interpolate` as matrix products
    (ONNX MatMul, which onnxruntime runs in float64; its Resize is float only)."""
    out = torch.arange(n_out, dtype=torch.float64)
    src = ((out + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    low = src.floor().to(torch.int64).clamp_max(n_in - 1)
    weight = src - low
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.index_put_((rows, low), 1 - weight, accumulate=True)
    matrix.index_put_((rows, (low + 1).clamp_max(n_in - 1)), weight, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def upsample_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of the last two dimensions of ``x`` (``align_corners=False``).

    Parameters
    ----------
    x : Tensor of shape (H, W), (N, H, W) or (N, C, H, W)
        Maps. Not modified.
    size : int or (int, int)
        Output ``(height, width)``; an int gives a square output.

    Returns
    -------
    Tensor of shape (..., height, width)
        Same leading dimensions, dtype and device as ``x`` (integer and boolean maps
        give the default float dtype; half precision is computed in float32).

    Raises
    ------
    TypeError
        If ``x`` is not a tensor or ``size`` holds non-integers.
    ValueError
        If ``x`` is not 2-, 3- or 4-D, has an empty spatial dimension or holds NaN
        or infinity, or ``size`` is not positive or not of length 2.

    Notes
    -----
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, as
    anomalib's anomaly maps: output pixel ``i`` samples the input at
    ``(i + 0.5) * H / height - 0.5``, clamped to the edge. Despite the name it also
    downsamples, without antialiasing.

    Examples
    --------
    >>> import torch
    >>> upsample_bilinear(torch.tensor([[0.0, 1.0]]), (1, 4))
    tensor([[0.0000, 0.2500, 0.7500, 1.0000]])
    """
    x = _check_maps(x)
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(sizes) != 2:
        raise ValueError(f"size must be an int or a pair (height, width), got {size!r}")
    height, width = (check_positive_int(s, "size") for s in sizes)
    maps = x.reshape(-1, 1, *x.shape[-2:])
    out = _convex(lambda m: _interpolate(m, (height, width)), maps)
    return out.reshape(*x.shape[:-2], height, width)
