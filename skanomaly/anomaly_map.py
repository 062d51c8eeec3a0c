"""Anomaly-map post-processing shared by every spatial detector.

One implementation of anomalib's ``AnomalyMapGenerator`` step: per-position
scores are upsampled bilinearly to the image size and blurred with a Gaussian
(sigma 4 pixels, kernel radius ``int(4 * sigma + 0.5)``).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from .functional import gaussian_blur2d, upsample_bilinear

__all__ = ["postprocess_anomaly_map"]


def postprocess_anomaly_map(maps: torch.Tensor, output_size, sigma: float = 4.0) -> torch.Tensor:
    """Upsample per-position anomaly scores to the image grid and blur them.

    Parameters
    ----------
    maps : torch.Tensor of shape (n_samples, H, W)
        Per-position anomaly scores (higher = more anomalous), any real dtype (integer
        and boolean maps are promoted to the default float dtype). Not modified.
    output_size : int or (int, int)
        Output (height, width) in pixels; an int means a square image.
    sigma : float, default=4.0
        Standard deviation of the Gaussian blur, in output pixels; 0 skips the blur.

    Returns
    -------
    torch.Tensor of shape (n_samples, height, width)
        Same dtype and device as ``maps`` (the promoted float dtype for integer
        maps). Finite for any finite maps: both steps are convex combinations.

    Raises
    ------
    TypeError
        If ``maps`` is not a tensor, or ``sigma`` is not a real number.
    ValueError
        If ``maps`` is not 3-D, has an empty spatial axis or holds NaN or infinity,
        ``output_size`` is not one or two positive integers, or ``sigma`` is
        negative, not finite or so large that the kernel radius exceeds 2**24
        pixels.

    References
    ----------
    Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
    Detection and Localization", ICPR 2020; anomalib's ``AnomalyMapGenerator``.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.anomaly_map import postprocess_anomaly_map
    >>> postprocess_anomaly_map(torch.rand(2, 7, 7), 28).shape
    torch.Size([2, 28, 28])
    """
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be a torch.Tensor, got {type(maps).__name__}")
    if maps.ndim != 3:
        raise ValueError(f"maps must be 3-D (n_samples, H, W), got shape {tuple(maps.shape)}")
    if isinstance(output_size, Integral):
        size = (output_size, output_size)
    else:
        try:
            size = tuple(output_size)
        except TypeError:
            raise TypeError("output_size must be an int or a pair (height, width), got "
                            f"{output_size!r}") from None
    if len(size) != 2 or not all(isinstance(s, Integral) and not isinstance(s, bool)
                                 and s > 0 for s in size):
        raise ValueError(f"output_size must be a positive int or (height, width), got {output_size!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, Real):
        raise TypeError(f"sigma must be a real number, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    out = upsample_bilinear(maps, tuple(int(s) for s in size))
    if sigma > 0:
        out = gaussian_blur2d(out, sigma)
    return out
