"""Input checks and exact rescaling shared by the torch kernels.

Torch only: no numpy, no sklearn.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

__all__ = [
    "as_float_tensor",
    "check_finite",
    "check_ndim",
    "check_min_samples",
    "check_nonempty",
    "check_positive_int",
    "frexp_exponent",
    "ldexp",
    "max_abs_exponent",
    "working_dtype",
]


def as_float_tensor(x, name: str = "x", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a floating-point tensor without copying when possible.

    Integer and boolean tensors are promoted to ``torch.get_default_dtype()``
    (or ``dtype`` when given); floating tensors keep their dtype and device.
    Non-tensors raise ``TypeError``: kernels take tensors, estimators convert.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtype is not None:
        return x.to(dtype)
    if x.is_complex():
        raise TypeError(f"{name} must be real, got complex dtype {x.dtype}")
    if not x.is_floating_point():
        return x.to(torch.get_default_dtype())
    return x


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite (True for integer and empty tensors).

    A finite sum proves every entry finite, without a full-size boolean temporary;
    an infinite one may be mere overflow, so only then is each entry checked.
    """
    if not (x.is_floating_point() and x.numel()):
        return True
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or infinity."""
    if not all_finite(x):
        kind = "NaN" if bool(torch.isnan(x).any()) else "infinity"
        raise ValueError(f"{name} contains {kind}; anomaly detectors need finite input")
    return x


def check_ndim(x: torch.Tensor, ndims, name: str = "x") -> torch.Tensor:
    """Raise ``ValueError`` unless ``x.ndim`` is one of ``ndims`` (an int or a tuple)."""
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if x.ndim not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise ValueError(f"{name} must be {want}-D, got {x.ndim}-D with shape {tuple(x.shape)}")
    return x


def check_min_samples(n: int, minimum: int, name: str = "x") -> None:
    """Raise ``ValueError`` if ``n`` samples are fewer than ``minimum``."""
    if n < minimum:
        raise ValueError(f"{name} has {n} sample(s); at least {minimum} are required")


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int; ``TypeError`` unless integral, ``ValueError`` unless >= 1."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def range_error(what: str, dtype: torch.dtype) -> ValueError:
    """The ``ValueError`` for results beyond the range of ``dtype``, with the right advice."""
    advice = ("rescale the data" if dtype == torch.float64 else
              "use float64 input or rescale the data")
    return ValueError(f"{what} exceed the range of {dtype} (largest "
                      f"{torch.finfo(dtype).max:.3g}); {advice}")


def check_nonempty(x: torch.Tensor, name: str = "x", axes=None) -> torch.Tensor:
    """Raise ``ValueError`` naming the first of ``axes`` (default: all) that has length 0."""
    for axis in range(x.ndim) if axes is None else axes:
        if x.shape[axis] == 0:
            raise ValueError(f"{name} has length 0 along axis {axis % x.ndim} (shape "
                             f"{tuple(x.shape)}); at least one entry is required")
    return x


# --------------------------------------------------------------------------- exact rescaling

def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are computed in float32; float32 and float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact ``2.0 ** exponent`` (int64 tensor within the normal range) built from bits."""
    if dtype == torch.float64:
        return ((exponent + 1023) << 52).view(torch.float64)
    if dtype == torch.float32:
        return ((exponent + 127).to(torch.int32) << 23).view(torch.float32)
    return torch.pow(2.0, exponent.to(dtype))  # half types: exact within their range


def ldexp(x: torch.Tensor, exponent) -> torch.Tensor:
    """``x * 2**exponent``, a new tensor, exact unless the result over- or underflows.

    ``exponent`` is an int or an int64 tensor broadcastable to ``x``; the product is
    taken in steps whose factors are normal numbers, so an exponent beyond the range
    of a single factor (e.g. ``2**-148`` for float32) still scales exactly.
    """
    limit = {torch.float64: 1000, torch.float32: 120}.get(x.dtype, 14)
    if isinstance(exponent, int):
        if exponent == 0:
            return x.clone()
        while exponent:
            step = max(-limit, min(limit, exponent))
            x = x * math.ldexp(1.0, step)
            exponent -= step
        return x
    exponent = exponent.to(device=x.device, dtype=torch.int64)
    first = True
    while first or bool((exponent != 0).any()):
        step = exponent.clamp(-limit, limit)
        x = x * _pow2(step, x.dtype)
        exponent = exponent - step
        first = False
    return x


def ldexp_(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """In-place :func:`ldexp`: ``x *= 2**exponent`` exactly, returning ``x``.

    ``exponent`` is an int64 tensor broadcastable to ``x``. Where every exponent is 0
    (data at unit scale: the common case) ``x`` is left untouched, without a pass over it.
    """
    exponent = exponent.to(device=x.device, dtype=torch.int64)
    limit = {torch.float64: 1000, torch.float32: 120}.get(x.dtype, 14)
    while bool((exponent != 0).any()):
        step = exponent.clamp(-limit, limit)
        x.mul_(_pow2(step, x.dtype))
        exponent = exponent - step
    return x


def frexp_exponent(peak: torch.Tensor) -> torch.Tensor:
    """frexp exponent ``e`` of ``peak`` (``peak = f * 2**e``, ``0.5 <= f < 1``; 0 for 0), int64.

    Computed on the CPU for devices without ``torch.frexp`` (``peak`` is small: a
    maximum per row or per matrix).
    """
    try:
        return torch.frexp(peak).exponent.to(torch.int64)
    except (NotImplementedError, RuntimeError):
        return torch.frexp(peak.cpu()).exponent.to(device=peak.device, dtype=torch.int64)


def max_abs_exponent(x: torch.Tensor) -> int:
    """frexp exponent of the largest ``|x|`` (0 for an empty or all-zero ``x``).

    ``ldexp(x, -max_abs_exponent(x))`` then has its largest entry in [0.5, 1): squares
    and products of a few thousand entries neither overflow nor lose bits to underflow.
    """
    if x.numel() == 0:
        return 0
    return int(frexp_exponent(x.abs().amax()))
