"""A threshold that holds on unseen data: after ``fit(X_normal)``, ``predict`` flags about
``contamination`` of NEW normal samples, for every detector, on bundled real data.

The reference is the definition itself: the share of held-out normal samples (never
seen in ``fit``) predicted -1, against the ``contamination`` asked for.
"""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
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
def test_calibrate_sets_the_conformal_quantile_of_held_out_scores(name):
    rng = np.random.default_rng(0)
    X, X_held = rng.normal(size=(60, 4)), rng.normal(size=(40, 4))
    detector = _detectors(0.2)[name].fit(X)
    fitted_offset = detector.offset_
    assert detector.calibrate(X_held) is detector
    assert detector.calibration_ == "held-out"
    # conformal rank by hand: ceil((1 - 0.2) * (40 + 1)) = ceil(32.8) = 33
    anomaly = -detector.score_samples(X_held)
    assert detector.offset_ == -np.sort(anomaly)[33 - 1]
    assert np.sum(detector.predict(X_held) == -1) == 40 - 33  # those beyond the 33rd
    np.testing.assert_array_equal(detector.calibration_scores_, np.sort(-anomaly))
    assert detector.offset_ != fitted_offset


def test_calibrate_through_a_pipeline_transforms_first():
    rng = np.random.default_rng(1)
    X, X_held = rng.normal(5.0, 3.0, size=(80, 3)), rng.normal(5.0, 3.0, size=(50, 3))
    model = make_pipeline(StandardScaler(), GaussianDetector(device="cpu")).fit(X)
    assert calibrate(model, X_held) is model
    # ceil(0.9 * 51) = 46: the 46th smallest anomaly score is the 5th smallest normality
    expected = np.sort(model[-1].score_samples(model[0].transform(X_held)))[50 - 46]
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


# ------------------------------------------------------------------ conformal
@pytest.mark.parametrize("n, alpha, rank", [(9, 0.1, 9), (19, 0.05, 19), (99, 0.01, 99),
                                            (99, 0.1, 90), (40, 0.2, 33), (10, 0.1, 10),
                                            (29, 0.3, 21), (8, 0.1, 9)])
def test_conformal_rank_is_exact_for_decimal_levels(n, alpha, rank):
    from skanomaly.base import _conformal_rank

    # by hand: ceil((1 - alpha)(n + 1)); (1 - 0.3) * 30 = 21.000000000000004 in floats
    assert _conformal_rank(n, alpha) == rank


def _brute_pvalues(calibration_scores, scores):
    """The definition: (1 + #{calibration scores at most as normal}) / (n + 1)."""
    return np.array([(1 + np.sum(calibration_scores <= s)) / (len(calibration_scores) + 1)
                     for s in scores])


@pytest.mark.parametrize("name", ["gaussian", "padim", "patchcore", "dfm", "dfkde"])
def test_pvalues_are_the_conformal_definition(name):
    rng = np.random.default_rng(2)
    X, X_held, X_new = (rng.normal(size=(n, 4)) for n in (60, 49, 300))
    detector = _detectors(0.1)[name].fit(X)
    with pytest.raises(NotFittedError, match="calibrate"):
        detector.pvalues(X_new)
    detector.calibrate(X_held)
    p = detector.pvalues(X_new)
    expected = _brute_pvalues(detector.score_samples(X_held), detector.score_samples(X_new))
    np.testing.assert_array_equal(p, expected)
    assert p.dtype == np.float64 and p.shape == (300,)
    assert p.min() >= 1 / 50 and p.max() <= 1.0
    held = detector.score_samples(X_held)
    np.testing.assert_array_equal(detector.pvalues(X_held), _brute_pvalues(held, held))
    if len(np.unique(held)) == len(held):  # without ties: flagged where p <= contamination
        np.testing.assert_array_equal(detector.predict(X_new) == -1, p <= 0.1)


def test_pvalues_need_a_current_calibration():
    rng = np.random.default_rng(3)
    det = GaussianDetector(device="cpu").fit(rng.normal(size=(50, 3)))
    det.calibrate(rng.normal(size=(30, 3)))
    det.pvalues(rng.normal(size=(2, 3)))
    det.partial_fit(rng.normal(size=(20, 3)))  # the model changed: the scores are stale
    assert not hasattr(det, "calibration_scores_")
    with pytest.raises(NotFittedError, match="calibrate"):
        det.pvalues(rng.normal(size=(2, 3)))
    det.calibrate(rng.normal(size=(30, 3)))
    det.fit(rng.normal(size=(50, 3)))
    assert not hasattr(det, "calibration_scores_")


def test_too_few_held_out_samples_are_a_clear_error():
    from skanomaly.base import conformal_min_samples

    rng = np.random.default_rng(4)
    det = GaussianDetector(contamination=0.1, device="cpu").fit(rng.normal(size=(50, 2)))
    offset = det.offset_
    # ceil(0.9 * 9) = 9 > 8 samples: no threshold keeps the rate at 0.1
    with pytest.raises(ValueError, match="8 held-out sample.*at least 9"):
        det.calibrate(rng.normal(size=(8, 2)))
    assert det.offset_ == offset and det.calibration_ != "held-out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.calibrate(rng.normal(size=(9, 2)))  # k = 9 <= n: the largest anomaly score
    assert np.isfinite(det.offset_)
    # by hand: the smallest n with ceil((1 - a)(n + 1)) <= n
    for alpha in (0.5, 0.3, 0.2, 0.1, 0.05, 0.01, 0.003):
        smallest = next(n for n in range(1, 10**4)
                        if np.ceil(round((1 - alpha) * (n + 1), 9)) <= n)
        assert conformal_min_samples(alpha) == smallest


def test_pvalues_through_pipelines():
    from skanomaly import make_anomaly_pipeline, pvalues

    rng = np.random.default_rng(5)
    X, X_held, X_new = (rng.normal(3.0, 2.0, size=(n, 3)) for n in (80, 39, 20))
    plain = make_pipeline(StandardScaler(), GaussianDetector(device="cpu")).fit(X)
    calibrate(plain, X_held)
    expected = _brute_pvalues(plain.score_samples(X_held), plain.score_samples(X_new))
    np.testing.assert_array_equal(pvalues(plain, X_new), expected)
    anomaly = make_anomaly_pipeline(StandardScaler(), GaussianDetector(device="cpu")).fit(X)
    np.testing.assert_array_equal(anomaly.calibrate(X_held).pvalues(X_new), expected)
    with pytest.raises(TypeError, match="skanomaly detector"):
        pvalues(make_pipeline(StandardScaler()), X_new)


@pytest.fixture(scope="module")
def breast_cancer_normals():
    from skanomaly.datasets import load_breast_cancer_outliers

    data = load_breast_cancer_outliers()
    scaler = StandardScaler().fit(data.X_train)
    # 178 benign samples to fit on; a pool of 179 benign samples never seen in fit
    return scaler.transform(data.X_train), scaler.transform(data.X_test[data.y_test == 1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gaussian", "padim", "patchcore", "dfm", "dfkde"])
def test_conformal_false_alarm_rate_is_guaranteed(name, breast_cancer_normals):
    """Over 200 random calibration/test splits of normals never seen in fit, the mean
    share of new normals flagged is at most alpha plus its Monte-Carlo error (three
    standard errors of the mean over the splits), and not below alpha - 1/(n+1) minus
    it (the tie-free lower bound: the threshold is not merely conservative); p-values of
    new normals are uniform (Kolmogorov-Smirnov).

    Scores do not depend on the batch (bitwise), so the pool is scored once and each
    split applies the conformal rule by hand; on the first splits the detector's own
    calibrate / predict / pvalues must give exactly the same flags and p-values.
    """
    from scipy.stats import kstest

    X_fit, pool = breast_cancer_normals
    detector = _detectors(0.1)[name].fit(X_fit)
    pool_scores = detector.score_samples(pool)
    rng = np.random.default_rng(0)
    n_cal, n_splits = 99, 200
    ranks = {0.01: 99, 0.05: 95, 0.1: 90}  # ceil((1 - alpha) * 100), by hand
    rates = {alpha: [] for alpha in ranks}
    one_pvalue = []
    for split in range(n_splits):
        order = rng.permutation(len(pool))
        cal, new = order[:n_cal], order[n_cal:]
        anomaly_cal, anomaly_new = -pool_scores[cal], -pool_scores[new]
        for alpha, k in ranks.items():
            flagged = anomaly_new > np.sort(anomaly_cal)[k - 1]
            rates[alpha].append(flagged.mean())
            if split < 3:  # the estimator's own calibration is this rule
                detector.set_params(contamination=alpha).calibrate(pool[cal])
                np.testing.assert_array_equal(detector.predict(pool[new]) == -1, flagged)
        p = (1 + np.sum(anomaly_cal >= anomaly_new[0])) / (n_cal + 1)
        if split < 3:
            assert detector.pvalues(pool[new[:1]])[0] == p
        one_pvalue.append(p)  # one new normal per split
    for alpha, values in rates.items():
        mean, error = np.mean(values), 3 * np.std(values, ddof=1) / np.sqrt(n_splits)
        assert alpha - 1 / (n_cal + 1) - error <= mean <= alpha + error, (name, alpha, mean)
    assert kstest(one_pvalue, "uniform").pvalue > 0.01
