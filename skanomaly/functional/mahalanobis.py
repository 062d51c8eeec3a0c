"""Regularised Cholesky factors and Mahalanobis distances by batched triangular solves.

No explicit inverse is ever formed: precision work goes through Cholesky factors and
``torch.linalg.solve_triangular``, batched over positions (no Python loop).
:class:`GaussianScorer` and :class:`WoodburyGaussianScorer` are the fitted kernel
modules: Gaussians whose factors are computed and validated once, scoring by matrix
products only (the expressions :func:`mahalanobis` and :func:`mahalanobis_woodbury`
evaluate), traceable and exportable to ONNX.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ._alignment import aligned_width, pad_aligned, realign
from ._validation import (
    all_finite,
    as_float_tensor,
    check_finite,
    frexp_exponent,
    ldexp,
    ldexp_,
    max_abs_exponent,
    working_dtype,
    range_error,
)

__all__ = [
    "regularized_cholesky",
    "tril_inverse",
    "precision_cholesky",
    "mahalanobis",
    "woodbury_factor",
    "mahalanobis_woodbury",
    "GaussianScorer",
    "WoodburyGaussianScorer",
]


def _check_reg(reg, *, positive: bool = False) -> float:
    """Return ``reg`` as a finite float, >= 0 (or > 0 when ``positive``)."""
    try:
        reg = float(reg)
    except (TypeError, ValueError):
        raise TypeError(f"reg must be a real number, got {type(reg).__name__}") from None
    if not math.isfinite(reg) or reg < 0 or (positive and reg == 0):
        raise ValueError(f"reg must be a finite number {'>' if positive else '>='} 0, "
                         f"got {reg}")
    return reg


def _check_square(a: torch.Tensor, name: str) -> torch.Tensor:
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must be a (..., d, d) stack of square matrices, "
                         f"got shape {tuple(a.shape)}")
    if a.shape[-1] == 0:
        raise ValueError(f"{name} holds 0 x 0 matrices (axes -2 and -1 have length 0): at "
                         "least one feature is required")
    return a.to(working_dtype(a.dtype))


_CHECK_BLOCK = 2**22  # entries per block of the symmetry / triangle checks (bounded memory)
_PLAIN_EXPONENT = {torch.float32: 30, torch.float64: 250}  # unscaled arithmetic is safe within


def _matrix_blocks(a: torch.Tensor):
    """``(offset, block)`` over the matrices of ``a`` flattened to (B, r, c), a few MB each."""
    flat = a.reshape(-1, *a.shape[-2:])
    step = max(1, _CHECK_BLOCK // max(1, flat.shape[-1] * flat.shape[-2]))
    for start in range(0, flat.shape[0], step):
        yield start, flat[start : start + step]


def _check_symmetric(a: torch.Tensor, name: str) -> None:
    """``ValueError`` unless each matrix equals its transpose to ``sqrt(eps)`` of its scale."""
    tol = math.sqrt(torch.finfo(a.dtype).eps)
    for start, block in _matrix_blocks(a):
        gap = (block - block.mT).abs().amax((-2, -1))
        scale = block.abs().amax((-2, -1))
        bad = ~(gap <= tol * scale)  # an overflowing gap (inf) is asymmetric too
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name} is not symmetric: matrix {start + i} has |C - C^T| up to "
                f"{float(gap[i]):.3g} for entries up to {float(scale[i]):.3g} (tolerance "
                f"{tol:.1g} relative); pass (C + C.mT) / 2 if the asymmetry is rounding")


def _check_triangular(a: torch.Tensor, name: str, *, lower: bool) -> None:
    """``ValueError`` unless the other triangle of each matrix is exactly zero."""
    for _, block in _matrix_blocks(a):
        other = block.triu(1) if lower else block.tril(-1)
        if bool(other.any()):
            side, part = ("lower", "upper") if lower else ("upper", "lower")
            raise ValueError(f"{name} must be {side}-triangular (a Cholesky factor), but its "
                             f"strict {part} triangle holds non-zero entries")


def _plain_is_safe(dtype: torch.dtype, *exponents: int) -> bool:
    """Whether entries of these binary exponents can be squared and summed unscaled."""
    window = _PLAIN_EXPONENT.get(dtype, 30)
    return all(abs(e) <= window for e in exponents)


def regularized_cholesky(covariance, reg=0.0):
    """Lower Cholesky factor of ``covariance + reg * I``, batched.

    Parameters
    ----------
    covariance : Tensor of shape (..., d, d)
        Symmetric positive-(semi)definite matrices, any floating dtype and device (integer
        input is promoted to the default dtype, float16 and bfloat16 to float32). Each
        must equal its transpose up to ``sqrt(eps)`` of its largest entry (rounding);
        the factorisation then reads the lower triangle.
    reg : float, default=0.0
        Non-negative ridge added to the diagonal (same units as the covariance).

    Returns
    -------
    Tensor of shape (..., d, d)
        Lower-triangular factors ``L`` with ``L @ L.mT == covariance + reg * I``, computed in
        the dtype of ``covariance`` (float32 for half precision).

    Raises
    ------
    TypeError
        If ``covariance`` is not a real tensor or ``reg`` is not a number.
    ValueError
        If ``covariance`` is not a stack of square matrices, has ``d == 0``, holds NaN or
        infinity or is clearly not symmetric, if ``reg`` is negative, not finite or beyond
        the dtype's range, or if any regularised matrix is singular or not
        positive-definite (the message says how many and suggests a larger ``reg``).

    Notes
    -----
    ``torch.linalg.cholesky_ex``: ``O(d**3 / 3)`` per matrix, the whole batch in one call,
    on each matrix scaled by an exact power of four (its largest entry, or ``reg``, to
    [0.25, 2)) and the factor scaled back by the power of two: the plain factor wherever
    that neither overflows nor underflows, and a finite one for any finite matrix (a
    float64 covariance of ``1e300`` factorises).
    Adding ``reg * I`` is the regularisation of PaDiM (Defard et al., 2021, with
    ``reg = 0.01``) and of anomalib's ``MultiVariateGaussian``.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import regularized_cholesky
    >>> regularized_cholesky(torch.tensor([[4.0, 2.0], [2.0, 2.0]]))
    tensor([[2., 0.],
            [1., 1.]])
    >>> regularized_cholesky(torch.zeros(2, 2), reg=0.25)
    tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]])
    """
    a = _check_square(as_float_tensor(covariance, "covariance"), "covariance")
    check_finite(a, "covariance")
    reg = _check_reg(reg)
    if reg > torch.finfo(a.dtype).max:
        raise ValueError(f"reg={reg:g} exceeds the range of {a.dtype}")
    _check_symmetric(a, "covariance")
    factor, info = _cholesky_scaled(a, reg)
    _check_info(info, a.shape, f"with reg={reg:g}", "increase reg (e.g. to 0.01 times the "
                "mean variance) or provide more samples than features")
    return factor


def cholesky_or_raise(covariance: torch.Tensor, reg: float, advice: str, *,
                      validate_args: bool = True, overwrite_a: bool = False,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Lower Cholesky factor of ``covariance + reg * I``; ``ValueError`` if numerically singular.

    Besides an outright failure of the factorisation, a pivot ``L_ii**2`` below
    ``d * eps`` times the largest variance means a condition number beyond ``1 / (d * eps)``:
    the matrix is singular to working precision (e.g. exactly collinear features, whose
    factorisation may "succeed" with a rounding-error pivot and give meaningless distances).
    The detectors' fit uses it with advice for their users.

    Parameters
    ----------
    covariance : torch.Tensor of shape (..., d, d)
        Symmetric positive semi-definite matrices, floating point.
    reg : float >= 0
        Added to the diagonal before factorising (see :func:`regularized_cholesky`).
    advice : str
        The message of the ``ValueError``: what the user can do about it.
    validate_args : bool, default=True
        Check that ``covariance`` is a finite symmetric float tensor and ``reg`` a valid
        ridge first (:func:`regularized_cholesky`'s checks). ``False`` is for hot loops
        whose caller built symmetric finite float64 matrices itself (a fit's scatter):
        the factor is the same, without the passes over the data.
    overwrite_a : bool, default=False
        With ``validate_args=False``: let the factorisation scale and regularise
        ``covariance`` in place (a scratch buffer of a hot loop) instead of a copy.
    out : Tensor of shape (..., d, d), optional
        With ``validate_args=False``: where to write the factor (any strides; the
        transpose of a contiguous buffer is the layout LAPACK writes, without a copy).

    Returns
    -------
    factor : torch.Tensor of shape (..., d, d)
        Lower-triangular, dtype and device of ``covariance``.

    Raises
    ------
    ValueError
        With ``advice`` as its message, if the factorisation fails or a pivot is below
        ``d * eps`` times the largest variance.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional.mahalanobis import cholesky_or_raise
    >>> cholesky_or_raise(torch.eye(2, dtype=torch.float64) * 4, 0.0, "singular")
    tensor([[2., 0.],
            [0., 2.]], dtype=torch.float64)
    >>> cholesky_or_raise(torch.ones(2, 2, dtype=torch.float64), 0.0, "raise reg")
    Traceback (most recent call last):
    ...
    ValueError: raise reg
    """
    d = covariance.shape[-1]
    # the largest variance before any in-place scaling of the covariance
    scale = covariance.diagonal(dim1=-2, dim2=-1).amax(-1) + reg
    if validate_args:
        try:
            factor = regularized_cholesky(covariance, reg)
        except ValueError as exc:
            raise ValueError(advice) from exc
    else:
        factor, info = _cholesky_scaled(covariance, reg, overwrite_a=overwrite_a, out=out)
        if bool((info != 0).any()):
            raise ValueError(advice)
    pivots = factor.diagonal(dim1=-2, dim2=-1).square().amin(-1)
    if bool((pivots <= d * torch.finfo(factor.dtype).eps * scale).any()):
        raise ValueError(advice)
    return factor


def _cholesky_scaled(a: torch.Tensor, ridge, *, overwrite_a: bool = False,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cholesky_ex(a + ridge I)`` computed on ``a / 4**h`` and scaled back by ``2**h``.

    ``h`` per matrix brings the larger of its largest entry and ``ridge`` (a float or
    a tensor of the batch shape) to [0.25, 2): powers of two scale exactly, so the
    factor is the plain one wherever that neither overflows nor underflows, and a
    finite factor of any representable matrix otherwise. ``overwrite_a``: scale and
    regularise ``a`` in place; ``out``: where to write the factor (see
    :func:`cholesky_ex`).
    """
    # the largest |entry| from the extremes: no temporary |a| as large as a
    peak = torch.maximum(a.amax((-2, -1)), a.amin((-2, -1)).neg())
    ridge = torch.as_tensor(ridge, dtype=torch.float64, device=a.device).expand(peak.shape)
    exponent = torch.maximum(frexp_exponent(peak), frexp_exponent(ridge))
    half = torch.div(exponent, 2, rounding_mode="floor")
    scaled = ldexp_(a if overwrite_a else a.clone(), -2 * half[..., None, None])
    scaled.diagonal(dim1=-2, dim2=-1).add_(ldexp(ridge, -2 * half).to(a.dtype)[..., None])
    factor, info = cholesky_ex(scaled, out=out)
    return ldexp_(factor, half[..., None, None]), info


_PARALLEL_CHOLESKY_FLOPS = 2**22  # below about 4 MFLOP a batch is factorised in one call


def cholesky_ex(a: torch.Tensor, *, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex(a)``, a large CPU batch split over the intra-op threads.

    ATen's CPU kernel factorises a batch one matrix after another, one LAPACK ``potrf``
    call each, on one thread, whatever ``torch.get_num_threads()`` says (the 3,136
    100 x 100 covariances of a PaDiM fit: 0.25 s with 1 thread or 2). Each matrix's
    factor does not depend on which thread computes it, so the batch is cut into one
    chunk per thread, factorised in Python threads (the kernel releases the GIL), and
    joined: bitwise the single call's values, in about ``1 / threads`` of its time.
    Other devices, small batches, one thread and tensors that need gradients take the
    single call.

    Parameters
    ----------
    a : Tensor of shape (..., d, d)
        Symmetric matrices (the lower triangle is read), float32 or float64.
    out : Tensor of shape (..., d, d), optional
        Where to write ``L`` (a scratch buffer of a hot loop, reused: no allocation).
        LAPACK writes column-major matrices: pass the transpose of a contiguous
        buffer (``buf.mT``) and no copy is made either.

    Returns
    -------
    L : Tensor of shape (..., d, d)
        Lower Cholesky factors, as ``torch.linalg.cholesky_ex`` returns them (``out``
        when given).
    info : Tensor of shape (...), int32
        0 where the factorisation succeeded, else the order of the leading minor that
        is not positive-definite (``torch.linalg.cholesky_ex``'s convention).

    Raises
    ------
    RuntimeError
        Where ``torch.linalg.cholesky_ex`` raises (not a batch of square matrices).

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional.mahalanobis import cholesky_ex
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(512, 40, 8, generator=g, dtype=torch.float64)
    >>> a = x.mT @ x
    >>> L, info = cholesky_ex(a)
    >>> bool(torch.equal(L, torch.linalg.cholesky_ex(a)[0])), int(info.abs().max())
    (True, 0)
    """
    threads = torch.get_num_threads()
    if (a.device.type != "cpu" or threads < 2 or a.ndim < 3 or a.requires_grad
            or a.numel() * a.shape[-1] < 3 * threads * _PARALLEL_CHOLESKY_FLOPS):
        if out is None:
            return torch.linalg.cholesky_ex(a)
        info = torch.empty(a.shape[:-2], dtype=torch.int32, device=a.device)
        return torch.linalg.cholesky_ex(a, out=(out, info))
    d = a.shape[-1]
    flat = a.reshape(-1, d, d)
    if out is None:  # column-major, as LAPACK writes it
        out = torch.empty_like(flat).mT
    else:
        out = out if out.ndim == 3 else out.view(-1, d, d)
    info = torch.empty(flat.shape[0], dtype=torch.int32, device=a.device)

    def factorise(rows: slice) -> None:
        torch.linalg.cholesky_ex(flat[rows], out=(out[rows], info[rows]))

    bounds = [len(part) for part in torch.arange(flat.shape[0]).tensor_split(threads)]
    starts = [sum(bounds[:i]) for i in range(threads)]
    list(_pool(threads).map(factorise, [slice(s, s + b) for s, b in zip(starts, bounds)]))
    return out.reshape(a.shape), info.reshape(a.shape[:-2])


_POOLS: dict = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool of ``threads`` workers kept for the process: a fit factorises block
    after block, and starting two threads per call took 0.1 s of a 1 s PaDiM fit. Keyed
    by the process id too, since a forked child cannot use its parent's threads."""
    key = (os.getpid(), threads)
    pool = _POOLS.get(key)
    if pool is None:
        _POOLS.clear()  # a parent's pools (after fork) or another thread count's
        pool = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="skanomaly")
    return pool


def _check_info(info: torch.Tensor, shape, condition: str, advice: str) -> None:
    """The error of :func:`regularized_cholesky` for the matrices that did not factorise."""
    failed = int((info != 0).sum())
    if failed:
        total = math.prod(shape[:-2])
        raise ValueError(
            f"{failed} of {total} covariance matrices (d={shape[-1]}) are singular or not "
            f"positive-definite {condition}; {advice}")


def _prepare(x, mean):
    """Validate ``x`` (S..., B..., d) against ``mean`` (B..., d).

    Returns ``x`` as (M, P, d) and ``mean`` as (P, d) in their promoted working dtype
    (``B`` flattened to ``P`` problems, the queries ``S`` to ``M``), the result shape
    (S..., B...) and ``B``.
    """
    x, mean = as_float_tensor(x, "x"), as_float_tensor(mean, "mean")
    if mean.ndim < 1:
        raise ValueError(f"mean must be a (..., d) tensor, got shape {tuple(mean.shape)}")
    for axis, size in enumerate(mean.shape):
        if size == 0:
            what = "features" if axis == mean.ndim - 1 else "positions"
            raise ValueError(f"mean has 0 {what} (axis {axis} of shape "
                             f"{tuple(mean.shape)}); at least one is required")
    batch = tuple(mean.shape[:-1])
    k = mean.ndim
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != tuple(mean.shape):
        raise ValueError(f"x must have shape (..., {', '.join(map(str, mean.shape))}) "
                         f"to match mean, got {tuple(x.shape)}")
    check_finite(x, "x")
    check_finite(mean, "mean")
    lead = tuple(x.shape[:x.ndim - k])
    p, d = math.prod(batch), mean.shape[-1]
    dtype = torch.promote_types(working_dtype(x.dtype), working_dtype(mean.dtype))
    return x.reshape(-1, p, d).to(dtype), mean.reshape(p, d).to(dtype), lead + batch, batch


def _check_factor(factor, batch, rows: int, name: str, *, lower: bool) -> torch.Tensor:
    factor = as_float_tensor(factor, name)
    want = (*batch, rows, rows)
    if tuple(factor.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(factor.shape)}")
    factor = factor.to(working_dtype(factor.dtype))
    check_finite(factor, name)
    _check_triangular(factor, name, lower=lower)
    if not bool((factor.diagonal(dim1=-2, dim2=-1) > 0).all()):
        raise ValueError(f"{name} must be a triangular Cholesky factor with a positive "
                         "diagonal")
    return factor


def _finish(d2: torch.Tensor, shape, squared: bool) -> torch.Tensor:
    """(P, M) squared distances -> (S..., B...), optionally square-rooted."""
    d2 = d2.mT.reshape(shape)
    return d2 if squared else d2.sqrt()


def _unscale(d2: torch.Tensor, exponent: torch.Tensor, shape, squared: bool) -> torch.Tensor:
    """(P, M) squared distances in units of ``2**exponent`` (per P) -> (S..., B...)."""
    e = exponent[:, None]
    out = ldexp(d2, 2 * e) if squared else ldexp(d2.sqrt(), e)
    if not all_finite(out):
        raise range_error("squared Mahalanobis distances" if squared else
                          "Mahalanobis distances", out.dtype)
    return out.mT.reshape(shape)


def _row_exponents(a: torch.Tensor) -> torch.Tensor:
    """frexp exponent of the largest entry of each a[p] (a of shape (P, ...)), int64."""
    return frexp_exponent(a.abs().reshape(a.shape[0], -1).amax(1))


def _quadratic(v: torch.Tensor, factor: torch.Tensor, *, solve: bool) -> torch.Tensor:
    """(P, M) ``|L^{-1} v|^2`` (``solve``) or ``|v U|^2`` for v (P, M, d), factor (P, d, d)."""
    if solve:
        # Queries as right-hand-side columns: z = L^{-1} v^T (one batched trsm). The
        # left-sided lower solve measured 2-13x faster than the equivalent right-sided
        # solve of v L^{-T} on this CPU build with 2 threads, at equal results.
        z = torch.linalg.solve_triangular(factor, v.mT, upper=False)
        return z.square().sum(-2)
    return _precision_quadratic(v, factor)


def _precision_quadratic(v: torch.Tensor, upper: torch.Tensor, d: int | None = None
                         ) -> torch.Tensor:
    """(P, M) ``|v U|^2`` for v (P, M, d), upper (P, d, d): one batched GEMM.

    The one kernel of :func:`mahalanobis` with ``precision_cholesky`` and of
    :class:`GaussianScorer`. Both dimensions of ``upper`` and the last of ``v`` are
    padded with zeros to aligned rows (:mod:`~skanomaly.functional._alignment`): each
    query's distance does not depend on its row in the product. With ``d`` given (the
    scorer's static width: traced code reads no shape), ``upper`` comes padded already
    (the scorer's ``U_padded``).
    """
    if d is None:
        d = v.shape[-1]
        upper = pad_aligned(pad_aligned(upper, dim=-1), dim=-2)
    return torch.matmul(pad_aligned(v, size=d), upper).square().sum(-1)


def _distances(xr, mr, factor, shape, squared: bool, *, solve: bool) -> torch.Tensor:
    """Mahalanobis distances of xr (M, P, d) to mr (P, d) under a (P..., d, d) factor.

    Plain arithmetic where every operand is within a safe binary exponent and the
    result is finite; otherwise every operand is first brought to unit scale by exact
    powers of two (per position) and the distances scaled back.
    """
    d = mr.shape[-1]
    dtype = torch.promote_types(xr.dtype, factor.dtype)
    xr, mr, factor = xr.to(dtype), mr.to(dtype), factor.reshape(-1, d, d).to(dtype)
    if xr.shape[0] == 0:
        return xr.new_zeros(shape)
    exponents = (max_abs_exponent(xr), max_abs_exponent(mr), max_abs_exponent(factor))
    if _plain_is_safe(dtype, *exponents):
        d2 = _quadratic((xr - mr).transpose(0, 1), factor, solve=solve)
        if all_finite(d2):
            return _finish(d2, shape, squared)
    common = max(exponents[:2])
    v = (ldexp(xr, -common) - ldexp(mr, -common)).transpose(0, 1)  # |v| <= 2: no overflow
    ev = _row_exponents(v)
    fe = _row_exponents(factor)
    d2 = _quadratic(ldexp(v, -ev[:, None, None]), ldexp(factor, -fe[:, None, None]),
                    solve=solve)
    return _unscale(d2, common + ev + (-fe if solve else fe), shape, squared)


def tril_inverse(lower: torch.Tensor, *, validate_args: bool = True,
                 out: torch.Tensor | None = None,
                 workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of lower-triangular matrices by recursive 2 x 2 blocks (matrix products).

    With ``L = [[A, 0], [C, D]]``, ``L^{-1} = [[A^{-1}, 0], [-D^{-1} C A^{-1}, D^{-1}]]``,
    applied recursively down to blocks of at most 16 x 16 (LAPACK's ``trtri``
    recursion), which are inverted by one batched ``torch.linalg.solve_triangular``
    against the identity: the bulk of the work is batched matrix products over the
    whole batch, where a batched ``torch.linalg.solve_triangular`` of the whole
    matrices loops over them, one small LAPACK call each (on a 2-core CPU with 2
    threads it ran the 3,136 100 x 100 factors of a PaDiM fit 2.7x slower than this;
    2x with 1 thread), and recursing down to 1 x 1 blocks spends its time in Python
    (1.7x slower than stopping at 16). Forward error of the order of a triangular
    solve's: ``cond(L) * eps`` relative.

    Parameters
    ----------
    lower : Tensor of shape (..., d, d)
        Lower-triangular matrices with a non-zero diagonal (the entries above the
        diagonal are not read), float32 or float64, any device.
    validate_args : bool, default=True
        Check the input (floating, square, finite) and that the inverse is finite.
        ``False`` is for hot loops that pass factors they just computed and check
        what they derive from the inverse: the same values, without the passes over
        the data.
    out : Tensor of shape (..., d, d), optional
        Where to write ``L^{-1}`` (any strides, e.g. the transpose of a slice of a
        preallocated array, so that no temporary is made); returned.
    workspace : Tensor, optional
        Scratch from :func:`tril_inverse_workspace` for at least as many matrices of
        this size and dtype, reused across the calls of a loop (None: one is made per
        call). The result does not depend on it.

    Returns
    -------
    Tensor of shape (..., d, d)
        ``L^{-1}``, lower-triangular, same dtype and device.

    Raises
    ------
    TypeError
        If ``lower`` is not a floating tensor.
    ValueError
        If it is not a batch of square matrices, holds NaN or infinity, or is singular
        to its precision (a zero diagonal entry, or an inverse that overflows).

    References
    ----------
    F. G. Gustavson, "Recursion leads to automatic variable blocking for dense
    linear-algebra algorithms", IBM J. Res. Dev. 41(6), 1997.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import tril_inverse
    >>> L = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, -1.0, 4.0]],
    ...                  dtype=torch.float64)
    >>> torch.allclose(tril_inverse(L) @ L, torch.eye(3, dtype=torch.float64))
    True
    """
    if validate_args:
        lower = check_finite(_check_square(as_float_tensor(lower, "lower"), "lower"),
                             "lower")
    d = lower.shape[-1]
    flat = lower.reshape(-1, d, d)
    if out is None:
        result = torch.zeros(lower.shape, dtype=lower.dtype, device=lower.device)
    elif out.shape != lower.shape or out.dtype != lower.dtype:
        raise ValueError(f"out must be a {lower.dtype} tensor of shape "
                         f"{tuple(lower.shape)}, got {out.dtype} {tuple(out.shape)}")
    else:
        result = out.zero_()
    if d and flat.shape[0]:
        _tril_inverse_into(flat, result.unsqueeze(0) if result.ndim == 2 else
                           result.view(-1, d, d), workspace)
    if validate_args and not all_finite(result):
        raise ValueError("lower is singular to its precision: a zero diagonal entry, or an "
                         f"inverse beyond the {result.dtype} range")
    return result


_TRIL_INVERSE_BASE = 16  # blocks up to this size are inverted by a triangular solve


def tril_inverse_workspace(batch: int, d: int, *, dtype=torch.float64, device=None
                           ) -> torch.Tensor:
    """Scratch for :func:`tril_inverse` of up to ``batch`` (d, d) factors, reusable.

    Two products of the recursion's largest off-diagonal block, ``(batch, d - h, h)``
    with ``h = d // 2``, and the leaves' solves: every level reuses the same memory,
    since a level's products start after its children are done. One buffer for a
    loop of calls instead of fresh temporaries per product, whose first touch (page
    faults) cost more than the products on the 2-core machines.

    Parameters
    ----------
    batch : int
        Largest number of matrices per call.
    d : int
        Order of the matrices.
    dtype : torch.dtype, default=torch.float64
        The factors' dtype.
    device : torch.device or str, optional
        The factors' device.

    Returns
    -------
    Tensor of shape (size,)
        Uninitialised; each part starts on a 64-byte boundary, as a fresh tensor does
        (MKL rounds differently on unaligned operands, so the inverse has the bits of
        :func:`tril_inverse` without it).

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import tril_inverse
    >>> from skanomaly.functional.mahalanobis import tril_inverse_workspace
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(8, 40, 20, generator=g, dtype=torch.float64)
    >>> L = torch.linalg.cholesky(x.mT @ x)
    >>> ws = tril_inverse_workspace(8, 20)
    >>> torch.equal(tril_inverse(L, workspace=ws), tril_inverse(L))
    True
    """
    h = d // 2
    leaf = min(d, _TRIL_INVERSE_BASE)
    # the second product starts on a 64-byte boundary, as a fresh tensor does
    size = aligned_width(batch * (d - h) * h, dtype)
    return torch.empty(max(2 * size, batch * leaf * leaf), dtype=dtype, device=device)


def _tril_inverse_into(lower: torch.Tensor, out: torch.Tensor,
                       workspace: torch.Tensor | None = None) -> None:
    """Write the inverse of lower-triangular (B, d, d) ``lower`` into the zeroed ``out``.

    ``workspace``: from :func:`tril_inverse_workspace` for at least B matrices of this
    size (None: one is made).
    """
    b, d = lower.shape[0], lower.shape[-1]
    if workspace is None:
        workspace = tril_inverse_workspace(b, d, dtype=lower.dtype, device=lower.device)
    if d <= _TRIL_INVERSE_BASE:
        eye = torch.eye(d, dtype=lower.dtype, device=lower.device).expand_as(lower)
        # written column-major, as LAPACK solves in place: no copy on the way out
        solved = workspace[: b * d * d].view(b, d, d).mT
        out.copy_(torch.linalg.solve_triangular(lower, eye, upper=False, out=solved))
        return
    h = d // 2
    top, bottom = out[:, :h, :h], out[:, h:, h:]
    _tril_inverse_into(lower[:, :h, :h], top, workspace)
    _tril_inverse_into(lower[:, h:, h:], bottom, workspace)
    size = b * (d - h) * h
    first = workspace[:size].view(b, d - h, h)
    start = aligned_width(size, workspace.dtype)
    second = workspace[start: start + size].view(b, d - h, h)
    # matmul, not bmm: it multiplies contiguous copies of strided blocks, as it always
    # did (bmm of the strided views rounds differently in the last bit)
    torch.matmul(lower[:, h:, :h], top, out=first)
    torch.neg(torch.matmul(bottom, first, out=second), out=out[:, h:, :h])


def precision_cholesky(cholesky, *, validate_args=True, out=None, overwrite_cholesky=False):
    """Upper-triangular ``U = L^{-T}`` with ``Sigma^{-1} = U U^T``, batched.

    Parameters
    ----------
    cholesky : Tensor of shape (..., d, d)
        Lower Cholesky factors ``L`` of covariances (``Sigma = L L^T``), as returned by
        :func:`regularized_cholesky`; any floating dtype and device (float16 and bfloat16
        are computed in float32).
    validate_args : bool, default=True
        Check that ``cholesky`` is a finite lower-triangular factor with a positive
        diagonal. ``False`` is for hot loops that pass factors they just computed (a
        fit's :func:`cholesky_or_raise`): ``U`` is the same, without the passes over the
        data; its overflow is still checked.
    out : Tensor of shape (..., d, d), optional
        Where to write ``U`` (e.g. a slice of a preallocated array: no temporary is
        made); returned. Its dtype must be the working dtype of ``cholesky``.
    overwrite_cholesky : bool, default=False
        Let the computation scale ``cholesky`` in place (a scratch buffer of a hot
        loop) instead of a scaled copy.

    Returns
    -------
    Tensor of shape (..., d, d)
        Upper-triangular ``U`` in the dtype of ``cholesky``: scikit-learn's
        ``GaussianMixture.precisions_cholesky_`` convention. Then
        ``mahalanobis(x)^2 = ||(x - mean) @ U||^2``.

    Raises
    ------
    TypeError
        If ``cholesky`` is not a real tensor.
    ValueError
        If it is not a stack of square matrices, has ``d == 0``, holds NaN or infinity,
        is not lower-triangular (its strict upper triangle must be exactly zero), has a
        non-positive diagonal, or ``U`` overflows the dtype.

    Notes
    -----
    One triangular inversion ``L^{-1}`` by :func:`tril_inverse` (``O(d**3 / 3)`` per
    matrix, like the factorisation, in batched matrix products), never a general
    inverse: LU-based batched ``torch.linalg.inv`` is
    both less stable and faulty on some CPU builds for ``d >~ 150``. Scoring against
    ``U`` is then a batched matrix product, which on CPUs runs far closer to the GEMM
    peak than a batched triangular solve with many right-hand sides (see
    ``benchmarks/``). Same construction as scikit-learn's
    ``sklearn.mixture._gaussian_mixture._compute_precision_cholesky``. Each ``L`` is
    solved at unit scale (divided by an exact power of two) and ``U`` scaled back.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import precision_cholesky, regularized_cholesky
    >>> cov = torch.tensor([[4.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    >>> U = precision_cholesky(regularized_cholesky(cov))
    >>> torch.allclose(U @ U.mT, torch.linalg.inv(cov))
    True
    """
    if validate_args:
        factor = _check_square(as_float_tensor(cholesky, "cholesky"), "cholesky")
        factor = _check_factor(factor, factor.shape[:-2], factor.shape[-1], "cholesky",
                               lower=True)
    else:
        factor = cholesky
    # L = 2**e L_s (e per matrix, exact) gives U = 2**-e U_s: no overflow on the way
    peak = torch.maximum(factor.amax((-2, -1)), factor.amin((-2, -1)).neg())
    e = frexp_exponent(peak)[..., None, None]
    if out is None:
        out = torch.empty(factor.shape, dtype=factor.dtype, device=factor.device)
    # L^{-1} written into out's transpose: out holds U = L^{-T} without a transposed copy
    scaled = ldexp_(factor, -e) if overwrite_cholesky else ldexp(factor, -e)
    tril_inverse(scaled, validate_args=validate_args, out=out.mT)
    upper = ldexp_(out, -e)
    if not all_finite(upper):
        raise range_error("entries of the precision factor L^-T", upper.dtype)
    return upper


def mahalanobis(x, mean, *, cholesky=None, covariance=None, reg=0.0, squared=False,
                precision_cholesky=None):
    """Compute Mahalanobis distances of samples to one or many Gaussians.

    Parameters
    ----------
    x : Tensor of shape (S..., B..., d)
        Query samples; the trailing dims must equal ``mean.shape``. For PaDiM,
        ``x`` is (N, P, d) with ``mean`` (P, d); for one Gaussian, ``x`` is (N, d) with
        ``mean`` (d,).
    mean : Tensor of shape (B..., d)
        Means of the Gaussians, one per position of ``B``.
    cholesky : Tensor of shape (B..., d, d), optional
        Lower Cholesky factors ``L`` of the covariances (``Sigma = L L^T``), e.g. from
        :func:`regularized_cholesky`.
    covariance : Tensor of shape (B..., d, d), optional
        Covariances; factorised here with :func:`regularized_cholesky` and ``reg``.
    precision_cholesky : Tensor of shape (B..., d, d), optional
        Upper-triangular ``U`` with ``Sigma^{-1} = U U^T`` from
        :func:`precision_cholesky`: the fastest path when the same Gaussians score many
        batches. Give exactly one of ``cholesky``, ``covariance`` and
        ``precision_cholesky``.
    reg : float, default=0.0
        Ridge added to ``covariance`` before factorising; only valid with ``covariance``.
    squared : bool, default=False
        Return squared distances.

    Returns
    -------
    Tensor of shape (S..., B...)
        ``sqrt((x - mean)^T Sigma^{-1} (x - mean))`` (no square root if ``squared``), in
        the promoted dtype of the inputs; float16 and bfloat16 are computed and returned
        in float32 (their range is too small for squared distances). Empty when ``x``
        holds no sample.

    Raises
    ------
    TypeError
        If an input is not a real tensor.
    ValueError
        Unless exactly one of ``cholesky``, ``covariance`` and ``precision_cholesky``
        is given, if ``reg`` is given without ``covariance``, if shapes do not match or
        ``mean`` has a zero-length axis, if an input holds NaN or infinity, if
        ``cholesky`` is not lower-triangular (``precision_cholesky`` not
        upper-triangular) with a positive diagonal, if a covariance is not symmetric or
        cannot be factorised (see :func:`regularized_cholesky`), or if the distances
        exceed the range of the dtype.

    Notes
    -----
    For each position the ``M = prod(S)`` centred queries are the right-hand sides of
    one triangular solve ``L z = x - mean``, all positions in one batched
    ``solve_triangular`` call; ``d^2 = ||z||^2``. With ``precision_cholesky`` it is one
    batched matrix product ``z = (x - mean) U`` instead. Cost: ``O(P * M * d**2)`` time and
    ``O(P * M * d)`` memory, no inverse (more stable than anomalib's
    ``torch.linalg.inv`` of the covariance). Matches
    ``sklearn.covariance.EmpiricalCovariance.mahalanobis`` (squared) and
    ``scipy.spatial.distance.mahalanobis``. Where an operand lies beyond ``2**+-30``
    (float32; ``2**+-250`` in float64) or the plain result overflows, the centred queries
    and the factor are first brought to unit scale by exact powers of two per position
    and the distances scaled back: any finite input whose distances are representable
    gives them.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import mahalanobis
    >>> x = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    >>> mahalanobis(x, torch.zeros(2), covariance=torch.diag(torch.tensor([4.0, 9.0])))
    tensor([1., 1.])
    >>> x = torch.zeros(5, 7, 3)  # 5 samples at 7 positions, 3 features
    >>> mahalanobis(x, torch.ones(7, 3), cholesky=torch.eye(3).expand(7, 3, 3)).shape
    torch.Size([5, 7])
    """
    if sum(a is not None for a in (cholesky, covariance, precision_cholesky)) != 1:
        raise ValueError("give exactly one of cholesky, covariance and precision_cholesky")
    xr, mr, shape, batch = _prepare(x, mean)
    d = mr.shape[-1]
    if precision_cholesky is not None:
        if _check_reg(reg):
            raise ValueError("reg applies only with covariance; precision_cholesky is used "
                             "as given")
        upper = _check_factor(precision_cholesky, batch, d, "precision_cholesky",
                              lower=False)
        return _distances(xr, mr, upper, shape, squared, solve=False)
    if cholesky is None:
        covariance = as_float_tensor(covariance, "covariance")
        if tuple(covariance.shape) != (*batch, d, d):
            raise ValueError(f"covariance must have shape {(*batch, d, d)}, "
                             f"got {tuple(covariance.shape)}")
        factor = regularized_cholesky(covariance, reg)
    else:
        if _check_reg(reg):
            raise ValueError("reg applies only with covariance; cholesky is used as given")
        factor = _check_factor(cholesky, batch, d, "cholesky", lower=True)
    return _distances(xr, mr, factor, shape, squared, solve=True)


def woodbury_factor(centered, reg, ddof=1):
    """Cholesky factor of the N x N Woodbury core ``reg (N - ddof) I_N + Xc Xc^T``.

    With ``Sigma = Xc^T Xc / (N - ddof) + reg I`` (the regularised covariance of ``N``
    centred samples), the Woodbury identity gives
    ``Sigma^{-1} = (I - Xc^T K^{-1} Xc) / reg`` with ``K = reg (N - ddof) I_N + Xc Xc^T``;
    this returns the lower Cholesky factor of ``K``, for :func:`mahalanobis_woodbury`.

    Parameters
    ----------
    centered : Tensor of shape (..., N, d)
        Training samples minus their mean, per position (e.g. (P, N, d) for PaDiM).
    reg : float
        Ridge of the covariance; must be > 0 (``Sigma`` is singular without it when
        ``N <= d``).
    ddof : int, default=1
        Delta degrees of freedom of the covariance; ``N - ddof`` must be positive.

    Returns
    -------
    Tensor of shape (..., N, N)
        Lower-triangular factor in the dtype of ``centered``.

    Raises
    ------
    TypeError
        If ``centered`` is not a real tensor or ``reg`` not a number.
    ValueError
        If ``centered`` is not at least 2-D, has no samples or no features, holds NaN or
        infinity, if ``reg`` is not positive and finite (or ``reg * (N - ddof)`` beyond
        the dtype's range), if ``N - ddof <= 0``, or if ``K`` cannot be factorised.

    Notes
    -----
    Cost ``O(P * (N**2 * d + N**3 / 3))`` instead of ``O(P * (N * d**2 + d**3 / 3))`` for
    the d x d factor: the cheaper path when ``N < d``, as in PaDiM with few training images
    (Defard et al., 2021) and a wide backbone. Woodbury identity: M. A. Woodbury,
    "Inverting modified matrices", 1950. ``K`` is formed from ``Xc`` divided by an exact
    power of two per position (its largest entry to [0.5, 1)) and the factor scaled back,
    so no product overflows; float16 and bfloat16 are computed in float32.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import woodbury_factor
    >>> xc = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])  # N=2 samples, d=3
    >>> woodbury_factor(xc, reg=1.0)  # chol([[1 + 1, -1], [-1, 1 + 1]])
    tensor([[ 1.4142,  0.0000],
            [-0.7071,  1.2247]])
    """
    xc = as_float_tensor(centered, "centered")
    if xc.ndim < 2:
        raise ValueError(f"centered must be (..., N, d), got shape {tuple(xc.shape)}")
    if xc.shape[-1] == 0:
        raise ValueError(f"centered has 0 features (axis -1 of shape {tuple(xc.shape)}); "
                         "at least one is required")
    xc = xc.to(working_dtype(xc.dtype))
    check_finite(xc, "centered")
    reg = _check_reg(reg, positive=True)
    dof = xc.shape[-2] - ddof
    if dof <= 0 or xc.shape[-2] == 0:
        raise ValueError(f"centered has {xc.shape[-2]} sample(s) (axis -2); more than "
                         f"ddof={ddof} and at least one are required")
    if reg * dof > torch.finfo(xc.dtype).max:
        raise ValueError(f"reg * (N - ddof) = {reg * dof:g} exceeds the range of {xc.dtype}")
    # Xc = 2**g Xc_s (g per matrix, exact): K = 4**g (Xc_s Xc_s^T + reg dof 4**-g I)
    g = frexp_exponent(xc.abs().amax((-2, -1)))
    scaled = ldexp(xc, -g[..., None, None])
    ridge = ldexp(torch.full(g.shape, reg * dof, dtype=torch.float64, device=xc.device), -2 * g)
    factor, info = _cholesky_scaled(scaled @ scaled.mT, ridge)
    _check_info(info, (*xc.shape[:-1], xc.shape[-2]), f"with reg={reg:g}",
                "increase reg")
    factor = ldexp(factor, g[..., None, None])
    if not all_finite(factor):  # sqrt(|x_i|^2 + reg dof) itself beyond the range
        raise range_error("entries of the Woodbury factor", factor.dtype)
    return factor


def mahalanobis_woodbury(x, mean, centered, factor, reg, *, ddof=1, squared=False):
    """Compute Mahalanobis distances under ``Xc^T Xc / (N - ddof) + reg I`` at N x N cost.

    Gives the same distances as :func:`mahalanobis` with that covariance, without ever
    forming the d x d matrix: ``d^2 = (||v||^2 - ||L^{-1} Xc v||^2) / reg`` with
    ``v = x - mean`` and ``L`` from :func:`woodbury_factor`.

    Parameters
    ----------
    x : Tensor of shape (S..., B..., d)
        Query samples; the trailing dims must equal ``mean.shape``.
    mean : Tensor of shape (B..., d)
        Training means per position.
    centered : Tensor of shape (B..., N, d)
        Centred training samples per position (``X - mean``).
    factor : Tensor of shape (B..., N, N) or None
        ``woodbury_factor(centered, reg, ddof)``; computed here when None.
    reg : float
        The ridge of ``Sigma``, > 0; must be the value ``factor`` was built with.
    ddof : int, default=1
        Delta degrees of freedom; only used to compute ``factor`` when it is None.
    squared : bool, default=False
        Return squared distances.

    Returns
    -------
    Tensor of shape (S..., B...)
        Distances (squared if ``squared``), in the promoted dtype of the inputs (float32
        for half precision). Tiny negative squared distances from rounding are clamped
        to 0.

    Raises
    ------
    TypeError
        If an input is not a real tensor or ``reg`` not a number.
    ValueError
        If shapes do not match or ``mean`` has a zero-length axis, an input holds NaN or
        infinity, ``reg`` is not positive, ``factor`` is not lower-triangular with a
        positive diagonal, or the distances exceed the range of the dtype.

    Notes
    -----
    Per call, ``W = L^{-1} Xc`` (one batched triangular solve, ``O(P * N**2 * d)``, on
    ``L`` and ``Xc`` divided by a common exact power of two; every entry of ``W`` lies in
    [-1, 1]); then per query and position ``O(N * d)`` (the GEMM ``W v``) instead of
    ``O(d**2)``; memory ``O(P * N * (d + M))``. :class:`WoodburyGaussianScorer` keeps
    ``W`` for repeated scoring (the same kernel). The
    subtraction loses about ``log10(||v||^2 / (reg d^2))`` digits, harmless in float64 and
    for anomalous queries; use float64 when ``reg`` is tiny relative to the variance.
    Operands beyond ``2**+-30`` (float32) are brought to unit scale by exact powers of
    two as in :func:`mahalanobis`.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import mahalanobis, mahalanobis_woodbury
    >>> g = torch.Generator().manual_seed(0)
    >>> train = torch.randn(4, 10, generator=g, dtype=torch.float64)  # N=4 < d=10
    >>> mu = train.mean(0)
    >>> x = torch.randn(3, 10, generator=g, dtype=torch.float64)
    >>> fast = mahalanobis_woodbury(x, mu, train - mu, None, reg=0.1)
    >>> sigma = torch.cov(train.T) + 0.1 * torch.eye(10, dtype=torch.float64)
    >>> torch.allclose(fast, mahalanobis(x, mu, covariance=sigma))
    True
    """
    reg = _check_reg(reg, positive=True)
    xr, mr, shape, batch = _prepare(x, mean)
    d = mr.shape[-1]
    xc = as_float_tensor(centered, "centered")
    if xc.ndim != len(batch) + 2 or tuple(xc.shape[:-2]) != batch or xc.shape[-1] != d:
        raise ValueError(f"centered must have shape {(*batch, 'N', d)}, "
                         f"got {tuple(xc.shape)}")
    xc = xc.to(working_dtype(xc.dtype))
    n = xc.shape[-2]
    if factor is None:
        factor = woodbury_factor(xc, reg, ddof)
    else:
        check_finite(xc, "centered")
        factor = _check_factor(factor, batch, n, "factor", lower=True)
    dtype = torch.promote_types(torch.promote_types(xr.dtype, xc.dtype), factor.dtype)
    xr, mr = xr.to(dtype), mr.to(dtype)
    if xr.shape[0] == 0:
        return xr.new_zeros(shape)
    rows_t = _woodbury_rows(xc.reshape(-1, n, d).to(dtype),
                            factor.reshape(-1, n, n).to(dtype)).transpose(-2, -1).contiguous()
    rows_t = pad_aligned(pad_aligned(rows_t, dim=-1), dim=-2)  # as WoodburyGaussianScorer's
    exponents = (max_abs_exponent(xr), max_abs_exponent(mr), math.frexp(reg)[1])
    if _plain_is_safe(dtype, *exponents):
        d2 = _woodbury_quadratic((xr - mr).transpose(0, 1), rows_t, d) / reg
        if all_finite(d2):
            return _finish(d2, shape, squared)
    # Exact powers of two: v = 2**a v_s per position (``rows`` are bounded by 1 whatever
    # the scale); reg = f 4**r.
    common = max(exponents[:2])
    v = (ldexp(xr, -common) - ldexp(mr, -common)).transpose(0, 1)
    ev = _row_exponents(v)
    q = _woodbury_quadratic(ldexp(v, -ev[:, None, None]), rows_t, d)
    fraction, exponent = math.frexp(reg)
    if exponent % 2:
        fraction, exponent = fraction / 2, exponent + 1
    return _unscale(q / fraction, common + ev - exponent // 2, shape, squared)


def _woodbury_rows(centered: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``W = L^{-1} Xc`` (P, N, d) for centred samples (P, N, d) and factors L (P, N, N).

    ``W W^T = I - reg (N - ddof) K^{-1}`` has norm below 1, so every entry of ``W`` lies
    in [-1, 1] whatever the scale of the data; ``L`` and ``Xc`` are divided by the same
    exact power of two (bringing the largest entry of ``L`` to [0.5, 1)) before the one
    triangular solve, so nothing overflows on the way.
    """
    e = _row_exponents(factor)[:, None, None]
    return tril_inverse(ldexp(factor, -e)) @ ldexp(centered, -e)


def _woodbury_quadratic(v: torch.Tensor, rows_t: torch.Tensor, d: int | None = None
                        ) -> torch.Tensor:
    """(P, M) ``|v|^2 - |W v|^2`` (clamped at 0) for v (P, M, d), ``rows_t`` = W^T (P, d, N).

    ``W^T`` is stored transposed and contiguous, so that the products have no transposed
    operand: onnxruntime before 1.24 fuses such patterns of a float64 graph into its
    float-only ``FusedMatMul`` and then cannot run it.

    The one kernel of :func:`mahalanobis_woodbury` and :class:`WoodburyGaussianScorer`:
    two batched GEMMs, no solve (``W = L^{-1} Xc`` is precomputed by
    :func:`_woodbury_rows`). ``d`` and ``N`` are padded with zeros to aligned rows
    (:mod:`~skanomaly.functional._alignment`): each query's distance does not depend on
    its row in the products. With ``d`` given (the scorer's static width: traced code
    reads no shape), ``rows_t`` comes padded already (the scorer's ``W_padded``).
    """
    if d is None:
        d = v.shape[-1]
        rows_t = pad_aligned(pad_aligned(rows_t, dim=-1), dim=-2)
    v = pad_aligned(v, size=d)
    u = torch.matmul(v, rows_t)  # (P, M, N)
    # |v|^2 as a batched dot product, not v.square().sum(-1): with the latter,
    # onnxruntime < 1.24 rewrote the float64 graph into a float-only FusedMatMul.
    vv = torch.matmul(v.unsqueeze(-2), v.unsqueeze(-1))[..., 0, 0]
    return (vv - u.square().sum(-1)).clamp(min=0)


#: features x positions per block of the scorers' forward: a block of ``_BLOCK_FEATURES //
#: width`` positions (width = d, or max(d, N) for Woodbury) is centred and multiplied
#: while in cache. 64 positions of d = 100 measured 3x faster than one product over all
#: 784 positions (32 images, 2-core EPYC, float64); the blocks are fixed at construction.
_BLOCK_FEATURES = 2**13


def _check_mean(mean) -> torch.Tensor:
    mean = check_finite(as_float_tensor(mean, "mean"), "mean")
    if mean.ndim != 2 or 0 in mean.shape:
        raise ValueError(f"mean must be a (P, d) tensor of P >= 1 positions and d >= 1 "
                         f"features, got shape {tuple(mean.shape)} (one Gaussian: P = 1)")
    return mean.to(working_dtype(mean.dtype))


def _buffer(t: torch.Tensor, name: str, dtype, device) -> torch.Tensor:
    """A contiguous copy of ``t`` in ``dtype`` on ``device``; ``ValueError`` if it overflows."""
    out = t.to(device=device, dtype=dtype).contiguous().clone()
    if not all_finite(out):
        raise range_error(f"entries of {name}", dtype)
    return out


class _PositionBlocks(nn.Module):
    """Distances of (N, P, d) queries to P Gaussians, by fixed blocks of positions."""

    def __init__(self, n_positions: int, width: int, squared: bool):
        super().__init__()
        step = max(1, _BLOCK_FEATURES // max(1, width))
        self._blocks = [(p, min(p + step, n_positions)) for p in range(0, n_positions, step)]
        self.squared = bool(squared)

    @property
    def n_positions(self) -> int:
        """Number of Gaussians ``P``."""
        return self.mean.shape[0]

    @property
    def n_features(self) -> int:
        """Width ``d`` of the samples."""
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances of ``x`` to each position's Gaussian, unchecked.

        Parameters
        ----------
        x : Tensor of shape (N, P, d)
            Samples, one per position; cast to the buffers' dtype (any strides: a
            transposed view of feature maps works without a copy of the whole).

        Returns
        -------
        Tensor of shape (N, P)
            Distances (squared if ``squared``), in the buffers' dtype.
        """
        dtype = self.mean.dtype  # gathered and cast block by block: no full-size copy
        parts = [self._quadratic(x[:, start:stop].transpose(0, 1).contiguous().to(dtype)
                                 - self.mean[start:stop, None], start, stop)
                 for start, stop in self._blocks]
        d2 = (parts[0] if len(parts) == 1 else torch.cat(parts)).transpose(0, 1)
        return d2 if self.squared else d2.sqrt()

    def _quadratic(self, v, start: int, stop: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class GaussianScorer(_PositionBlocks):
    """One or many fitted Gaussians scoring by Mahalanobis distance (buffers only).

    Built once from the means and the precision Cholesky factors ``U``
    (``Sigma^{-1} = U U^T``, validated here), or from covariances or their Cholesky
    factors (:meth:`from_covariance`, :meth:`from_cholesky`: factorised here, once),
    its :meth:`forward` scores by matrix products only, without re-validation:
    ``d^2 = ||(x - mean) U||^2`` per position, the expression that
    :func:`mahalanobis` evaluates with ``precision_cholesky`` (same kernel, same
    bits on the same operands). One Gaussian is ``P = 1``; PaDiM has one per
    feature-map position. Traceable by :func:`torch.jit.trace` and exportable to
    ONNX (opset 17) with a dynamic number of samples, in float32 or float64.

    Parameters
    ----------
    mean : Tensor of shape (P, d)
        Means of the ``P`` Gaussians, finite.
    precision_cholesky : Tensor of shape (P, d, d)
        Upper-triangular ``U`` with a positive diagonal and ``U U^T`` the inverse
        covariance, as :func:`precision_cholesky` returns (scikit-learn's
        ``GaussianMixture.precisions_cholesky_`` convention).
    squared : bool, default=False
        Whether :meth:`forward` returns squared distances; fixed at construction.
    dtype : torch.dtype, optional
        dtype of the buffers and of the results; by default the promoted working
        dtype of ``mean`` and ``precision_cholesky`` (float16 and bfloat16 as float32).
    device : torch.device or str, optional
        Device of the buffers; by default that of ``mean``.

    Attributes
    ----------
    mean : Tensor of shape (P, d)
        Buffer: the means.
    U : Tensor of shape (P, d, d)
        The precision Cholesky factors: a view of ``U_padded`` (writing to it writes
        the buffer).
    U_padded : Tensor of shape (P, d_pad, d_pad)
        Buffer: ``U`` followed by zero rows and columns to ``d_pad``, the multiple of
        64 bytes of entries (8 in float64, 16 in float32) at or above ``d``: the
        right operand of the scoring product, whose left operand (the centred
        queries) is padded with zero columns to match, so that every query's row, in
        and out, starts at the same alignment and its distance does not depend on its
        row in the product (BLAS kernels take other paths for other alignments).
    squared : bool
        Whether distances are squared.
    n_positions, n_features : int
        ``P`` and ``d``.

    Raises
    ------
    TypeError
        If an argument is not a real tensor.
    ValueError
        If ``mean`` is not (P, d) with ``P, d >= 1``, ``precision_cholesky`` is not
        (P, d, d), not upper-triangular or has a non-positive diagonal, an input holds
        NaN or infinity, or the factor overflows ``dtype``.

    See Also
    --------
    mahalanobis : the validated function, with rescaling for extreme magnitudes.
    WoodburyGaussianScorer : the same distances at N x N cost when N <= d.

    Notes
    -----
    :meth:`forward` computes ``O(N P d**2)`` in blocks of ``2**13 // d`` positions
    (fixed at construction: centred and multiplied while in cache); each distance
    depends on its own sample alone. It does not validate ``x`` nor rescale:
    within ``2**+-30`` (float32; ``2**+-250`` in float64) of unit scale it gives the
    bits of :func:`mahalanobis`, which brings operands beyond that to unit scale by
    exact powers of two and raises where the distances overflow; the forward pass
    then returns ``inf`` instead. Precision factor rather than Cholesky factor: a
    triangular solve is not an ONNX operator, and a batched matrix product runs
    close to the GEMM peak.

    References
    ----------
    P. C. Mahalanobis, "On the generalised distance in statistics", 1936.
    T. Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
    Detection and Localization", ICPR Workshops 2020 (one Gaussian per position).

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import GaussianScorer, mahalanobis
    >>> cov = torch.tensor([[[4.0, 0.0], [0.0, 9.0]]], dtype=torch.float64)  # P = 1
    >>> scorer = GaussianScorer.from_covariance(torch.zeros(1, 2, dtype=torch.float64), cov)
    >>> x = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]], [[2.0, 3.0]]], dtype=torch.float64)
    >>> scorer(x)  # (N, P) = (3, 1)
    tensor([[1.0000],
            [1.0000],
            [1.4142]], dtype=torch.float64)
    >>> torch.equal(scorer(x)[:, 0], mahalanobis(x[:, 0], torch.zeros(2),
    ...                                          precision_cholesky=scorer.U[0]))
    True
    """

    def __init__(self, mean, precision_cholesky, *, squared=False, dtype=None, device=None):
        mean = _check_mean(mean)
        p, d = mean.shape
        upper = _check_factor(precision_cholesky, (p,), d, "precision_cholesky", lower=False)
        dtype = torch.promote_types(mean.dtype, upper.dtype) if dtype is None else dtype
        device = mean.device if device is None else torch.device(device)
        super().__init__(p, d, squared)
        self.register_buffer("mean", _buffer(mean, "mean", dtype, device))
        upper = _buffer(upper, "the precision factor", dtype, device)
        self.register_buffer("U_padded", pad_aligned(pad_aligned(upper, dim=-1), dim=-2))
        self._d = d  # static: traced code reads no shape

    @property
    def U(self) -> torch.Tensor:
        """The precision Cholesky factors (P, d, d): ``U_padded`` but its zeros."""
        return self.U_padded[:, : self._d, : self._d]

    def _apply(self, fn, recurse=True):
        # a cast re-pads to the aligned width of the new dtype (module docstring)
        super()._apply(fn, recurse)
        self.U_padded = realign(self.U_padded, (self._d, self._d))
        return self

    @classmethod
    def from_cholesky(cls, mean, cholesky, *, squared=False, dtype=None, device=None):
        """The scorer of Gaussians given by lower Cholesky factors ``L`` (``Sigma = L L^T``).

        ``U = L^{-T}`` by :func:`precision_cholesky`, in the working dtype of
        ``cholesky``, then cast to ``dtype``. Other arguments as the class.

        Examples
        --------
        >>> import torch
        >>> from skanomaly.functional import GaussianScorer
        >>> scorer = GaussianScorer.from_cholesky(torch.zeros(1, 2), 2 * torch.eye(2)[None])
        >>> scorer.U
        tensor([[[0.5000, 0.0000],
                 [0.0000, 0.5000]]])
        """
        mean = _check_mean(mean)
        p, d = mean.shape
        factor = as_float_tensor(cholesky, "cholesky")
        if tuple(factor.shape) != (p, d, d):
            raise ValueError(f"cholesky must have shape {(p, d, d)} to match mean, got "
                             f"{tuple(factor.shape)}")
        return cls(mean, precision_cholesky(factor), squared=squared, dtype=dtype,
                   device=device)

    @classmethod
    def from_covariance(cls, mean, covariance, reg=0.0, *, squared=False, dtype=None,
                        device=None):
        """The scorer of Gaussians with covariances ``covariance + reg * I``.

        Factorised once by :func:`regularized_cholesky` (which validates symmetry and
        definiteness) and :func:`precision_cholesky`, in the working dtype of
        ``covariance``. Other arguments as the class.

        Examples
        --------
        >>> import torch
        >>> from skanomaly.functional import GaussianScorer
        >>> scorer = GaussianScorer.from_covariance(torch.zeros(3, 2), torch.zeros(3, 2, 2),
        ...                                         reg=0.25, squared=True)
        >>> scorer(torch.ones(4, 3, 2)).shape, float(scorer(torch.ones(1, 3, 2))[0, 0])
        (torch.Size([4, 3]), 8.0)
        """
        mean = _check_mean(mean)
        p, d = mean.shape
        cov = as_float_tensor(covariance, "covariance")
        if tuple(cov.shape) != (p, d, d):
            raise ValueError(f"covariance must have shape {(p, d, d)} to match mean, got "
                             f"{tuple(cov.shape)}")
        return cls.from_cholesky(mean, regularized_cholesky(cov, reg), squared=squared,
                                 dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"n_positions={self.n_positions}, n_features={self.n_features}, "
                f"squared={self.squared}, dtype={self.mean.dtype}")

    def _quadratic(self, v, start: int, stop: int) -> torch.Tensor:
        return _precision_quadratic(v, self.U_padded[start:stop], self._d)


class WoodburyGaussianScorer(_PositionBlocks):
    """Gaussians of few samples (``Xc^T Xc / (N - ddof) + reg I``) scoring at N x N cost.

    The fitted-module form of :func:`mahalanobis_woodbury`: from each position's
    ``N`` centred training samples ``Xc`` and the Cholesky factor ``L`` of the
    Woodbury core ``K = reg (N - ddof) I + Xc Xc^T`` (:func:`woodbury_factor`), it
    stores ``W = L^{-1} Xc`` once, so that
    ``d^2 = (||v||^2 - ||W v||^2) / reg`` with ``v = x - mean`` takes two matrix
    products and no solve. The ``d x d`` covariance is never formed: the state is
    ``P N d`` numbers instead of ``P d**2``, the cheaper form when ``N <= d`` (PaDiM
    with few training images). Traceable and exportable to ONNX as
    :class:`GaussianScorer`.

    Parameters
    ----------
    mean : Tensor of shape (P, d)
        Training means per position.
    centered : Tensor of shape (P, N, d)
        Training samples minus ``mean``, per position.
    reg : float
        Ridge of the covariance, > 0.
    factor : Tensor of shape (P, N, N), optional
        ``woodbury_factor(centered, reg, ddof)`` if already computed (validated here:
        lower-triangular, positive diagonal); computed here when None.
    ddof : int, default=1
        Delta degrees of freedom of the covariance (used only to compute ``factor``).
    squared : bool, default=False
        Whether :meth:`forward` returns squared distances.
    dtype : torch.dtype, optional
        dtype of the buffers and results; by default the promoted working dtype of
        the inputs. ``W`` is computed in the inputs' working dtype, then cast.
    device : torch.device or str, optional
        Device of the buffers; by default that of ``mean``.

    Attributes
    ----------
    mean : Tensor of shape (P, d)
        Buffer: the means.
    W : Tensor of shape (P, d, N)
        ``(L^{-1} Xc)^T``, stored transposed (see ``_woodbury_quadratic``); every
        entry lies in [-1, 1] (``W^T W <= I``). A view of ``W_padded``.
    W_padded : Tensor of shape (P, d_pad, N_pad)
        Buffer: ``W`` followed by zero rows to ``d_pad`` and zero columns to the
        aligned ``N_pad``, as :attr:`GaussianScorer.U_padded` (aligned rows of the
        scoring products).
    reg : Tensor of shape ()
        Buffer: the ridge.
    squared : bool
        Whether distances are squared.
    n_positions, n_features : int
        ``P`` and ``d``.
    n_samples : int
        ``N``, the training samples per position.

    Raises
    ------
    TypeError
        If an argument is not a real tensor or ``reg`` not a number.
    ValueError
        If shapes do not match (``mean`` (P, d), ``centered`` (P, N, d), ``factor``
        (P, N, N)), an input holds NaN or infinity, ``reg`` is not positive and
        finite (or beyond ``dtype``'s range), ``factor`` is not a lower Cholesky factor
        or cannot be computed (see :func:`woodbury_factor`).

    See Also
    --------
    mahalanobis_woodbury : the validated function (same kernel).
    GaussianScorer : the d x d form.

    Notes
    -----
    Per sample and position ``O(N d)`` operations instead of ``O(d**2)``. The
    subtraction loses about ``log10(||v||^2 / (reg d^2))`` digits (harmless in
    float64; in float32 keep ``reg`` near the variances). Woodbury identity:
    M. A. Woodbury, "Inverting modified matrices", 1950.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import WoodburyGaussianScorer, mahalanobis
    >>> g = torch.Generator().manual_seed(0)
    >>> train = torch.randn(4, 10, generator=g, dtype=torch.float64)  # N=4 < d=10
    >>> mu = train.mean(0, keepdim=True)  # P = 1
    >>> scorer = WoodburyGaussianScorer(mu, (train - mu)[None], reg=0.1)
    >>> x = torch.randn(3, 1, 10, generator=g, dtype=torch.float64)
    >>> sigma = torch.cov(train.T) + 0.1 * torch.eye(10, dtype=torch.float64)
    >>> torch.allclose(scorer(x)[:, 0], mahalanobis(x[:, 0], mu[0], covariance=sigma))
    True
    """

    def __init__(self, mean, centered, reg, *, factor=None, ddof=1, squared=False,
                 dtype=None, device=None):
        reg = _check_reg(reg, positive=True)
        mean = _check_mean(mean)
        p, d = mean.shape
        xc = check_finite(as_float_tensor(centered, "centered"), "centered")
        if xc.ndim != 3 or xc.shape[0] != p or xc.shape[2] != d:
            raise ValueError(f"centered must have shape ({p}, N, {d}) to match mean, got "
                             f"{tuple(xc.shape)}")
        xc = xc.to(working_dtype(xc.dtype))
        n = xc.shape[1]
        if factor is None:
            factor = woodbury_factor(xc, reg, ddof)
        else:
            factor = _check_factor(factor, (p,), n, "factor", lower=True)
        work = torch.promote_types(xc.dtype, factor.dtype)
        rows = _woodbury_rows(xc.to(work), factor.to(work))
        dtype = torch.promote_types(mean.dtype, work) if dtype is None else dtype
        if reg > torch.finfo(dtype).max:
            raise ValueError(f"reg={reg:g} exceeds the range of {dtype}")
        device = mean.device if device is None else torch.device(device)
        super().__init__(p, max(d, n), squared)
        self.register_buffer("mean", _buffer(mean, "mean", dtype, device))
        w_t = _buffer(rows.transpose(-2, -1).contiguous(), "W", dtype, device)
        self.register_buffer("W_padded", pad_aligned(pad_aligned(w_t, dim=-1), dim=-2))
        self._d, self.n_samples = d, n  # static: traced code reads no shape
        self.register_buffer("reg", torch.tensor(reg, dtype=dtype, device=device))

    @property
    def W(self) -> torch.Tensor:
        """``W^T`` (P, d, N): the rows of ``W_padded`` but its zeros."""
        return self.W_padded[:, : self._d, : self.n_samples]

    def _apply(self, fn, recurse=True):
        # a cast re-pads to the aligned width of the new dtype (see GaussianScorer)
        super()._apply(fn, recurse)
        self.W_padded = realign(self.W_padded, (self._d, self.n_samples))
        return self

    def extra_repr(self) -> str:
        return (f"n_positions={self.n_positions}, n_features={self.n_features}, "
                f"n_samples={self.n_samples}, squared={self.squared}, "
                f"dtype={self.mean.dtype}")

    def _quadratic(self, v, start: int, stop: int) -> torch.Tensor:
        return _woodbury_quadratic(v, self.W_padded[start:stop], self._d) / self.reg
