"""skanomaly: scikit-learn-compatible anomaly detectors on PyTorch kernels.

Detectors follow scikit-learn's outlier-detection contract: ``score_samples``
is higher for more normal samples, ``decision_function`` is negative for
outliers and ``predict`` returns +1 (inlier) / -1 (outlier). Feature
extraction (:class:`skanomaly.features.FeatureExtractor`) needs torchvision and
imports it only when used. :class:`AnomalyPipeline` is a scikit-learn ``Pipeline``
that reaches its detector's anomaly maps; :func:`to_torch` (from
:mod:`skanomaly.export`, which also writes ONNX and TorchScript files) turns a fitted
detector or pipeline into one torch module.
"""

from .base import calibrate, pvalues
from .detectors import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)
from .export import to_torch
from ._version import __version__
from .pipeline import AnomalyPipeline, make_anomaly_pipeline

__all__ = [
    "GaussianDetector",
    "PaDiMDetector",
    "PatchCoreDetector",
    "DFMDetector",
    "DFKDEDetector",
    "FeatureExtractor",
    "calibrate",
    "pvalues",
    "AnomalyPipeline",
    "make_anomaly_pipeline",
    "to_torch",
    "__version__",
]


def __getattr__(name):
    # FeatureExtractor lives in skanomaly.features, which needs torchvision only when
    # fitted; importing it lazily keeps ``import skanomaly`` light.
    if name == "FeatureExtractor":
        from .features import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'skanomaly' has no attribute {name!r}")
