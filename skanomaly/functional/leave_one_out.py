"""Leave-one-out Mahalanobis distances of training samples by a rank-one downdate.

Removing one sample from a Gaussian fit changes its mean by a multiple of the sample's
residual and its scatter by a rank-one term, so the distance of the sample to the model
fitted without it follows from ONE factorisation shared by all samples
(Sherman-Morrison), instead of one refit per sample.
"""

from __future__ import annotations

import math

import torch

from ._validation import as_float_tensor, check_finite
from .mahalanobis import cholesky_ex, tril_inverse

__all__ = ["leave_one_out_mahalanobis"]


def leave_one_out_mahalanobis(x, mean, scatter, n_samples, *, ddof=0, shrinkage=0.0,
                              target=0.0, reg=0.0, squared=True, validate_args=True):
    """Distance of each training sample to the Gaussian fitted without that sample.

    The Gaussian fitted on ``n`` samples has mean ``mu`` and covariance
    ``Sigma = (1 - s) W / (n - ddof) + (s t + reg) I`` with ``W`` the scatter
    ``sum_j (x_j - mu)(x_j - mu)^T``, shrinkage ``s`` towards ``t I`` and ridge ``reg``
    (``GaussianDetector``: ``ddof=0``; PaDiM: ``ddof=1``, ``s=0``). For a training
    sample ``x_i`` with residual ``r = x_i - mu``, the model without it has mean
    ``mu - r / (n - 1)`` and scatter ``W - c r r^T`` with ``c = n / (n - 1)``; with
    ``s``, ``t`` and ``reg`` held at their full-data values its covariance is
    ``Sigma_i = a' (A - c r r^T)``, ``a' = (1 - s) / (n - 1 - ddof)``,
    ``A = W + ((s t + reg) / a') I``, and by the Sherman-Morrison formula

    ``d_i^2 = (x_i - mu_{-i})^T Sigma_i^{-1} (x_i - mu_{-i}) = (c^2 / a') q / (1 - c q)``,
    ``q = r^T A^{-1} r``.

    Parameters
    ----------
    x : Tensor of shape (m, B..., d)
        Training samples (any ``m`` of the ``n`` that the moments were computed from),
        float32 or float64; computed in float64 (float32 on MPS).
    mean : Tensor of shape (B..., d)
        Mean ``mu`` of the ``n`` training samples (one per independent problem ``B``,
        e.g. per PaDiM position).
    scatter : Tensor of shape (B..., d, d)
        Scatter ``W`` of the ``n`` training samples about ``mean``.
    n_samples : int
        Number ``n`` of training samples behind ``mean`` and ``scatter``; at least
        ``ddof + 2`` (the model without a sample divides by ``n - 1 - ddof``).
    ddof : int, default=0
        Divisor ``n - ddof`` of the covariance.
    shrinkage : float in [0, 1], default=0.0
        Shrinkage intensity ``s``.
    target : float or Tensor of shape (B...), default=0.0
        Scale ``t`` of the shrinkage target ``t I`` (e.g. ``trace(W) / (n d)``).
    reg : float >= 0, default=0.0
        Ridge added to the diagonal.
    squared : bool, default=True
        Return squared distances.
    validate_args : bool, default=True
        Check the tensors' types, shapes and finiteness first. ``False`` is for hot
        loops whose caller computed the moments from ``x`` itself (a fit): the
        distances are the same, without the passes over the data.

    Returns
    -------
    Tensor of shape (m, B...)
        Leave-one-out (squared) distances in float64 (float32 on MPS).

    Raises
    ------
    TypeError
        If an input is not a tensor.
    ValueError
        If the shapes do not match, an input holds NaN or infinity, ``n_samples`` is
        below ``ddof + 2``, ``shrinkage`` is outside [0, 1] or ``reg`` negative, if
        ``A`` is singular (no ridge or shrinkage and ``W`` is rank-deficient), if the
        model without some sample is singular (``1 - c q <= 0``: the sample alone spans a
        direction of the data and no ridge or shrinkage fills it), or if a distance
        overflows float64.

    Notes
    -----
    Cost: one Cholesky factorisation of ``A`` per problem (``d^3 / 3``) and one
    triangular solve per sample (``d^2``): the cost of scoring the training set once.
    With ``s = 0`` and ``reg = 0`` the result is the exact leave-one-out distance; with
    shrinkage or a ridge it is the distance to the model refitted without the sample
    while ``s``, ``t`` and ``reg`` keep their full-data values (a data-driven shrinkage
    such as Ledoit-Wolf's would move by ``O(1 / n)``). Equivalent closed form for
    ``s = reg = 0``, ``ddof = 0``: ``d_i^2 = n D_i^2 / (n - 1 - D_i^2)`` with ``D_i`` the
    in-sample distance.

    References
    ----------
    J. Sherman and W. J. Morrison, "Adjustment of an inverse matrix corresponding to a
    change in one element of a given matrix", Ann. Math. Statist. 21(1), 1950.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skanomaly.functional import leave_one_out_mahalanobis
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 3))
    >>> mu = X.mean(0)
    >>> W = (X - mu).T @ (X - mu)
    >>> loo = leave_one_out_mahalanobis(torch.from_numpy(X), torch.from_numpy(mu),
    ...                                 torch.from_numpy(W), 20)
    >>> Xo = X[1:]                      # refit without sample 0, by hand
    >>> r = X[0] - Xo.mean(0)
    >>> ref = r @ np.linalg.solve(np.cov(Xo, rowvar=False, bias=True), r)
    >>> bool(np.isclose(float(loo[0]), ref))
    True
    """
    if validate_args:
        x, mean = as_float_tensor(x, "x"), as_float_tensor(mean, "mean")
        scatter = as_float_tensor(scatter, "scatter")
        if mean.ndim < 1 or mean.shape[-1] == 0:
            raise ValueError("mean must be a non-empty (..., d) tensor, got "
                             f"{tuple(mean.shape)}")
        if tuple(scatter.shape) != (*mean.shape, mean.shape[-1]):
            raise ValueError(f"scatter must have shape {(*mean.shape, mean.shape[-1])} to "
                             f"match mean, got {tuple(scatter.shape)}")
        if x.ndim != mean.ndim + 1 or tuple(x.shape[1:]) != tuple(mean.shape):
            raise ValueError(f"x must have shape (m, {', '.join(map(str, mean.shape))}), "
                             f"got {tuple(x.shape)}")
        for t, name in ((x, "x"), (mean, "mean"), (scatter, "scatter")):
            check_finite(t, name)
    d = mean.shape[-1]
    n = int(n_samples)
    if n < ddof + 2:
        raise ValueError(f"leave-one-out needs n_samples >= ddof + 2 = {ddof + 2}, got {n}")
    s, reg = float(shrinkage), float(reg)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if not (math.isfinite(reg) and reg >= 0):
        raise ValueError(f"reg must be a finite number >= 0, got {reg}")
    work = torch.float32 if x.device.type == "mps" else torch.float64
    x, mean, scatter = x.to(work), mean.to(work), scatter.to(work)
    c = n / (n - 1)
    ridge = torch.as_tensor(target, dtype=work, device=x.device) * s + reg  # (B...) or ()
    batch = mean.shape[:-1]
    p = math.prod(batch)
    # residuals problem-major, (P, m, d) contiguous: each problem's samples are rows of
    # one matrix for the products below
    r = torch.empty(p, x.shape[0], d, dtype=work, device=x.device)
    torch.sub(x.reshape(x.shape[0], p, d).transpose(0, 1), mean.reshape(p, 1, d), out=r)
    if s == 1.0:  # Sigma_i = (t + reg) I: no scatter left to downdate
        if not bool((ridge > 0).all()):
            raise ValueError("shrinkage=1 towards a zero target without reg: the "
                             "leave-one-out covariance is zero")
        q = r.square().sum(-1).mT.reshape(x.shape[:-1])  # (m, B...)
        return _finish(c * c * q / ridge, squared)
    a_loo = (1.0 - s) / (n - 1 - ddof)
    a = scatter.reshape(p, d, d).clone()
    a.diagonal(dim1=-2, dim2=-1).add_((ridge / a_loo).reshape(p, 1) if ridge.ndim else
                                      float(ridge) / a_loo)
    d2 = _downdated(r, a, c, a_loo, validate_args, None)  # (P, m)
    return _finish(d2.mT.reshape(x.shape[:-1]), squared)


def leave_one_out_from_residuals(r, scatter, n_samples, *, ddof=1, reg=0.0, squared=True,
                                 buffers=None):
    """:func:`leave_one_out_mahalanobis` of a fit that holds its centred samples.

    The same distances (no shrinkage) from the residuals ``r_i = x_i - mu``, laid out
    problem-major as a fit computes them, without validation and, given ``buffers``,
    without allocating: for a fit's loop over blocks of problems (PaDiM's positions),
    whose inputs it computed itself.

    Parameters
    ----------
    r : Tensor of shape (P, m, d)
        Residuals of ``m`` of the ``n`` training samples of each of ``P`` problems,
        float64 (float32 on MPS), finite. Not modified.
    scatter : Tensor of shape (P, d, d)
        Scatter ``W`` of the ``n`` samples of each problem, symmetric, same dtype.
    n_samples : int
        Number ``n`` of training samples behind ``scatter``; at least ``ddof + 2``.
    ddof : int, default=1
        Divisor ``n - ddof`` of the covariance.
    reg : float >= 0, default=0.0
        Ridge added to the diagonal of the covariance.
    squared : bool, default=True
        Return squared distances.
    buffers : tuple of 4 or 5 Tensors, optional
        Scratch space ``(P', d, d)`` twice, ``(P', m, d)`` and ``(P', d, d)``, with
        ``P' >= P``, in the dtype and on the device of ``r``, reused across calls;
        fifth, optionally, a :func:`~skanomaly.functional.mahalanobis.tril_inverse_workspace`
        for ``P'`` matrices.

    Returns
    -------
    Tensor of shape (P, m)
        Leave-one-out (squared) distances of each problem's samples.

    Raises
    ------
    TypeError
        If ``r`` and ``scatter`` are not tensors of one dtype, float32 or float64.
    ValueError
        If the shapes do not match or ``d == 0``, if ``n_samples < ddof + 2``, if a
        leave-one-out covariance is singular (a
        rank-deficient scatter without ridge, or a sample that alone spans a direction
        of the data), or if a distance overflows.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import (leave_one_out_from_residuals,
    ...                                    leave_one_out_mahalanobis)
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(30, 4, 3, generator=g, dtype=torch.float64)  # (n, P, d)
    >>> mu = x.mean(0)
    >>> r = (x - mu).transpose(0, 1).contiguous()  # (P, n, d)
    >>> w = r.mT @ r
    >>> d = leave_one_out_from_residuals(r, w, 30, ddof=1, reg=0.1)
    >>> ref = leave_one_out_mahalanobis(x, mu, w, 30, ddof=1, reg=0.1)
    >>> bool(torch.allclose(d.mT, ref))
    True
    """
    if not (isinstance(r, torch.Tensor) and isinstance(scatter, torch.Tensor)):
        raise TypeError("r and scatter must be tensors")
    if r.dtype not in (torch.float32, torch.float64) or scatter.dtype != r.dtype:
        raise TypeError(f"r and scatter must be both float32 or both float64, got "
                        f"{r.dtype} and {scatter.dtype}")
    if (r.ndim != 3 or r.shape[-1] == 0
            or tuple(scatter.shape) != (r.shape[0], r.shape[2], r.shape[2])):
        raise ValueError(f"r must be (P, m, d) with d > 0 and scatter (P, d, d), got "
                         f"{tuple(r.shape)} and {tuple(scatter.shape)}")
    n = int(n_samples)
    if n < ddof + 2:
        raise ValueError(f"leave-one-out needs n_samples >= ddof + 2 = {ddof + 2}, got {n}")
    p = scatter.shape[0]
    a_loo = 1.0 / (n - 1 - ddof)
    a = torch.empty_like(scatter) if buffers is None else buffers[0][:p]
    a.copy_(scatter).diagonal(dim1=-2, dim2=-1).add_(float(reg) / a_loo)
    return _finish(_downdated(r, a, n / (n - 1), a_loo, False, buffers), squared)


def _downdated(r, a, c, a_loo, validate_args, buffers):
    """(P, m) leave-one-out squared distances ``(c^2 / a') q / (1 - c q)`` of residuals
    ``r`` (P, m, d), ``q = r^T A^{-1} r`` by the Cholesky factor of ``a = A`` (P, d, d)."""
    p = a.shape[0]
    factor, info = cholesky_ex(a, out=None if buffers is None else buffers[3][:p].mT)
    if bool((info != 0).any()):
        raise ValueError("the leave-one-out covariance is singular (a rank-deficient scatter "
                         "without shrinkage or ridge)")
    # q = |L^{-1} r|^2: each problem's samples (m, d) times its L^{-T}, rows summed
    inverse = tril_inverse(factor, validate_args=validate_args,
                           out=None if buffers is None else buffers[1][:p],
                           workspace=None if buffers is None or len(buffers) < 5
                           else buffers[4])
    z = torch.bmm(r, inverse.mT, out=None if buffers is None else buffers[2][:p])
    q = z.square_().sum(-1)  # (P, m)
    denom = 1.0 - c * q
    if not bool((denom > 8 * torch.finfo(q.dtype).eps).all()):
        raise ValueError("the model without some sample is singular: that sample alone spans "
                         "a direction of the data (add shrinkage or reg)")
    return (c * c / a_loo) * q / denom


def _finish(d2: torch.Tensor, squared: bool) -> torch.Tensor:
    if not bool(torch.isfinite(d2).all()):
        raise ValueError("leave-one-out distances overflow float64: rescale the data")
    return d2 if squared else d2.sqrt()
