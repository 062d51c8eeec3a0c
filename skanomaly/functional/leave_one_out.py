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
from .mahalanobis import tril_inverse

__all__ = ["leave_one_out_mahalanobis"]


def leave_one_out_mahalanobis(x, mean, scatter, n_samples, *, ddof=0, shrinkage=0.0,
                              target=0.0, reg=0.0, squared=True):
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
    x, mean = as_float_tensor(x, "x"), as_float_tensor(mean, "mean")
    scatter = as_float_tensor(scatter, "scatter")
    if mean.ndim < 1 or mean.shape[-1] == 0:
        raise ValueError(f"mean must be a non-empty (..., d) tensor, got {tuple(mean.shape)}")
    d = mean.shape[-1]
    if tuple(scatter.shape) != (*mean.shape, d):
        raise ValueError(f"scatter must have shape {(*mean.shape, d)} to match mean, got "
                         f"{tuple(scatter.shape)}")
    if x.ndim != mean.ndim + 1 or tuple(x.shape[1:]) != tuple(mean.shape):
        raise ValueError(f"x must have shape (m, {', '.join(map(str, mean.shape))}), got "
                         f"{tuple(x.shape)}")
    for t, name in ((x, "x"), (mean, "mean"), (scatter, "scatter")):
        check_finite(t, name)
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
    r = x - mean  # (m, B..., d)
    if s == 1.0:  # Sigma_i = (t + reg) I: no scatter left to downdate
        if not bool((ridge > 0).all()):
            raise ValueError("shrinkage=1 towards a zero target without reg: the "
                             "leave-one-out covariance is zero")
        return _finish(c * c * r.square().sum(-1) / ridge, squared)
    a_loo = (1.0 - s) / (n - 1 - ddof)
    a = scatter.clone()
    a.diagonal(dim1=-2, dim2=-1).add_((ridge / a_loo)[..., None] if ridge.ndim else
                                      float(ridge) / a_loo)
    factor, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        raise ValueError("the leave-one-out covariance is singular (a rank-deficient scatter "
                         "without shrinkage or ridge)")
    # q = |L^{-1} r|^2, the samples as right-hand sides of each problem's factor
    batch = mean.shape[:-1]
    p = math.prod(batch)
    rhs = r.reshape(r.shape[0], p, d).permute(1, 2, 0)  # (P, d, m)
    z = tril_inverse(factor.reshape(p, d, d)) @ rhs
    q = z.square().sum(1).mT.reshape(r.shape[:-1])  # (m, B...)
    denom = 1.0 - c * q
    if not bool((denom > 8 * torch.finfo(work).eps).all()):
        raise ValueError("the model without some sample is singular: that sample alone spans "
                         "a direction of the data (add shrinkage or reg)")
    return _finish((c * c / a_loo) * q / denom, squared)


def _finish(d2: torch.Tensor, squared: bool) -> torch.Tensor:
    if not bool(torch.isfinite(d2).all()):
        raise ValueError("leave-one-out distances overflow float64: rescale the data")
    return d2 if squared else d2.sqrt()
