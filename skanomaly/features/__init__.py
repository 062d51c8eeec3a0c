"""Backbone feature extraction as a scikit-learn transformer (torchvision and timm
imported lazily), and pretrained weights that ship in an installed package."""

from .extractor import FeatureExtractor
from .pretrained import (
    EFFICIENTNET_LITE0_IMAGENET,
    EFFICIENTNET_LITE1_IMAGENET,
    EFFICIENTNET_LITE2_IMAGENET,
    PACKAGED_WEIGHTS,
    PackagedWeights,
)

__all__ = ["FeatureExtractor", "EFFICIENTNET_LITE0_IMAGENET", "EFFICIENTNET_LITE1_IMAGENET",
           "EFFICIENTNET_LITE2_IMAGENET", "PACKAGED_WEIGHTS", "PackagedWeights"]
