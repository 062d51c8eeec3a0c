"""Evaluation metrics for anomaly detection: image and pixel AUROC, AP, PRO.

Notes
-----
**Sign conventions (read this first).** Every metric in this module takes **anomaly
scores: higher = more anomalous**, and the **anomaly is the positive class**:

* image-level labels ``y_true`` are ``+1`` for inliers (normal) and ``-1`` for outliers
  (anomalous), as returned by ``predict`` and by :mod:`skanomaly.datasets`;
* pixel-level ``masks`` are boolean, ``True`` on defective pixels;
* ``anomaly_scores`` / ``anomaly_maps`` grow with abnormality, like the output of a
  detector's ``anomaly_map``.

Estimators follow scikit-learn instead: ``score_samples`` and ``decision_function`` are
**higher = more normal**. Pass ``-estimator.score_samples(X)`` (or
``-estimator.decision_function(X)``) to the functions below. For model selection use the
scorers, which handle the sign themselves:

* ``scoring="roc_auc"`` works unchanged with ``y`` in ``{+1, -1}``: the scorer calls
  ``decision_function`` and scikit-learn's ``roc_auc_score`` takes the greater label,
  ``+1`` (inlier), as positive. Higher decision = more normal = more likely ``+1``, so
  the scorer measures the right ranking, and because the ROC AUC is symmetric (swapping
  the positive class and negating the scores leaves it unchanged) the value equals
  :func:`image_auroc` of the anomaly scores.
* ``scoring=anomaly_average_precision_scorer`` gives the average precision with the
  anomaly class as positive. Average precision is *not* symmetric, so
  ``scoring="average_precision"`` would score the inlier class instead.

Outlier detectors are not classifiers, so ``GridSearchCV``'s default ``cv`` is an
unstratified ``KFold``; pass ``cv=StratifiedKFold(...)`` so that every fold holds both
classes.

Examples
--------
>>> import numpy as np
>>> from sklearn.ensemble import IsolationForest
>>> from sklearn.model_selection import GridSearchCV, StratifiedKFold
>>> from skanomaly.metrics import anomaly_average_precision_scorer
>>> rng = np.random.default_rng(0)
>>> X = np.vstack([rng.normal(size=(90, 2)), rng.normal(5.0, 1.0, size=(10, 2))])
>>> y = np.r_[np.ones(90, int), -np.ones(10, int)]
>>> search = GridSearchCV(
...     IsolationForest(random_state=0), {"n_estimators": [20, 50]},
...     scoring=anomaly_average_precision_scorer, cv=StratifiedKFold(3),
... ).fit(X, y)
>>> print(round(search.best_score_, 2))
1.0
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, make_scorer, roc_auc_score

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "average_precision_anomaly",
    "anomaly_average_precision_scorer",
    "pro_curve",
    "pro_score",
]


def _as_numpy(x) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors on any device are copied to the CPU.

    bfloat16, which numpy lacks, becomes float32 (exactly).
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _check_scores(scores, name: str, ndim: int) -> np.ndarray:
    """Return finite floating ``scores`` with ``ndim`` dimensions, else raise."""
    scores = _as_numpy(scores)
    if scores.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be real numbers, got dtype {scores.dtype}")
    if scores.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {scores.shape}")
    if scores.dtype.kind != "f" or scores.dtype.itemsize < 4:
        scores = scores.astype(np.float64)  # float16 differences overflow in the sweeps
    if not np.isfinite(scores).all():
        kind = "NaN" if np.isnan(scores).any() else "infinity"
        raise ValueError(f"{name} contains {kind}; scores must be finite")
    if scores.dtype != np.float64 and scores.size and \
            np.abs(scores).max() > np.finfo(scores.dtype).max / 4:
        scores = scores.astype(np.float64)  # differences of scores would overflow
    return scores


def _check_both_classes(is_anomaly: np.ndarray, name: str) -> None:
    n_pos = int(np.count_nonzero(is_anomaly))
    if n_pos == 0 or n_pos == is_anomaly.size:
        missing = "anomalous" if n_pos == 0 else "normal"
        raise ValueError(f"{name} holds no {missing} sample; the metric needs both classes")


def _check_labels(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate +1/-1 labels and 1-D scores; return (is_anomaly, scores)."""
    y_true = _as_numpy(y_true)
    if y_true.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y_true.shape}")
    values = np.unique(y_true) if y_true.dtype.kind in "iuf" else y_true[:10]
    if y_true.dtype.kind not in "iuf" or not np.isin(values, (-1, 1)).all():
        raise ValueError(
            f"y_true must hold +1 (inlier) and -1 (outlier) labels, got values {values[:10]}"
        )
    scores = _check_scores(scores, "anomaly_scores", 1)
    if scores.shape != y_true.shape:
        raise ValueError(
            f"y_true and anomaly_scores have mismatched shapes {y_true.shape} and {scores.shape}"
        )
    is_anomaly = y_true == -1
    _check_both_classes(is_anomaly, "y_true")
    return is_anomaly, scores


def _check_maps(masks, anomaly_maps) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, H, W) boolean masks and same-shape finite anomaly maps."""
    masks = _as_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be 3-D (n_images, height, width), got shape {masks.shape}")
    if masks.dtype != bool:
        if masks.dtype.kind not in "iuf" or not np.isin(masks, (0, 1)).all():
            raise ValueError("masks must be boolean (or hold only 0 and 1)")
        masks = masks.astype(bool)
    maps = _check_scores(anomaly_maps, "anomaly_maps", 3)
    if maps.shape != masks.shape:
        raise ValueError(
            f"masks and anomaly_maps have mismatched shapes {masks.shape} and {maps.shape}"
        )
    _check_both_classes(masks, "masks")
    return masks, maps


def _cumulate(scores: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sweep a threshold down through the distinct values of ``scores``.

    Returns the distinct thresholds in decreasing order and, for each weight array, the
    sum of the weights of the samples scoring at least that threshold.
    """
    order = np.argsort(scores)[::-1]  # the order within ties is irrelevant
    ranked = scores[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]  # end of each tie run
    return (ranked[last], *(np.cumsum(w[order])[last] for w in weights))


def image_auroc(y_true, anomaly_scores) -> float:
    """Area under the ROC curve of image-level anomaly scores, anomaly class positive.

    Parameters
    ----------
    y_true : array-like of int, shape (n_samples,)
        ``+1`` for inliers, ``-1`` for outliers (anomalies); both must occur.
    anomaly_scores : array-like of float, shape (n_samples,)
        Higher = more anomalous, e.g. ``-estimator.score_samples(X)``. Finite.

    Returns
    -------
    auroc : float
        Probability that a random anomaly scores higher than a random inlier, ties
        counting one half; 0.5 is chance, 1.0 a perfect ranking.

    Raises
    ------
    ValueError
        If ``y_true`` holds values other than ``+1``/``-1`` or only one of them, the
        shapes differ, or the scores hold NaN or infinity.
    TypeError
        If the scores are not real numbers.

    Notes
    -----
    Computed by ``sklearn.metrics.roc_auc_score(y_true == -1, anomaly_scores)``
    (trapezoidal ROC over the distinct thresholds). The "image AUROC" of the MVTec AD benchmark
    (Bergmann et al., 2019) and of anomalib.

    Examples
    --------
    >>> from skanomaly.metrics import image_auroc
    >>> image_auroc([1, 1, -1, -1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    is_anomaly, scores = _check_labels(y_true, anomaly_scores)
    return float(roc_auc_score(is_anomaly, scores))


def pixel_auroc(masks, anomaly_maps) -> float:
    """Area under the ROC curve of all pixels pooled, defective pixels positive.

    Parameters
    ----------
    masks : array-like of bool, shape (n_images, height, width)
        Ground truth, ``True`` on defective pixels. Must contain both values.
    anomaly_maps : array-like of float, shape (n_images, height, width)
        Per-pixel anomaly scores, higher = more anomalous. Finite.

    Returns
    -------
    auroc : float
        ROC AUC of the flattened maps against the flattened masks.

    Raises
    ------
    ValueError
        If the masks are not 3-D, not boolean (or 0/1), all ``True`` or all ``False``;
        if the shapes differ; or if the maps hold NaN or infinity.
    TypeError
        If the maps are not real numbers.

    Notes
    -----
    The pixel-level AUROC of MVTec AD (Bergmann et al., 2019) and anomalib: every pixel
    of every image is one sample. Dominated by large defects; see :func:`pro_score` for a
    metric that weights every defect region equally.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.metrics import pixel_auroc
    >>> masks = np.zeros((1, 2, 2), bool)
    >>> masks[0, 0, 0] = True
    >>> pixel_auroc(masks, [[[0.9, 0.2], [0.95, 0.1]]])
    0.666...
    """
    masks, maps = _check_maps(masks, anomaly_maps)
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def average_precision_anomaly(y_true, anomaly_scores) -> float:
    """Average precision with the anomaly class (``-1``) as positive.

    Parameters
    ----------
    y_true : array-like of int, shape (n_samples,)
        ``+1`` for inliers, ``-1`` for outliers; both must occur.
    anomaly_scores : array-like of float, shape (n_samples,)
        Higher = more anomalous. Finite.

    Returns
    -------
    average_precision : float
        ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds, with precision
        ``P_n`` and recall ``R_n`` of the anomaly class; the chance level is the
        anomaly fraction.

    Raises
    ------
    ValueError
        As :func:`image_auroc`.
    TypeError
        As :func:`image_auroc`.

    See Also
    --------
    anomaly_average_precision_scorer : This metric as a scorer for ``GridSearchCV``.

    Notes
    -----
    Computed by scikit-learn's ``average_precision_score(y_true == -1, anomaly_scores)``
    (the step-wise, non-interpolated definition).

    Examples
    --------
    >>> from skanomaly.metrics import average_precision_anomaly
    >>> print(round(average_precision_anomaly([1, 1, -1, -1], [0.1, 0.4, 0.35, 0.8]), 4))
    0.8333
    """
    is_anomaly, scores = _check_labels(y_true, anomaly_scores)
    return float(average_precision_score(is_anomaly, scores))


def _average_precision_from_decision(y_true, decision) -> float:
    """Anomaly-class AP of a ``decision_function`` (higher = more normal)."""
    return average_precision_anomaly(y_true, -_as_numpy(decision).astype(np.float64))


#: Scorer for ``GridSearchCV(scoring=...)`` / ``cross_val_score``: the average precision
#: of the anomaly class (label ``-1``) computed from ``estimator.decision_function``,
#: whose sign (higher = more normal) it flips. ``y`` must be ``+1`` / ``-1``. See the
#: module docstring for an example and for why ``scoring="roc_auc"`` needs no such help.
anomaly_average_precision_scorer = make_scorer(
    _average_precision_from_decision, response_method="decision_function"
)


def pro_curve(masks, anomaly_maps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against false-positive rate, at every distinct threshold.

    Parameters
    ----------
    masks : array-like of bool, shape (n_images, height, width)
        Ground truth, ``True`` on defective pixels; needs at least one defective and one
        normal pixel. Images without defects add only normal pixels.
    anomaly_maps : array-like of float, shape (n_images, height, width)
        Per-pixel anomaly scores, higher = more anomalous. Finite.

    Returns
    -------
    fpr : ndarray of float64, shape (n_thresholds + 2,)
        Fraction of normal pixels (over all images) scoring at least the threshold.
        Non-decreasing, from 0 to 1.
    pro : ndarray of float64, shape (n_thresholds + 2,)
        Mean over all defect regions of all images of ``|{score >= t} & region| /
        |region|``. Non-decreasing, from 0 to 1.
    thresholds : ndarray of float64, shape (n_thresholds + 2,)
        Decreasing: ``inf``, the distinct map values, ``-inf`` (the end point).

    Raises
    ------
    ValueError
        As :func:`pixel_auroc`, in particular when no mask holds a defect.
    TypeError
        If the maps are not real numbers.

    Notes
    -----
    Follows the evaluation code of MVTec AD (Bergmann et al., 2021): regions are the
    connected components of each mask under **8-connectivity**
    (``scipy.ndimage.label`` with ``structure=np.ones((3, 3))``), and the curve is exact,
    one point per distinct score, computed by sorting the pixels once and accumulating
    per-pixel weights ``1 / (n_regions * |region|)`` and ``1 / n_normal_pixels``. Ties
    between pixels give one point, so the curve is linearly interpolated across them.

    References
    ----------
    .. [1] P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, "Uninformed Students:
       Student-Teacher Anomaly Detection with Discriminative Latent Embeddings", CVPR 2020.
    .. [2] P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger, C. Steger, "The MVTec
       Anomaly Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised
       Anomaly Detection", IJCV 129, 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.metrics import pro_curve
    >>> masks = np.array([[[True, False], [False, False]]])
    >>> fpr, pro, thresholds = pro_curve(masks, [[[0.9, 0.5], [0.1, 0.1]]])
    >>> fpr.round(3), pro
    (array([0.   , 0.   , 0.333, 1.   , 1.   ]), array([0., 1., 1., 1., 1.]))
    """
    masks, maps = _check_maps(masks, anomaly_maps)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True  # 8-connected within an image, never across images
    regions, n_regions = ndimage.label(masks, structure=in_plane)
    sizes = np.bincount(regions.ravel())
    region_weight = np.where(masks, 1.0 / (n_regions * sizes[regions]), 0.0)
    normal = ~masks
    thresholds, pro, fp = _cumulate(maps.ravel(), region_weight.ravel(), normal.ravel())
    fpr = fp / fp[-1]
    pro = np.minimum(pro, 1.0)  # float sums may overshoot 1 by an ulp
    return (
        np.r_[0.0, fpr, 1.0],
        np.r_[0.0, pro, 1.0],
        np.r_[np.inf, thresholds, -np.inf],
    )


def pro_score(masks, anomaly_maps, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to a false-positive rate ``max_fpr``.

    Parameters
    ----------
    masks : array-like of bool, shape (n_images, height, width)
        Ground truth, ``True`` on defective pixels (at least one, and one normal pixel).
    anomaly_maps : array-like of float, shape (n_images, height, width)
        Per-pixel anomaly scores, higher = more anomalous. Finite.
    max_fpr : float, default=0.3
        Integration limit on the pixel false-positive rate, in (0, 1]; 0.3 is the
        MVTec AD convention.

    Returns
    -------
    au_pro : float
        ``(1 / max_fpr) * integral_0^max_fpr PRO(fpr) dfpr`` by the trapezoidal rule on
        :func:`pro_curve`, interpolating linearly at ``max_fpr``. 1.0 for a perfect map;
        ``max_fpr / 2`` (0.15 by default) for an uninformative one, whose PRO curve is
        the diagonal.

    Raises
    ------
    ValueError
        As :func:`pro_curve`, or if ``max_fpr`` is not in (0, 1].
    TypeError
        If ``max_fpr`` is not a real number or the maps are not real numbers.

    Notes
    -----
    Unlike :func:`pixel_auroc`, every connected defect region weighs the same, however
    large. The score depends on the maps only through the ranking of their values.
    Conventions (8-connectivity, exact thresholds, normalisation) follow the MVTec AD
    evaluation code; see :func:`pro_curve`.

    References
    ----------
    .. [1] P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, "Uninformed Students:
       Student-Teacher Anomaly Detection with Discriminative Latent Embeddings", CVPR 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.metrics import pro_score
    >>> masks = np.zeros((1, 8, 8), bool)
    >>> masks[0, 2:4, 2:4] = True
    >>> print(pro_score(masks, masks.astype(float)))
    1.0
    >>> print(pro_score(masks, np.zeros((1, 8, 8))))
    0.15
    """
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, (int, float, np.number)):
        raise TypeError(f"max_fpr must be a real number, got {type(max_fpr).__name__}")
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro, _ = pro_curve(masks, anomaly_maps)
    k = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:  # close the area at max_fpr, fpr[k - 1] <= max_fpr < fpr[k]
        t = (max_fpr - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x, y = np.r_[x, max_fpr], np.r_[y, pro[k - 1] + t * (pro[k] - pro[k - 1])]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2 / max_fpr)
