"""Gaussian kernel density estimation with :func:`scipy.stats.gaussian_kde` semantics.

The log density is computed in whitened coordinates (the Cholesky factor of the
kernel covariance) by chunked matrix products and ``logsumexp``, so it stays exact
far in the tails where the density itself underflows. Unlike scipy, datasets are
``(n_samples, n_features)``: rows are samples.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from ._validation import (
    as_float_tensor,
    check_finite,
    check_min_samples,
    check_ndim,
    check_positive_int,
)

__all__ = ["gaussian_kde_logpdf", "kde_covariance"]

_CHUNK_ELEMENTS = 1 << 23  # entries of one (chunk, n_samples) block: 64 MB in float64


def _as_samples(x, name: str) -> torch.Tensor:
    """Validated 2-D float tensor; a 1-D tensor is one feature (a column)."""
    x = check_finite(check_ndim(as_float_tensor(x, name), (1, 2), name), name)
    return x[:, None] if x.ndim == 1 else x


def _normalized_weights(weights, n_samples: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((n_samples,), 1.0 / n_samples, dtype=like.dtype, device=like.device)
    w = check_finite(check_ndim(as_float_tensor(weights, "weights"), 1, "weights"), "weights")
    if w.shape[0] != n_samples:
        raise ValueError(f"weights has length {w.shape[0]} but dataset has {n_samples} samples")
    w = w.to(like)
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    total = w.sum()
    if not bool(total > 0):
        raise ValueError("weights must have a positive sum")
    return w / total


def _bandwidth_factor(bandwidth, neff: float, n_features: int) -> float:
    if isinstance(bandwidth, str):
        if bandwidth == "scott":
            return neff ** (-1.0 / (n_features + 4))
        if bandwidth == "silverman":
            return (neff * (n_features + 2) / 4.0) ** (-1.0 / (n_features + 4))
        raise ValueError(f"bandwidth must be 'scott', 'silverman' or a float, got {bandwidth!r}")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, Real):
        raise TypeError(f"bandwidth must be 'scott', 'silverman' or a float, got {bandwidth!r}")
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a finite positive factor, got {bandwidth!r}")
    return float(bandwidth)


def _kernel_cholesky(dataset, bandwidth, weights):
    """Validated ``(dataset, log weights, lower Cholesky factor of the kernel covariance)``."""
    x = _as_samples(dataset, "dataset")
    n_samples, n_features = x.shape
    check_min_samples(n_samples, 2, "dataset")
    if n_samples <= n_features:
        raise ValueError(
            f"dataset has {n_samples} samples for {n_features} features: its covariance is "
            "singular (gaussian_kde needs more samples than features; rows are samples)"
        )
    w = _normalized_weights(weights, n_samples, x)
    if int((w > 0).sum()) <= n_features:
        raise ValueError(
            f"only {int((w > 0).sum())} samples have positive weight for {n_features} "
            "features: the weighted covariance is singular"
        )
    factor = _bandwidth_factor(bandwidth, 1.0 / float(w.square().sum()), n_features)
    if bool((x.amax(0) == x.amin(0)).any()):
        raise ValueError("dataset has a constant feature: its covariance is singular")
    # np.cov(aweights=w, bias=False) with w summing to one.
    centered = x - w @ x
    data_cov = (centered.T * w) @ centered / (1.0 - w.square().sum())
    # Cholesky of the correlation matrix, to judge rank independently of feature scales.
    scale = data_cov.diagonal().sqrt()
    chol, info = torch.linalg.cholesky_ex(data_cov / torch.outer(scale, scale))
    tolerance = 10 * n_features * torch.finfo(x.dtype).eps
    if int(info) != 0 or bool(chol.diagonal().square().min() < tolerance):
        raise ValueError(
            "dataset covariance is singular: the data lie in a lower-dimensional subspace "
            "(collinear features); reduce the dimension first, e.g. with PCA"
        )
    return x, w.log(), chol * (scale[:, None] * factor)


def kde_covariance(
    dataset: torch.Tensor, bandwidth: str | float = "scott", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Covariance of the Gaussian kernel of a KDE fitted to ``dataset``.

    Parameters
    ----------
    dataset : Tensor of shape (n_samples, n_features) or (n_samples,)
        Samples as ROWS (scipy's ``gaussian_kde`` takes ``(n_features, n_samples)``);
        a 1-D tensor is one feature. Not modified.
    bandwidth : {"scott", "silverman"} or float, default="scott"
        Rule for the bandwidth factor, or the factor itself (positive).
    weights : Tensor of shape (n_samples,), optional
        Non-negative sample weights (normalised to sum to one); uniform if None.

    Returns
    -------
    Tensor of shape (n_features, n_features)
        Weighted data covariance (``ddof=1`` with reliability weights, as
        ``np.cov(aweights=w)``) times the squared bandwidth factor, in the dtype
        and on the device of ``dataset``.

    Raises
    ------
    TypeError
        If an input is not a tensor or ``bandwidth`` has the wrong type.
    ValueError
        If ``dataset`` is not 1-D or 2-D, holds NaN or infinity, has fewer than 2
        samples or no more samples than features, has a constant feature or a
        singular covariance; if ``weights`` are negative, sum to zero or have the
        wrong length; if ``bandwidth`` is an unknown rule or not positive.

    Notes
    -----
    Follows :class:`scipy.stats.gaussian_kde`: with normalised weights ``w`` the
    effective sample size is ``neff = 1 / sum(w**2)``; Scott's factor is
    ``neff ** (-1 / (d + 4))`` and Silverman's ``(neff * (d + 2) / 4) ** (-1 / (d + 4))``.

    References
    ----------
    D. W. Scott, "Multivariate Density Estimation", Wiley, 1992.
    B. W. Silverman, "Density Estimation for Statistics and Data Analysis", 1986.

    Examples
    --------
    >>> import torch
    >>> data = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    >>> kde_covariance(data, bandwidth=0.5)  # variance 5/3 times 0.5 ** 2
    tensor([[0.4167]], dtype=torch.float64)
    """
    _, _, chol = _kernel_cholesky(dataset, bandwidth, weights)
    return chol @ chol.T


def gaussian_kde_logpdf(
    points: torch.Tensor,
    dataset: torch.Tensor,
    bandwidth: str | float = "scott",
    weights: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log density of a Gaussian KDE of ``dataset``, evaluated at ``points``.

    Parameters
    ----------
    points : Tensor of shape (n_points, n_features) or (n_points,)
        Where to evaluate; a 1-D tensor is ``n_points`` values of one feature.
        Not modified.
    dataset : Tensor of shape (n_samples, n_features) or (n_samples,)
        Kernel centres as ROWS (scipy takes ``(n_features, n_samples)``); a 1-D
        tensor is one feature. Not modified.
    bandwidth : {"scott", "silverman"} or float, default="scott"
        Rule for the bandwidth factor, or the factor itself; see :func:`kde_covariance`.
    weights : Tensor of shape (n_samples,), optional
        Non-negative sample weights; uniform if None.
    chunk_size : int, optional
        Points evaluated per block; by default a block of ``chunk_size * n_samples``
        log-kernel values holds about 8 million entries.

    Returns
    -------
    Tensor of shape (n_points,)
        Natural log of the density, in the promoted dtype of the inputs and on
        their device.

    Raises
    ------
    TypeError
        If an input is not a tensor or ``bandwidth`` has the wrong type.
    ValueError
        As :func:`kde_covariance`; also if ``points`` holds NaN or infinity, is
        not 1-D or 2-D, has a feature count different from ``dataset``'s, lives on
        another device, or ``chunk_size`` is below 1 (``TypeError`` if not an int).

    Notes
    -----
    Same estimator as :meth:`scipy.stats.gaussian_kde.logpdf` (see
    :func:`kde_covariance` for the bandwidth): with the kernel covariance
    ``Sigma = L L^T``, ``log p(y) = logsumexp_i(log w_i - |L^{-1}(y - x_i)|^2 / 2)
    - log det(2 pi Sigma) / 2``. Points and data are centred and whitened by ``L``;
    each block of exponents is one matrix product and the ``logsumexp`` is taken
    per block, so points many bandwidths from every sample get finite, exact log
    densities instead of ``-inf``.

    References
    ----------
    D. W. Scott, "Multivariate Density Estimation", Wiley, 1992.

    Examples
    --------
    >>> import torch
    >>> data = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # kernel variance 2
    >>> gaussian_kde_logpdf(torch.tensor([0.0, 50.0], dtype=torch.float64), data, 1.0)
    tensor([  -1.5155, -602.2087], dtype=torch.float64)
    """
    y = _as_samples(points, "points")
    x, log_w, chol = _kernel_cholesky(dataset, bandwidth, weights)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"points have {y.shape[1]} features, dataset has {x.shape[1]}")
    if y.device != x.device:
        raise ValueError(f"points are on {y.device} but dataset is on {x.device}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y, log_w, chol = x.to(dtype), y.to(dtype), log_w.to(dtype), chol.to(dtype)
    n_samples, n_features = x.shape
    shift = x.mean(0)
    # Rows times L^{-T}: whitened coordinates, where the kernel is the standard normal.
    x = torch.linalg.solve_triangular(chol.T, x - shift, upper=True, left=False)
    y = torch.linalg.solve_triangular(chol.T, y - shift, upper=True, left=False)
    # exponent_ij = log w_j - |y_i - x_j|^2 / 2 = y_i.x_j + (log w_j - |x_j|^2 / 2) - |y_i|^2 / 2:
    # the middle term rides in the matrix product as an extra column against a column of ones.
    x = torch.cat([x, (log_w - 0.5 * x.square().sum(1))[:, None]], 1)
    y_half_sq = 0.5 * y.square().sum(1)
    y = torch.cat([y, y.new_ones(y.shape[0], 1)], 1)
    log_norm = chol.diagonal().log().sum() + 0.5 * n_features * math.log(2 * math.pi)
    if chunk_size is None:
        chunk = max(1, _CHUNK_ELEMENTS // n_samples)
    else:
        chunk = check_positive_int(chunk_size, "chunk_size")
    out = torch.empty(y.shape[0], dtype=dtype, device=y.device)
    block = torch.empty(min(chunk, y.shape[0]), n_samples, dtype=dtype, device=y.device)
    for start in range(0, y.shape[0], chunk):
        rows = y[start : start + chunk]
        exponents = torch.mm(rows, x.T, out=block[: rows.shape[0]])
        peak = exponents.amax(1)  # finite: at least one weight is positive
        exponents.sub_(peak[:, None]).exp_()
        out[start : start + rows.shape[0]] = exponents.sum(1).log_().add_(peak)
    return out.sub_(y_half_sq).sub_(log_norm)
