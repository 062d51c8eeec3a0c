"""The detectors: thin estimators over :mod:`skanomaly.functional`."""

from .dfkde import DFKDEDetector
from .dfm import DFMDetector
from .gaussian import GaussianDetector
from .padim import PaDiMDetector
from .patchcore import PatchCoreDetector

__all__ = [
    "GaussianDetector",
    "PaDiMDetector",
    "PatchCoreDetector",
    "DFMDetector",
    "DFKDEDetector",
]
