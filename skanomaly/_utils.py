"""What :mod:`skanomaly.base` and :mod:`skanomaly._dask` both need, below both.

:func:`make_generator` (seeding), :class:`CalibrationWarning` and
:func:`user_stacklevel` (warnings that point at the user's code) live here so that
``_dask`` does not import ``base`` back. ``make_generator`` and ``CalibrationWarning``
are public as ``skanomaly.base.make_generator`` and ``skanomaly.base.CalibrationWarning``.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch
from sklearn.utils import check_random_state

__all__ = ["CalibrationWarning", "make_generator", "user_stacklevel"]


def make_generator(random_state, device="cpu") -> torch.Generator:
    """Build a local :class:`torch.Generator` from a scikit-learn ``random_state``.

    Parameters
    ----------
    random_state : int, numpy.random.RandomState or None
        ``None`` seeds from fresh OS entropy (results vary between calls); an
        int gives reproducible draws; a ``RandomState`` instance supplies the
        seed by one draw of its own. The global RNGs of Python, numpy and torch
        are never read nor advanced.
    device : str or torch.device, default="cpu"
        Device of the generator (it must match the tensors it draws).

    Returns
    -------
    torch.Generator
        A seeded generator.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.base import make_generator
    >>> a = torch.rand(3, generator=make_generator(0))
    >>> b = torch.rand(3, generator=make_generator(0))
    >>> bool(torch.equal(a, b))
    True
    """
    gen = torch.Generator(device=device)
    if random_state is None:
        gen.seed()
    elif isinstance(random_state, Integral):
        gen.manual_seed(int(random_state))
    else:
        rs = check_random_state(random_state)
        gen.manual_seed(int(rs.randint(np.iinfo(np.int32).max)))
    return gen


class CalibrationWarning(UserWarning):
    """``fit`` could not take out-of-sample scores: ``offset_`` comes from in-sample ones.

    In-sample scores are optimistic, so ``predict`` may then flag more than
    ``contamination`` of new normal samples; :meth:`BaseDetector.calibrate` with held-out
    normal samples fixes the threshold. ``reason`` says why the fallback happened.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from skanomaly import DFMDetector
    >>> from skanomaly.base import CalibrationWarning
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     det = DFMDetector(device="cpu").fit(np.random.default_rng(0).normal(size=(4, 3)))
    >>> [issubclass(w.category, CalibrationWarning) for w in caught], det.calibration_
    ([True], 'in-sample')
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def user_stacklevel() -> int:
    """Stack level of the first frame outside skanomaly and scikit-learn (for warnings)."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(here) or f"{os.sep}sklearn{os.sep}" in name):
            return level
        frame, level = frame.f_back, level + 1
    return level
