"""Tests of skanomaly.metrics against scikit-learn, a brute-force PRO and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, get_scorer, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skanomaly.metrics import (
    anomaly_average_precision_scorer,
    average_precision_anomaly,
    image_auroc,
    pixel_auroc,
    pro_curve,
    pro_score,
)


def _labels_and_scores(seed, n=40, n_levels=6):
    """Random +1/-1 labels (both present) and integer-valued scores with many ties."""
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < 0.3, -1, 1)
    y[:2] = [1, -1]
    scores = rng.integers(0, n_levels, n).astype(float) + (y == -1)
    return y, scores


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_levels=st.sampled_from([2, 5, 1000]))
def test_image_auroc_and_ap_match_sklearn(seed, n_levels):
    y, scores = _labels_and_scores(seed, n_levels=n_levels)
    is_anomaly = y == -1
    assert image_auroc(y, scores) == pytest.approx(roc_auc_score(is_anomaly, scores))
    # the same number through sklearn's own convention: +1 positive, normality scores
    assert image_auroc(y, scores) == pytest.approx(roc_auc_score(y, -scores))
    assert average_precision_anomaly(y, scores) == pytest.approx(
        average_precision_score(is_anomaly, scores)
    )


def test_image_metrics_hand_computed():
    # anomalies score 0.35 and 0.8, inliers 0.1 and 0.4: 3 of 4 pairs ranked right
    y, s = [1, 1, -1, -1], [0.1, 0.4, 0.35, 0.8]
    assert image_auroc(y, s) == pytest.approx(0.75)
    # ranking 0.8 (A), 0.4 (N), 0.35 (A): AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision_anomaly(y, s) == pytest.approx(0.5 + 1 / 3)
    # a tie between an anomaly and an inlier counts one half
    assert image_auroc([1, -1], [0.5, 0.5]) == pytest.approx(0.5)


def test_image_metrics_sign_convention():
    # reversed scores (normality instead of anomaly) give the complementary AUROC
    y, s = _labels_and_scores(3)
    assert image_auroc(y, -s) == pytest.approx(1 - image_auroc(y, s))
    assert image_auroc(y, np.where(y == -1, 2.0, 1.0)) == 1.0


def test_pixel_auroc_matches_sklearn_on_flattened_pixels():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 9, 7)) < 0.2
    maps = np.round(rng.random(masks.shape) + masks, 1)  # informative, with ties
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert pixel_auroc(masks.astype(np.uint8), maps) == pixel_auroc(masks, maps)


def test_metrics_accept_torch_tensors():
    y, s = _labels_and_scores(1)
    assert image_auroc(torch.as_tensor(y), torch.as_tensor(s)) == image_auroc(y, s)


# ---------------------------------------------------------------- PRO


def _hand_case():
    """One 4 x 4 image, worked by hand.

    mask        scores (normal pixels not shown are 0)
    1 . . .     0.7 0.8 .   .
    . 1 . .     .   0.5 0.6 .
    . . . .     .   .   .   .
    . . . 1     .   .   .   0.9

    With 8-connectivity the diagonal pair (0,0)-(1,1) is one region A of 2 pixels and
    (3,3) a region B of 1 pixel: 2 regions, 13 normal pixels. Lowering the threshold:
    0.9 takes B            -> PRO = (0 + 1) / 2     = 0.5,  FPR = 0
    0.8 takes a normal     -> PRO = 0.5,                    FPR = 1/13
    0.7 takes half of A    -> PRO = (1/2 + 1) / 2   = 0.75, FPR = 1/13
    0.6 takes a normal     -> PRO = 0.75,                   FPR = 2/13
    0.5 takes all of A     -> PRO = 1,                      FPR = 2/13
    0.0 takes the rest     -> PRO = 1,                      FPR = 1
    (With 4-connectivity, three 1-pixel regions would give PRO 1/3, 2/3, 1 instead.)
    """
    masks = np.zeros((1, 4, 4), bool)
    masks[0, [0, 1, 3], [0, 1, 3]] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 3, 3], maps[0, 0, 1], maps[0, 0, 0], maps[0, 1, 2], maps[0, 1, 1] = (
        0.9, 0.8, 0.7, 0.6, 0.5,
    )
    return masks, maps


def test_pro_curve_hand_computed():
    fpr, pro, thresholds = pro_curve(*_hand_case())
    np.testing.assert_allclose(fpr, [0, 0, 1 / 13, 1 / 13, 2 / 13, 2 / 13, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 0.75, 1, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0, -np.inf])


def test_pro_score_hand_computed():
    masks, maps = _hand_case()
    # area up to 0.3: 1/13 * 0.5 + 1/13 * 0.75 + (0.3 - 2/13) * 1
    expected = (0.5 / 13 + 0.75 / 13 + (0.3 - 2 / 13)) / 0.3
    assert pro_score(masks, maps) == pytest.approx(expected)
    # 0.1 falls inside the segment 1/13 -> 2/13 where PRO is 0.75
    expected = (0.5 / 13 + 0.75 * (0.1 - 1 / 13)) / 0.1
    assert pro_score(masks, maps, max_fpr=0.1) == pytest.approx(expected)
    # whole curve: the same two rectangles plus (1 - 2/13) at PRO 1
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(1.25 / 13 + 11 / 13)


def _brute_force_pro_curve(masks, maps):
    """PRO and FPR at each distinct threshold, one image and one region at a time."""
    fprs, pros = [], []
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        overlaps = []
        for mask, p in zip(masks, pred):
            labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
            overlaps += [p[labels == k].mean() for k in range(1, n + 1)]
        pros.append(np.mean(overlaps))
        fprs.append(pred[~masks].mean())
    return np.array(fprs), np.array(pros)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), levels=st.sampled_from([3, 10, 10**6]))
def test_pro_curve_matches_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random((3, 10, 10)) < 0.04, structure=np.ones((1, 2, 2)))
    masks[0, 0, 0], masks[0, 9, 9] = True, False
    maps = np.floor(levels * (rng.random(masks.shape) + 0.5 * masks)) / levels
    fpr, pro, _ = pro_curve(masks, maps)
    ref_fpr, ref_pro = _brute_force_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr[1:-1], ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro[1:-1], ref_pro, atol=1e-12)


def test_pro_score_properties():
    rng = np.random.default_rng(0)
    masks = ndimage.binary_dilation(rng.random((4, 64, 64)) < 0.005, iterations=2)
    masks[:, :8] = False  # some normal pixels guaranteed
    # perfect map: all defects found before any false positive
    for max_fpr in (0.05, 0.3, 1.0):
        assert pro_score(masks, masks + 0.1 * rng.random(masks.shape), max_fpr) == 1.0
    # uninformative constant map: the curve is the diagonal, normalised area max_fpr / 2
    assert pro_score(masks, np.zeros(masks.shape)) == pytest.approx(0.15)
    # random map: PRO(fpr) ~ fpr, so again ~ max_fpr / 2
    assert pro_score(masks, rng.random(masks.shape)) == pytest.approx(0.15, abs=0.03)
    # only the ranking matters
    maps = rng.random(masks.shape) + masks
    assert pro_score(masks, np.exp(3 * maps) - 7) == pytest.approx(pro_score(masks, maps))
    # max_fpr = 1 is the plain trapezoid over the whole curve
    fpr, pro, _ = pro_curve(masks, maps)
    area = np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2
    assert pro_score(masks, maps, 1.0) == pytest.approx(area)


def test_pro_weights_regions_equally_unlike_pixel_auroc():
    # one big defect found, one small defect missed: PRO counts each region as one half
    masks = np.zeros((1, 20, 20), bool)
    masks[0, :10, :10] = True  # 100 pixels
    masks[0, 15, 15] = True  # 1 pixel
    maps = masks.astype(float)
    maps[0, 15, 15] = 0.0
    assert pixel_auroc(masks, maps) > 0.99
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(0.5 + 0.5 * 0.5)


# ---------------------------------------------------------------- scorers


def _outlier_data():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(120, 3)), rng.normal(4.0, 1.0, size=(12, 3))])
    y = np.r_[np.ones(120, int), -np.ones(12, int)]
    return X, y


def test_anomaly_average_precision_scorer_flips_decision_function():
    X, y = _outlier_data()
    est = IsolationForest(random_state=0).fit(X)
    decision = est.decision_function(X)
    expected = average_precision_score(y == -1, -decision)
    assert anomaly_average_precision_scorer(est, X, y) == pytest.approx(expected)
    assert expected > 0.9 > average_precision_score(y == -1, decision)


def test_roc_auc_scorer_equals_image_auroc_of_anomaly_scores():
    X, y = _outlier_data()
    est = IsolationForest(random_state=0).fit(X)
    auc = get_scorer("roc_auc")(est, X, y)
    assert auc == pytest.approx(image_auroc(y, -est.decision_function(X)))
    assert auc > 0.9


@pytest.mark.parametrize("scoring", [anomaly_average_precision_scorer, "roc_auc"])
def test_grid_search_with_plus_minus_one_labels(scoring):
    X, y = _outlier_data()
    search = GridSearchCV(
        IsolationForest(n_estimators=20, random_state=0), {"max_samples": [16, 64]},
        scoring=scoring, cv=StratifiedKFold(3), error_score="raise",
    ).fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_score_ > 0.8


# ---------------------------------------------------------------- errors and inputs


@pytest.mark.parametrize("metric", [image_auroc, average_precision_anomaly])
@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([1, -1, 1], [0.1, 0.2], "mismatched shapes"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "no anomalous"),
        ([-1, -1], [0.1, 0.2], "no normal"),
        ([0, 1], [0.1, 0.2], r"\+1 \(inlier\) and -1"),
        ([[1, -1]], [[0.1, 0.2]], "1-D"),
        ([1, -1], [np.nan, 0.2], "NaN"),
        ([1, -1], [np.inf, 0.2], "infinity"),
    ],
)
def test_label_metric_errors(metric, y, s, match):
    with pytest.raises(ValueError, match=match):
        metric(y, s)


def test_label_metric_type_error():
    with pytest.raises(TypeError, match="real numbers"):
        image_auroc([1, -1], ["a", "b"])


@pytest.mark.parametrize("metric", [pixel_auroc, pro_curve, pro_score])
def test_map_metric_errors(metric):
    masks, maps = _hand_case()
    with pytest.raises(ValueError, match="mismatched shapes"):
        metric(masks, maps[:, :3])
    with pytest.raises(ValueError, match="3-D"):
        metric(masks[0], maps[0])
    with pytest.raises(ValueError, match="no anomalous"):
        metric(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="no normal"):
        metric(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="boolean"):
        metric(masks * 2, maps)
    with pytest.raises(ValueError, match="NaN"):
        metric(masks, np.where(masks, np.nan, maps))


@pytest.mark.parametrize(("max_fpr", "error"), [(0.0, ValueError), (1.5, ValueError),
                                                (True, TypeError), ("0.3", TypeError)])
def test_pro_score_max_fpr_errors(max_fpr, error):
    with pytest.raises(error, match="max_fpr"):
        pro_score(*_hand_case(), max_fpr=max_fpr)


def test_inputs_not_mutated_and_read_only_ok():
    masks, maps = _hand_case()
    y, s = _labels_and_scores(0)
    arrays = (masks, maps, y, s)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.setflags(write=False)
    image_auroc(y, s), average_precision_anomaly(y, s)
    pixel_auroc(masks, maps), pro_score(masks, maps)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


def test_any_finite_scale_and_half_precision():
    # the metrics are rank-based: scores of 1e-300 or 1e300, in any float dtype, agree
    rng = np.random.default_rng(40)
    y = np.r_[np.ones(30, int), -np.ones(10, int)]
    scores = rng.normal(size=40) + (y == -1)
    ref = roc_auc_score(y == -1, scores)
    for scale in (1e-300, 1e300):
        assert image_auroc(y, scores * scale) == pytest.approx(ref, abs=1e-12)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = image_auroc(torch.tensor(y), torch.tensor(scores).to(dtype))
        assert got == roc_auc_score(y == -1, torch.tensor(scores).to(dtype).float().numpy())
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 1:3, 1:3] = True
    maps = rng.normal(size=(2, 5, 5)) + masks
    half = torch.tensor(maps).to(torch.bfloat16)
    assert pro_score(masks, half) == pro_score(masks, half.float().numpy())
    assert pixel_auroc(torch.tensor(masks), half) == pytest.approx(
        roc_auc_score(masks.ravel(), half.float().numpy().ravel()))


def test_zero_length_maps_are_refused_clearly():
    with pytest.raises(ValueError, match="no anomalous"):
        pixel_auroc(np.zeros((2, 0, 4), bool), np.zeros((2, 0, 4)))
    with pytest.raises(ValueError, match="no anomalous"):
        pro_score(np.zeros((0, 3, 3), bool), np.zeros((0, 3, 3)))
    with pytest.raises(ValueError, match="no anomalous"):
        image_auroc(np.zeros(0, int), np.zeros(0))
