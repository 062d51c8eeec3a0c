"""A threshold that holds on unseen data: after ``fit(X_normal)``, ``predict`` flags about
``contamination`` of NEW normal samples, for every detector, on bundled real data.

The reference is the definition itself: the share of held-out normal samples (never
seen in ``fit``) predicted -1, against the ``contamination`` asked for.
"""

import warnings

import numpy as np
import pytest
import torch
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
    calibrate,
)
from skanomaly.datasets import load_shuttle, load_textures

CONTAMINATIONS = (0.05, 0.1, 0.2)
TOLERANCE = 0.1  # the bound: flagged share within contamination +- 0.1


def _detectors(contamination):
    common = dict(contamination=contamination, device="cpu")
    return {
        "gaussian": GaussianDetector(**common),
        "padim": PaDiMDetector(random_state=0, **common),
        "patchcore": PatchCoreDetector(random_state=0, **common),
        "dfm": DFMDetector(**common),
        "dfkde": DFKDEDetector(random_state=0, **common),
    }


@pytest.fixture(scope="module")
def shuttle():
    data = load_shuttle()
    normals = data.X_test[data.y_test == 1]
    scaler = StandardScaler().fit(data.X_train)
    # 1,000 normals to fit on, 2,000 unseen normals from the held-out half
    return scaler.transform(data.X_train[:1000]), scaler.transform(normals[:2000])


@pytest.fixture(scope="module")
def brick_features():
    from skanomaly.features import FeatureExtractor

    data = load_textures("brick", n_train=200, n_test=1, image_size=64, random_state=0)
    extractor = FeatureExtractor("resnet18", weights=None, random_state=0, device="cpu")
    with torch.inference_mode():
        features = extractor.fit_transform(data.X_train)
    # 120 crops to fit on, 80 unseen crops of the same (top) half of the texture
    return features[:120], features[120:]


@pytest.mark.slow
@pytest.mark.parametrize("contamination", CONTAMINATIONS)
@pytest.mark.parametrize("name", ["gaussian", "padim", "patchcore", "dfm", "dfkde"])
@pytest.mark.parametrize("dataset", ["shuttle", "brick_features"])
def test_unseen_normals_are_flagged_at_contamination(dataset, name, contamination, request):
    X_fit, X_new = request.getfixturevalue(dataset)
    if name == "gaussian" and X_fit.ndim == 4:  # one Gaussian over pooled feature vectors
        X_fit, X_new = X_fit.mean(axis=(2, 3)), X_new.mean(axis=(2, 3))
    detector = _detectors(contamination)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to in-sample scores
        detector.fit(X_fit)
    assert detector.calibration_ != "in-sample"
    flagged = float(np.mean(detector.predict(X_new) == -1))
    assert abs(flagged - contamination) <= TOLERANCE, (
        f"{name} on {dataset}: {flagged:.3f} of unseen normals flagged at "
        f"contamination={contamination} ({detector.calibration_})")


@pytest.mark.parametrize("name", ["gaussian", "padim", "patchcore", "dfm", "dfkde"])
def test_calibrate_sets_the_quantile_of_held_out_scores(name):
    rng = np.random.default_rng(0)
    X, X_held = rng.normal(size=(60, 4)), rng.normal(size=(40, 4))
    detector = _detectors(0.2)[name].fit(X)
    fitted_offset = detector.offset_
    assert detector.calibrate(X_held) is detector
    assert detector.calibration_ == "held-out"
    assert detector.offset_ == np.percentile(detector.score_samples(X_held), 20)
    assert np.mean(detector.predict(X_held) == -1) == pytest.approx(0.2, abs=1 / 40)
    assert detector.offset_ != fitted_offset


def test_calibrate_through_a_pipeline_transforms_first():
    rng = np.random.default_rng(1)
    X, X_held = rng.normal(5.0, 3.0, size=(80, 3)), rng.normal(5.0, 3.0, size=(50, 3))
    model = make_pipeline(StandardScaler(), GaussianDetector(device="cpu")).fit(X)
    assert calibrate(model, X_held) is model
    expected = np.percentile(model[-1].score_samples(model[0].transform(X_held)), 10)
    assert model[-1].offset_ == expected
    np.testing.assert_array_equal(model.decision_function(X_held),
                                  model.score_samples(X_held) - expected)


def test_calibrate_rejects_what_it_cannot_calibrate():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(TypeError, match="skanomaly detector"):
        calibrate(make_pipeline(StandardScaler()), np.zeros((3, 2)))
    with pytest.raises(NotFittedError):
        calibrate(GaussianDetector(), np.zeros((3, 2)))
    detector = GaussianDetector(device="cpu").fit(np.random.default_rng(0).normal(size=(20, 2)))
    with pytest.raises(ValueError, match="features"):
        detector.calibrate(np.zeros((3, 5)))


def test_too_few_samples_fall_back_to_in_sample_with_a_warning():
    X = np.random.default_rng(0).normal(size=(6, 2, 2, 2))
    with pytest.warns(UserWarning, match="in-sample"):
        detector = DFMDetector(device="cpu").fit(X)
    assert detector.calibration_ == "in-sample"


@pytest.mark.parametrize("name", ["gaussian", "padim", "patchcore", "dfm", "dfkde"])
def test_a_failed_fit_leaves_the_detector_unfitted(name):
    from sklearn.exceptions import NotFittedError

    rng = np.random.default_rng(0)
    detector = _detectors(0.1)[name].fit(rng.normal(size=(40, 3)))
    bad = rng.normal(size=(40, 4))
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detector.fit(bad)
    assert not any(k.endswith("_") and not k.startswith("__") for k in vars(detector))
    with pytest.raises(NotFittedError):
        detector.predict(rng.normal(size=(2, 3)))
