"""Images end to end: FeatureExtractor + a spatial detector in one scikit-learn Pipeline.

The reference is the same two steps run by hand (transform, then fit and score on the
features), so the pipeline must neither change nor reorder what flows between them.
The backbone is a randomly initialised resnet18: no weights can be downloaded here.
"""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from skanomaly import DFMDetector, PaDiMDetector, PatchCoreDetector
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor
from skanomaly.metrics import image_auroc

pytest.importorskip("torchvision")

SPATIAL = [
    PaDiMDetector(n_features=50, random_state=0),
    PatchCoreDetector(coreset_sampling_ratio=0.25, random_state=0),
    DFMDetector(),
]


@pytest.fixture(scope="module")
def textures():
    return load_textures("brick", n_train=12, n_test=10, image_size=32, random_state=0)


@pytest.mark.parametrize("detector", SPATIAL, ids=lambda d: type(d).__name__)
def test_pipeline_equals_the_two_steps_by_hand(detector, textures):
    extractor = FeatureExtractor("resnet18", weights=None, random_state=0, device="cpu")
    X_train, X_test = textures.X_train, textures.X_test
    X_train_copy = X_train.copy()

    model = make_pipeline(clone(extractor), clone(detector)).fit(X_train)
    scores = model.score_samples(X_test)
    labels = model.predict(X_test)

    features = clone(extractor).fit(X_train)
    by_hand = clone(detector).fit(features.transform(X_train))
    np.testing.assert_allclose(scores, by_hand.score_samples(features.transform(X_test)))
    np.testing.assert_array_equal(X_train, X_train_copy)

    assert scores.shape == (len(X_test),) and scores.dtype == np.float64
    assert set(np.unique(labels)) <= {-1, 1}
    # Pixel-level map through the pipeline's last step, at the image size.
    maps = model[-1].anomaly_map(model[0].transform(X_test), output_size=32)
    assert maps.shape == (len(X_test), 32, 32) and np.isfinite(maps).all()


def test_padim_on_random_backbone_separates_synthetic_defects(textures):
    # A random backbone is a weak feature extractor, yet pasted patches and colour
    # blotches on brick stand out: the bundled main job's quality table shows ~0.98.
    model = make_pipeline(
        FeatureExtractor("resnet18", weights=None, random_state=0, device="cpu"),
        PaDiMDetector(n_features=100, random_state=0),
    ).fit(textures.X_train)
    auroc = image_auroc(textures.y_test, -model.score_samples(textures.X_test))
    assert auroc > 0.7
