"""Gaussian kernel density estimation with :func:`scipy.stats.gaussian_kde` semantics.

:class:`GaussianKDE` is the fitted kernel, a :class:`torch.nn.Module`: built once from a
dataset (validation, the bandwidth, the Cholesky factor of the kernel covariance, its
inverse as a whitening factor and the whitened centres, all buffers), it evaluates log
densities of any number of point batches, optionally leave-one-out (:meth:`~GaussianKDE.logpdf`,
validated and chunked), or unchecked and exportable (its ``forward``).
:func:`gaussian_kde_logpdf` and :func:`kde_covariance` are one-shot functions over it.
The log density is computed in whitened coordinates by matrix products and
``logsumexp``, so it stays exact far in the tails where the density itself underflows.
Unlike scipy, datasets are ``(n_samples, n_features)``: rows are samples.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from ._alignment import aligned_width, pad_aligned, realign
from ._validation import (
    all_finite,
    as_float_tensor,
    check_finite,
    check_min_samples,
    check_ndim,
    check_positive_int,
    frexp_exponent,
    ldexp,
    working_dtype,
)

__all__ = ["GaussianKDE", "gaussian_kde_logpdf", "kde_covariance"]

_CHUNK_ELEMENTS = 1 << 23  # entries of one (chunk, n_samples) block: 64 MB in float64


def _as_float_samples(x, name: str) -> torch.Tensor:
    """A float tensor of samples, 1-D (one feature) or 2-D (rows are samples)."""
    return check_ndim(as_float_tensor(x, name), (1, 2), name)


def _as_samples(x, name: str) -> torch.Tensor:
    """Validated 2-D float tensor (half precision upcast); a 1-D tensor is one feature."""
    x = check_finite(_as_float_samples(x, name), name)
    x = x.to(working_dtype(x.dtype))
    return x[:, None] if x.ndim == 1 else x


def _extended_factor(precision_factor: torch.Tensor) -> torch.Tensor:
    """``[[U, 0], [0, 1]]`` followed by zero rows and columns to an aligned (w, w).

    The right operand of :func:`_whitened`, ``w = aligned_width(d + 1)``: the left one,
    ``[y, 1, 0, ...]``, then gives ``[y U, 1, 0, ...]`` with no concatenation, every row
    of the aligned width that the product with the centres needs too (see
    :mod:`~skanomaly.functional._alignment`).
    """
    d = precision_factor.shape[0]
    extended = F.pad(precision_factor, (0, 1, 0, 1))
    extended[d, d] = 1.0
    return pad_aligned(pad_aligned(extended, dim=-1), dim=-2)


def _whitened(y: torch.Tensor, factor: torch.Tensor, d: int):
    """Whitened rows with a column of ones appended (then zeros), and half their squared norms.

    ``y`` (n, d) is centred and scaled (``d`` its width, a Python int: traced code
    reads no shape); ``factor`` is :func:`_extended_factor` of the inverse transposed
    Cholesky factor ``U`` of the kernel covariance (same units), and
    ``[y, 1, 0, ...] @ factor = [y U, 1, 0, ...]``, of ``factor``'s aligned width: the
    ones column and the zeros are exact (products by exact zeros and one).
    """
    white = pad_aligned(F.pad(y, (0, 1), value=1.0), size=d + 1) @ factor
    return white, 0.5 * white[:, :d].square().sum(1)


def _log_kernel_sum(exponents: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of each row of a block of kernel exponents (overwritten)."""
    peak = exponents.amax(1)  # finite: some sample has positive weight
    return exponents.sub_(peak[:, None]).exp_().sum(1).log_().add_(peak)


def _pow2_or_inf(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0 ** exponent`` in ``dtype``: exact within its normal range, else 0 or inf."""
    return torch.pow(2.0, exponent.to(torch.float64)).to(dtype)


def _normalized_weights(weights, n_samples: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((n_samples,), 1.0 / n_samples, dtype=like.dtype, device=like.device)
    w = check_finite(check_ndim(as_float_tensor(weights, "weights"), 1, "weights"), "weights")
    if w.shape[0] != n_samples:
        raise ValueError(f"weights has length {w.shape[0]} but dataset has {n_samples} samples")
    w = w.to(like)
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    # Scaled by a power of two first, so that a sum of huge weights does not overflow.
    w = ldexp(w, -int(frexp_exponent(w.amax())))
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


class GaussianKDE(nn.Module):
    """A Gaussian kernel density estimate of a fixed dataset, fitted once.

    The estimator of :class:`scipy.stats.gaussian_kde`: one Gaussian kernel per
    sample, all with the covariance of the (weighted) data times the squared
    bandwidth factor. Building it validates the dataset, computes the bandwidth,
    the Cholesky factor of the kernel covariance and its inverse, and whitens the
    centres, so that each :meth:`logpdf` call pays only its matrix products. It is
    a :class:`torch.nn.Module` whose state is buffers; calling it
    (:meth:`forward`) evaluates log densities without validation or chunking, in
    a form that :func:`torch.jit.trace` and the ONNX exporter (opset 17) take.

    Parameters
    ----------
    dataset : Tensor of shape (n_samples, n_features) or (n_samples,)
        Kernel centres as ROWS (scipy takes ``(n_features, n_samples)``); a 1-D
        tensor is one feature. float32 or float64 on any device; integers and
        booleans are promoted to the default dtype, float16 and bfloat16 are
        computed (and returned) in float32. Any finite values: the kernel rescales
        internally (see Notes). Not modified; the object keeps its own copies.
    bandwidth : {"scott", "silverman"} or float, default="scott"
        Rule for the bandwidth factor, or the factor itself (positive).
    weights : Tensor of shape (n_samples,), optional
        Non-negative sample weights (normalised to sum to one); uniform if None.

    Attributes
    ----------
    n_samples : int
        Number of kernel centres.
    n_features : int
        Dimension of the centres.
    factor : float
        The bandwidth factor (scipy's ``gaussian_kde.factor``).
    neff : float
        Effective number of samples, ``1 / sum(w**2)``.
    dtype : torch.dtype
        Working dtype (float32 or float64); points are evaluated in it.
    device : torch.device
        Device of the centres; points must be there too.
    centres : Tensor of shape (n_samples, n_features + 1)
        The whitened centres, with a last column ``log w_j - |x_j|^2 / 2``: a view of
        ``centres_padded``.
    centres_padded : Tensor of shape (n_rows, w)
        Buffer: ``centres`` followed by zero columns to ``w``, the multiple of 64
        bytes of entries (8 in float64, 16 in float32) at or above
        ``n_features + 1``, and by kernels of weight zero (zeros, ``-inf`` in the last
        column) to ``n_rows``, the multiple of 16 at or above ``n_samples``: every
        row of the products with the points (padded to match), in and out, starts at
        the same alignment, so that a point's log density does not depend on its row
        in the product (BLAS kernels take other paths for other alignments).
    precision_factor : Tensor of shape (n_features, n_features)
        ``U = L^-T`` (upper triangular, ``U U^T = Sigma_s^-1``), the whitening of
        centred, scaled points (``Sigma_s = L L^T`` the kernel covariance in the
        scaled units of the Notes): a view of ``precision_factor_padded``.
    precision_factor_padded : Tensor of shape (w, w)
        Buffer: ``[[U, 0], [0, 1]]`` followed by zero rows and columns to ``w``: the
        points ``[y, 1, 0, ...]`` times it are the whitened points with the column of
        ones that meets the centres' last column.
    mean, scale : Tensor of shape (n_features,)
        Buffers: the centring point and the per-feature powers of two that take
        points to those scaled units, ``(y - mean) * scale``.
    log_norm : Tensor of shape ()
        Buffer: ``log det(2 pi Sigma) / 2``, in the units of the dataset.

    Raises
    ------
    TypeError
        If an input is not a tensor or ``bandwidth`` has the wrong type.
    ValueError
        If ``dataset`` is not 1-D or 2-D, holds NaN or infinity, has fewer than
        2 samples or no more samples than features, has a constant feature or a
        singular covariance (its points lie in a lower-dimensional affine
        subspace); if ``weights`` are negative, sum to zero, have the wrong
        length, or leave no more samples with positive weight than
        features; if ``bandwidth`` is an unknown rule or not positive.

    See Also
    --------
    gaussian_kde_logpdf : one evaluation without keeping the kernel.
    kde_covariance : the kernel covariance.

    Notes
    -----
    Follows :class:`scipy.stats.gaussian_kde`: with normalised weights ``w`` the
    effective sample size is ``neff = 1 / sum(w**2)``; Scott's factor is
    ``neff ** (-1 / (d + 4))`` and Silverman's ``(neff * (d + 2) / 4) ** (-1 / (d + 4))``;
    the data covariance is ``np.cov(aweights=w)`` (``ddof=1`` with reliability
    weights). With the kernel covariance ``Sigma = L L^T``,
    ``log p(y) = logsumexp_i(log w_i - |L^{-1}(y - x_i)|^2 / 2) - log det(2 pi Sigma) / 2``.

    **Scale.** Each feature is multiplied by a power of two that brings its largest
    absolute value to [0.5, 1), centred on the weighted mean, and multiplied by
    another power of two that brings its largest centred value to [0.5, 1); points
    get the same exact transformation, and ``log det`` the sum of the exponents. The
    estimator is equivariant under such diagonal scalings, so the result is the
    same at any scale: data of ``1e-300`` or ``1e300`` work as data of 1 do (scipy's
    covariance under- or overflows there). A log density that is itself beyond the
    float range (a point so many kernel widths from every centre that its squared
    whitened distance overflows) raises a ``ValueError`` instead of returning
    ``-inf``.

    **Module.** :meth:`forward` is :meth:`logpdf` without validation,
    leave-one-out, chunking or the range check: ``(y - mean) * scale @ U``, one
    matrix product against ``centres`` and a ``logsumexp`` per point (memory
    ``n_points x n_samples``). Its scaling multiplies by the stored powers of two
    where :meth:`logpdf` scales in exact steps; both agree bit for bit while
    ``scale`` is a normal number of the dtype (data not within a factor of about
    ``2**(+-125)`` of float32's range limits, ``2**(+-1000)`` of float64's).
    ``module.to(dtype)`` casts the buffers: a float64 fit evaluated in float32.

    **Leave-one-out.** ``logpdf(dataset, leave_one_out=True)`` gives each centre's
    log density under the other centres: the kernel of point ``i`` is dropped from
    its ``logsumexp`` and the remaining weights are renormalised (``w_j / (1 -
    w_i)``), while the bandwidth and the kernel covariance stay those of the full
    dataset (refitting them without each point would cost a factorisation per
    point). It costs one evaluation of the centres, ``O(n_samples**2 n_features)``.

    References
    ----------
    D. W. Scott, "Multivariate Density Estimation", Wiley, 1992.
    B. W. Silverman, "Density Estimation for Statistics and Data Analysis", 1986.

    Examples
    --------
    >>> import torch
    >>> kde = GaussianKDE(torch.tensor([-1.0, 1.0], dtype=torch.float64), bandwidth=1.0)
    >>> kde.logpdf(torch.tensor([0.0, 50.0], dtype=torch.float64))
    tensor([  -1.5155, -602.2087], dtype=torch.float64)
    >>> kde.covariance()  # the data variance 2 times 1.0 ** 2
    tensor([[2.]], dtype=torch.float64)

    Leave-one-out, each centre under the other one's kernel alone:

    >>> kde.logpdf(torch.tensor([-1.0, 1.0], dtype=torch.float64), leave_one_out=True)
    tensor([-2.2655, -2.2655], dtype=torch.float64)

    The module form takes (n_points, n_features) rows, unchecked:

    >>> kde(torch.tensor([[0.0], [50.0]], dtype=torch.float64))
    tensor([  -1.5155, -602.2087], dtype=torch.float64)
    """

    def __init__(self, dataset, bandwidth="scott", weights=None):
        super().__init__()
        x = _as_samples(dataset, "dataset")
        n_samples, n_features = x.shape
        check_min_samples(n_samples, 2, "dataset")
        if n_features == 0:
            raise ValueError(f"dataset has no features (shape {tuple(x.shape)})")
        if n_samples <= n_features:
            raise ValueError(
                f"dataset has {n_samples} samples for {n_features} features: its covariance "
                "is singular (a Gaussian KDE needs more samples than features; rows are "
                "samples)"
            )
        w = _normalized_weights(weights, n_samples, x)
        positive = int((w > 0).sum())
        if positive <= n_features:
            raise ValueError(
                f"only {positive} samples have positive weight for {n_features} features: "
                "the weighted covariance is singular (a Gaussian KDE needs more weighted "
                "samples than features)"
            )
        sum_sq = float(w.square().sum())
        self.neff = 1.0 / sum_sq
        self.factor = _bandwidth_factor(bandwidth, self.neff, n_features)
        # Exact per-feature powers of two: |u| < 1, then |v| in [0.5, 1) per feature.
        constant = x.amax(0) == x.amin(0)
        if bool(constant.any()):
            j = int(constant.nonzero()[0])
            raise ValueError(
                f"dataset has a constant feature (column {j}): its covariance is singular"
            )
        e0 = frexp_exponent(x.abs().amax(0))
        u = ldexp(x, -e0)
        # centred on the weighted mean rounded to a multiple of 2**-24 (|u| < 1): exactly
        # representable in float32, so that the module cast to float32 centres float32
        # points exactly where this fit centred its own; the offset, at most 2**-25, is
        # below 1/32 of the spread of any feature that float32 resolves (2**-20 of its
        # largest value), and features narrower than that are rounded to 2**-26 of their
        # spread instead
        mean = w @ u
        spread_exponent = frexp_exponent((u - mean).abs().amax(0))
        quantum = torch.where(spread_exponent > -20, torch.full_like(spread_exponent, -24),
                              spread_exponent - 26)
        shift = ldexp(torch.round(ldexp(mean, -quantum)), quantum)
        v = u - shift
        spread = v.abs().amax(0)
        e1 = frexp_exponent(spread)
        v = ldexp(v, -e1)
        centred = v - w @ v
        # np.cov(aweights=w, bias=False) with w summing to one.
        data_cov = (centred.T * w) @ centred / (1.0 - sum_sq)
        # Cholesky of the correlation matrix, to judge rank independently of feature scales.
        scale = data_cov.diagonal().sqrt()
        chol, info = torch.linalg.cholesky_ex(data_cov / torch.outer(scale, scale))
        tolerance = 10 * n_features * torch.finfo(x.dtype).eps
        if int(info) != 0 or bool(chol.diagonal().square().min() < tolerance):
            raise ValueError(
                "dataset covariance is singular: the points lie in a lower-dimensional "
                "affine subspace (collinear features); reduce the dimension first, e.g. "
                "with PCA"
            )
        chol = chol * (scale[:, None] * self.factor)
        eye = torch.eye(n_features, dtype=x.dtype, device=x.device)
        precision_factor = _extended_factor(
            torch.linalg.solve_triangular(chol, eye, upper=False).T.contiguous())
        white, half_sq = _whitened(v, precision_factor, n_features)
        # exponent_ij = log w_j - |y_i - x_j|^2 / 2
        #             = y_i.x_j + (log w_j - |x_j|^2 / 2) - |y_i|^2 / 2:
        # the middle term rides in the matrix product as an extra column against ones.
        white[:, n_features] = w.log() - half_sq
        # kernels of weight zero up to a multiple of 16 rows (aligned rows of the
        # products' output in float32 too, the dtype the module may be cast to):
        # exponent -inf, nothing added to any sum
        white = pad_aligned(white, dim=0, width=aligned_width(n_samples, torch.float32))
        white[n_samples:, n_features] = -math.inf
        log_norm = (
            float(chol.diagonal().log().sum())
            + math.log(2.0) * float((e0 + e1).sum())
            + 0.5 * n_features * math.log(2 * math.pi)
        )
        self.register_buffer("centres_padded", white)
        self.register_buffer("precision_factor_padded", precision_factor)
        # (y - mean) * scale = ldexp(ldexp(y, -e0) - shift, -e1), exactly in the normal range
        self.register_buffer("mean", ldexp(shift, e0))
        self.register_buffer("scale", _pow2_or_inf(-(e0 + e1), x.dtype))
        self.register_buffer("log_norm", torch.tensor(log_norm, dtype=x.dtype, device=x.device))
        self.register_buffer("_chol", chol, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)
        self.register_buffer("_e0", e0, persistent=False)
        self.register_buffer("_e1", e1, persistent=False)
        # log of the weight left when a sample is dropped (leave-one-out)
        self.register_buffer("_log_rest", torch.log1p(-w), persistent=False)
        self.n_samples, self.n_features = n_samples, n_features

    @property
    def centres(self) -> torch.Tensor:
        """The whitened centres (n_samples, n_features + 1): ``centres_padded`` but its
        zero columns."""
        return self.centres_padded[: self.n_samples, : self.n_features + 1]

    @property
    def precision_factor(self) -> torch.Tensor:
        """``U = L^-T`` (n_features, n_features): the top left of
        ``precision_factor_padded``."""
        return self.precision_factor_padded[: self.n_features, : self.n_features]

    def _apply(self, fn, recurse=True):
        # a cast re-pads the columns to the aligned width of the new dtype (see
        # _alignment); the rows, padded to a multiple of 16, are aligned in either
        super()._apply(fn, recurse)
        width = self.n_features + 1
        self.precision_factor_padded = realign(self.precision_factor_padded, (width, width))
        self.centres_padded = realign(self.centres_padded, (None, width))
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Working dtype: points are evaluated in it."""
        return self.centres_padded.dtype

    @property
    def device(self) -> torch.device:
        """Device of the centres."""
        return self.centres_padded.device

    def __repr__(self) -> str:
        return (f"GaussianKDE(n_samples={self.n_samples}, n_features={self.n_features}, "
                f"factor={self.factor:.4g}, dtype={self.dtype}, device={self.device})")

    def covariance(self) -> torch.Tensor:
        """Covariance of the Gaussian kernel, in the units of the dataset.

        Returns
        -------
        Tensor of shape (n_features, n_features)
            The weighted data covariance times ``factor ** 2``, in :attr:`dtype`
            on :attr:`device`.

        Raises
        ------
        ValueError
            If a variance is beyond the float range (data of magnitude above about
            ``1e154`` or below ``1e-154`` in float64): the log densities still work.
        """
        exponent = self._e0 + self._e1
        cov = ldexp(self._chol @ self._chol.T, exponent[:, None] + exponent[None, :])
        diagonal = cov.diagonal()
        if not (all_finite(cov) and bool((diagonal >= torch.finfo(cov.dtype).tiny).all())):
            raise ValueError(
                "the kernel covariance of this dataset is beyond the float range of "
                f"{cov.dtype} (its features' variances over- or underflow); its log "
                "densities are still exact: GaussianKDE rescales internally"
            )
        return cov

    def _check_points(self, points, leave_one_out: bool) -> torch.Tensor:
        """``points`` validated against the dataset: 2-D, finite, same width and device."""
        y = _as_samples(points, "points")
        if y.shape[1] != self.n_features:
            raise ValueError(f"points have {y.shape[1]} features, dataset has {self.n_features}")
        if y.device != self.device:
            raise ValueError(f"points are on {y.device} but dataset is on {self.device}")
        if leave_one_out and y.shape[0] != self.n_samples:
            raise ValueError(
                f"leave_one_out needs one point per dataset sample ({self.n_samples}), got "
                f"{y.shape[0]}: point i is evaluated without the kernel of sample i"
            )
        return y

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Log density at ``points``, unchecked and traceable (see Notes, **Module**).

        Parameters
        ----------
        points : Tensor of shape (n_points, n_features)
            Cast to :attr:`dtype`; finite and on :attr:`device` (not checked).

        Returns
        -------
        Tensor of shape (n_points,)
            Natural log of the density, in :attr:`dtype`; no range check (a point
            too many kernel widths from every centre gives ``-inf``).

        Examples
        --------
        >>> import torch
        >>> data = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.5], [3.0, 1.0]],
        ...                     dtype=torch.float64)
        >>> kde = GaussianKDE(data)
        >>> points = torch.tensor([[1.0, 1.0], [9.0, 9.0]], dtype=torch.float64)
        >>> torch.allclose(kde(points), kde.logpdf(points))
        True
        >>> kde.to(torch.float32)(points.float()).dtype  # a float64 fit, evaluated in float32
        torch.float32
        """
        y = (points.to(self.dtype) - self.mean) * self.scale
        y, y_half_sq = _whitened(y, self.precision_factor_padded, self.n_features)
        return _log_kernel_sum(y @ self.centres_padded.T) - y_half_sq - self.log_norm

    def logpdf(self, points, *, leave_one_out: bool = False, chunk_size: int | None = None):
        """Log density of the KDE at ``points``.

        Parameters
        ----------
        points : Tensor of shape (n_points, n_features) or (n_points,)
            Where to evaluate, on :attr:`device`; a 1-D tensor is ``n_points``
            values of one feature. Converted to :attr:`dtype`. Not modified.
        leave_one_out : bool, default=False
            If True, ``points`` must have ``n_samples`` rows and row ``i`` is
            evaluated without the kernel of sample ``i``, the other weights
            renormalised; with ``points`` the dataset itself this is the
            leave-one-out log density of each sample (bandwidth and kernel
            covariance stay those of the full dataset; see Notes of the class).
        chunk_size : int, optional
            Points evaluated per block; by default a block of ``chunk_size *
            n_samples`` log-kernel values holds about 8 million entries.

        Returns
        -------
        Tensor of shape (n_points,)
            Natural log of the density, in :attr:`dtype` on :attr:`device`.

        Raises
        ------
        TypeError
            If ``points`` is not a tensor or ``chunk_size`` not an int.
        ValueError
            If ``points`` is not 1-D or 2-D, holds NaN or infinity, has a feature
            count different from the dataset's or another device; with
            ``leave_one_out``, if it does not have ``n_samples`` rows; if
            ``chunk_size`` is below 1; if a log density is beyond the float range
            (a point too many kernel widths from every centre).
        """
        y = self._check_points(points, leave_one_out)
        if chunk_size is None:
            chunk = max(1, _CHUNK_ELEMENTS // self.n_samples)
        else:
            chunk = check_positive_int(chunk_size, "chunk_size")
        y = ldexp(ldexp(y.to(self.dtype), -self._e0) - self._shift, -self._e1)
        y, y_half_sq = _whitened(y, self.precision_factor_padded, self.n_features)
        centres = self.centres_padded
        n_points = y.shape[0]
        out = torch.empty(n_points, dtype=self.dtype, device=self.device)
        block = torch.empty(min(chunk, n_points), centres.shape[0], dtype=self.dtype,
                            device=self.device)
        for start in range(0, n_points, chunk):
            rows = y[start : start + chunk]
            exponents = torch.mm(rows, centres.T, out=block[: rows.shape[0]])
            if leave_one_out:  # row r is point start + r: drop the kernel of that sample
                exponents.diagonal(offset=start).fill_(-math.inf)
            out[start : start + rows.shape[0]] = _log_kernel_sum(exponents)
        out.sub_(y_half_sq).sub_(self.log_norm)
        if leave_one_out:
            out.sub_(self._log_rest)
        if not all_finite(out):
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(
                f"the log density of {bad} point(s) is beyond the float range of "
                f"{self.dtype}: they lie too many kernel widths from every sample of the "
                "dataset (their squared whitened distance overflows)"
            )
        return out


def kde_covariance(
    dataset: torch.Tensor, bandwidth: str | float = "scott", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Covariance of the Gaussian kernel of a KDE fitted to ``dataset``.

    Parameters
    ----------
    dataset : Tensor of shape (n_samples, n_features) or (n_samples,)
        Samples as ROWS (scipy's ``gaussian_kde`` takes ``(n_features, n_samples)``);
        a 1-D tensor is one feature; float16 and bfloat16 are computed in float32.
        Not modified.
    bandwidth : {"scott", "silverman"} or float, default="scott"
        Rule for the bandwidth factor, or the factor itself (positive).
    weights : Tensor of shape (n_samples,), optional
        Non-negative sample weights (normalised to sum to one); uniform if None.

    Returns
    -------
    Tensor of shape (n_features, n_features)
        Weighted data covariance (``ddof=1`` with reliability weights, as
        ``np.cov(aweights=w)``) times the squared bandwidth factor, on the device
        of ``dataset``, in its dtype (float32 for half precision).

    Raises
    ------
    TypeError
        If an input is not a tensor or ``bandwidth`` has the wrong type.
    ValueError
        As :class:`GaussianKDE`; also if a variance is beyond the float range.

    Notes
    -----
    See :class:`GaussianKDE` for the bandwidth rules, after scipy.

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
    return GaussianKDE(dataset, bandwidth, weights).covariance()


def gaussian_kde_logpdf(
    points: torch.Tensor,
    dataset: torch.Tensor,
    bandwidth: str | float = "scott",
    weights: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    leave_one_out: bool = False,
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
        Rule for the bandwidth factor, or the factor itself; see :class:`GaussianKDE`.
    weights : Tensor of shape (n_samples,), optional
        Non-negative sample weights; uniform if None.
    chunk_size : int, optional
        Points evaluated per block; by default a block of ``chunk_size * n_samples``
        log-kernel values holds about 8 million entries.
    leave_one_out : bool, default=False
        If True, ``points`` must have ``n_samples`` rows and point ``i`` is
        evaluated without the kernel of sample ``i`` (the other weights
        renormalised to sum to one). With ``points`` the dataset itself, this is
        the leave-one-out log density of each sample, with the bandwidth and the
        kernel covariance held at their full-data values (not refitted without
        the sample).

    Returns
    -------
    Tensor of shape (n_points,)
        Natural log of the density, in the promoted dtype of the inputs (float32
        at least: float16 and bfloat16 are computed in float32) and on their device.

    Raises
    ------
    TypeError
        If an input is not a tensor or ``bandwidth`` has the wrong type.
    ValueError
        As :class:`GaussianKDE` and :meth:`GaussianKDE.logpdf`: bad shapes, NaN or
        infinity, too few samples or a singular covariance, bad weights or
        bandwidth, points on another device, a log density beyond the float range.

    Notes
    -----
    Same estimator as :meth:`scipy.stats.gaussian_kde.logpdf`; see
    :class:`GaussianKDE`, which this function builds and evaluates once (keep a
    :class:`GaussianKDE` to evaluate one dataset repeatedly). Points and data are
    rescaled, centred and whitened by the Cholesky factor of the kernel
    covariance; each block of exponents is one matrix product and the
    ``logsumexp`` is taken per block, so points many bandwidths from every sample
    get finite, exact log densities instead of ``-inf``.

    References
    ----------
    D. W. Scott, "Multivariate Density Estimation", Wiley, 1992.

    Examples
    --------
    >>> import torch
    >>> data = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # kernel variance 2
    >>> gaussian_kde_logpdf(torch.tensor([0.0, 50.0], dtype=torch.float64), data, 1.0)
    tensor([  -1.5155, -602.2087], dtype=torch.float64)
    >>> data = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    >>> gaussian_kde_logpdf(data, data, leave_one_out=True)  # each point without its kernel
    tensor([-2.0810, -1.8346, -2.9725], dtype=torch.float64)
    """
    y, x = _as_float_samples(points, "points"), _as_float_samples(dataset, "dataset")
    dtype = working_dtype(torch.promote_types(x.dtype, y.dtype))
    return GaussianKDE(x.to(dtype), bandwidth, weights).logpdf(
        y, leave_one_out=leave_one_out, chunk_size=chunk_size)
