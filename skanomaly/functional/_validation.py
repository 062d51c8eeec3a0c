"""Input checks shared by the torch kernels (torch only: no numpy, no sklearn)."""

from __future__ import annotations

from numbers import Integral

import torch

__all__ = [
    "as_float_tensor",
    "check_finite",
    "check_ndim",
    "check_min_samples",
    "check_positive_int",
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
