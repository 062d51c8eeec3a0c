"""Backbone feature extraction as a scikit-learn transformer (torchvision imported lazily)."""

from .extractor import FeatureExtractor

__all__ = ["FeatureExtractor"]
