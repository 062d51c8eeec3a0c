"""Estimator glue shared by every skanomaly detector.

This is the one place for input validation (numpy arrays, array-likes and torch
tensors on any device), device resolution, seeding through a local
:class:`torch.Generator`, ``contamination``/``offset_``, ``decision_function`` and
``predict``, and pickling of device state. Detectors subclass
:class:`BaseDetector` and implement ``_fit`` and ``_score``; spatial detectors
subclass :class:`BaseSpatialDetector` and implement ``_anomaly_map``.
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from sklearn_compat.utils.validation import validate_data
from ._dask import is_dask_array
from ._utils import CalibrationWarning, make_generator
from ._utils import user_stacklevel as _user_stacklevel
from .functional import all_finite

__all__ = [
    "CalibrationWarning",
    "BaseDetector",
    "BaseSpatialDetector",
    "calibrate",
    "pvalues",
    "resolve_device",
    "make_generator",
]

_DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")

#: numbers (samples x per-sample size) aimed at per fixed-shape scoring block
_BLOCK_NUMBERS = 2**22
#: bounds on the samples per fixed-shape scoring block. Below 32 rows, the small matrix
#: products of PaDiM's scoring ran 1.6x (16 rows) to 2.4x (8 rows) slower per image than
#: unblocked scoring of 64 images (C=100, 56 x 56, 2-core EPYC); at 32 within 1.1x.
_MIN_BLOCK, _MAX_BLOCK = 32, 1024


def resolve_device(device="auto") -> torch.device:
    """Turn a device specification into an available :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "mps"}, str or torch.device, default="auto"
        ``"auto"`` picks CUDA when available, then Apple MPS, then the CPU.
        Indexed forms such as ``"cuda:1"`` are accepted.

    Returns
    -------
    torch.device
        The resolved device.

    Raises
    ------
    ValueError
        If the name is not a device torch knows, or if CUDA or MPS is asked for
        and is not available on this machine.

    Examples
    --------
    >>> from skanomaly.base import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    elif device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"unknown device {device!r}; use one of {_DEVICE_NAMES} or a torch.device"
            ) from exc
    if dev.type not in _DEVICE_NAMES:
        raise ValueError(f"unsupported device {device!r}; use one of {_DEVICE_NAMES}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} was requested but MPS is not available here")
    return dev


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _like_input(X, t: torch.Tensor):
    """``t`` in the namespace and on the device of the user's input ``X``.

    scikit-learn's Array API convention: a :class:`torch.Tensor` in gives a tensor out
    on that tensor's device (one transfer at the end, none when the detector computes
    there); anything else gives a numpy array. Floating results are float64 either way.
    """
    if t.is_floating_point():
        t = t.to(torch.float64)
    if isinstance(X, torch.Tensor):
        return t.to(X.device)
    return to_numpy(t)


def _per_image_reduce(tile_scores: torch.Tensor, counts, reduce: str) -> torch.Tensor:
    """The largest (``reduce="amax"``) or smallest (``"amin"``) of each image's
    consecutive tile scores: ``counts`` tiles per image, an int, or a list of one count
    per image (tiles of images of several sizes)."""
    if isinstance(counts, int):
        return getattr(tile_scores.reshape(-1, counts), reduce)(dim=1)
    device = tile_scores.device
    counts = torch.as_tensor(counts, device=device)
    index = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    start = -torch.inf if reduce == "amax" else torch.inf
    out = torch.full((len(counts),), start, dtype=tile_scores.dtype, device=device)
    return out.scatter_reduce(0, index, tile_scores, reduce)


def _predict_labels(decision):
    """+1 where ``decision >= 0``, else -1: an int64 tensor for a tensor, else numpy."""
    if isinstance(decision, torch.Tensor):
        return torch.where(decision < 0, -1, 1)
    return np.where(decision < 0, -1, 1)


#: what calibrate / calibrate_pixels set besides offset_: stale once the model changes
_CALIBRATION_STATE = ("calibration_scores_", "pixel_threshold_", "pixel_calibration_",
                      "pixel_map_size_", "pixel_sigma_")

#: out-of-sample anomaly scores that streaming keeps to set ``offset_`` (the latest ones)
_OFFSET_RECORD = 2048


def _score_record(anomaly_scores: torch.Tensor, n_model: int) -> np.ndarray:
    """Rows ``(anomaly score, samples seen by the model that scored it)``, float64."""
    scores = to_numpy(anomaly_scores).astype(np.float64)
    return np.stack([scores, np.full_like(scores, n_model)], axis=1)


def _on_host(value):
    """``value`` with every tensor in it (lists and tuples searched) as a numpy array."""
    if isinstance(value, torch.Tensor):
        return to_numpy(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(v) for v in value)
    return value


def _shares_memory(X, t: torch.Tensor) -> bool:
    """Whether the validated tensor ``t`` may be a view of the user's input ``X``."""
    if isinstance(X, torch.Tensor):
        return X.device == t.device and X.untyped_storage().data_ptr() == \
            t.untyped_storage().data_ptr()
    if isinstance(X, np.ndarray) and t.device.type == "cpu":
        return bool(np.may_share_memory(X, t.numpy()))
    return False


def draw_seed(generator: torch.Generator) -> int:
    """A seed for the next call's generator, drawn from this one (reproducible streams)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def in_fixed_blocks(fn, x: torch.Tensor, block: int) -> torch.Tensor:
    """``fn`` applied to ``x`` in blocks of exactly ``block`` rows, results concatenated.

    The last block is padded by repeating its last row and the padding's results are
    dropped. Every call of ``fn`` thus sees one and the same shape, whatever the number
    of rows: kernels whose strategy depends on the shape (BLAS blocking, GEMV for one
    row, oneDNN's algorithm choice, torch's split of a reduction across threads) run
    identically for every block, so the result of a row does not depend on which or
    how many rows come with it. ``fn`` must treat rows independently.
    """
    outputs = []
    for start in range(0, x.shape[0], block):
        chunk = x[start : start + block]
        n = chunk.shape[0]
        if n < block:
            chunk = torch.cat([chunk, chunk[-1:].expand(block - n, *chunk.shape[1:])])
        outputs.append(fn(chunk)[:n])
    return torch.cat(outputs)


def _quantile_offset(normality: np.ndarray, contamination: float) -> float:
    """The ``contamination`` quantile of normality scores; -inf scores count as the lowest."""
    return float(np.percentile(_finite_normality(normality), 100.0 * contamination))


def _finite_normality(normality: np.ndarray) -> np.ndarray:
    """float64 normality scores with -inf (an overflow) below the lowest finite score."""
    normality = np.asarray(normality, dtype=np.float64)
    finite = np.isfinite(normality)
    if not finite.all():
        if not finite.any():
            raise ValueError("every score used to set offset_ is infinite (an overflow: the "
                             "magnitude of X is too large for the detector's precision; "
                             "rescale the features)")
        low = normality[finite].min()
        normality = np.where(finite, normality, low - abs(low) - 1.0)
    return normality


def _conformal_rank(n: int, alpha: float) -> int:
    """``ceil((1 - alpha) (n + 1))``, exactly for the decimal ``alpha`` the user wrote."""
    from fractions import Fraction

    return math.ceil((1 - Fraction(repr(float(alpha)))) * (n + 1))


def conformal_min_samples(contamination: float) -> int:
    """Fewest held-out samples for a conformal threshold at level ``contamination``.

    The smallest ``n`` with ``ceil((1 - contamination)(n + 1)) <= n``, i.e.
    ``ceil((1 - contamination) / contamination)``: :meth:`BaseDetector.calibrate` needs
    at least this many normal samples.

    Parameters
    ----------
    contamination : float in (0, 1)
        The false-alarm rate to guarantee.

    Returns
    -------
    int

    Examples
    --------
    >>> from skanomaly.base import conformal_min_samples
    >>> conformal_min_samples(0.1), conformal_min_samples(0.05), conformal_min_samples(0.01)
    (9, 19, 99)
    """
    from fractions import Fraction

    a = Fraction(repr(float(contamination)))
    return math.ceil((1 - a) / a)


def _conformal_offset(normality: np.ndarray, alpha: float) -> tuple[float, np.ndarray]:
    """The split-conformal threshold on normality scores of held-out normals.

    Returns ``(offset, sorted_scores)``. With ``k = ceil((1 - alpha) (n + 1))``, a sample
    is flagged when its anomaly score exceeds the ``k``-th smallest of the ``n``
    calibration anomaly scores, i.e. when its normality is below the ``(n + 1 - k)``-th
    smallest normality: ``offset`` is that score (``-inf`` when ``k > n``: too few
    samples for any finite threshold to hold the rate at ``alpha``).
    """
    scores = np.sort(_finite_normality(normality))
    n = scores.shape[0]
    k = _conformal_rank(n, alpha)
    return (float(scores[n - k]) if k <= n else -math.inf), scores


def _f1_max_threshold(anomaly: np.ndarray, positive: np.ndarray) -> float:
    """The anomaly score ``t`` whose rule ``anomaly >= t`` has the largest F1 on ``positive``.

    anomalib's adaptive threshold (the F1-maximising point of the precision-recall curve,
    the lowest such threshold on ties). ``positive``: True for anomalous samples/pixels.
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(positive, anomaly)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total),
                   where=total > 0)
    return float(thresholds[np.argmax(f1)])


def _check_labels(y, n: int) -> np.ndarray:
    """``y`` as a bool array "anomalous" of shape (n,); ValueError unless +1 / -1."""
    labels = np.asarray(y)
    if labels.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to label the {n} samples of X, got "
                         f"shape {labels.shape}")
    if labels.dtype.kind not in "iuf" or not np.isin(labels, (1, -1)).all():
        raise ValueError("y must hold +1 (normal) and -1 (anomalous) labels, scikit-learn's "
                         f"outlier convention; got values {np.unique(labels)[:5]}")
    anomalous = labels == -1
    if not anomalous.any():
        raise ValueError("y labels no sample anomalous (-1): an F1-maximising threshold "
                         "needs anomalies; for normal samples only use calibrate(X) (the "
                         "conformal threshold)")
    return anomalous


def calibrate(estimator, X, y=None):
    """Set the decision threshold of a fitted detector or pipeline from held-out normals.

    The last step of ``estimator`` (or ``estimator`` itself) must be a fitted skanomaly
    detector; the earlier steps of a :class:`~sklearn.pipeline.Pipeline` transform ``X``
    first. ``offset_`` becomes the split-conformal threshold of the held-out scores at
    level ``contamination``, so that ``predict`` flags at most ``contamination`` of new
    normal samples in expectation (see :meth:`BaseDetector.calibrate`), and the
    detector's :meth:`~BaseDetector.pvalues` give conformal p-values (:func:`pvalues`).

    Parameters
    ----------
    estimator : fitted skanomaly detector or Pipeline ending in one
        Modified in place.
    X : array-like of shape (n_samples, ...)
        Normal samples that were not used for fitting, in the input format of
        ``estimator`` (images for a pipeline starting with a feature extractor); or,
        with ``y``, labelled validation samples.
    y : array-like of shape (n_samples,) or None, default=None
        +1 (normal) / -1 (anomalous) labels of ``X``: the threshold then maximises F1
        on them (see :meth:`BaseDetector.calibrate`).

    Returns
    -------
    estimator
        The same object, with the detector's ``offset_`` and ``calibration_`` updated.

    Raises
    ------
    TypeError
        If the (last step of the) estimator is not a skanomaly detector.
    sklearn.exceptions.NotFittedError
        If it is not fitted.
    ValueError
        If ``X`` is invalid for the estimator (see its ``score_samples``).

    See Also
    --------
    BaseDetector.calibrate : the same on a bare detector.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skanomaly import GaussianDetector, calibrate
    >>> rng = np.random.default_rng(0)
    >>> model = make_pipeline(StandardScaler(), GaussianDetector(device="cpu"))
    >>> model = model.fit(rng.normal(size=(200, 3)))
    >>> model = calibrate(model, rng.normal(size=(500, 3)))
    >>> model[-1].calibration_
    'held-out'
    >>> flagged = (model.predict(rng.normal(size=(5000, 3))) == -1).mean()
    >>> bool(abs(flagged - 0.1) < 0.03)
    True
    """
    if _is_tiled(estimator):  # tiles are not the pipeline's samples: its own method
        return estimator.calibrate(X, y)
    detector, Xt = _detector_and_input(estimator, X, "calibrate")
    detector.calibrate(Xt, y)
    return estimator


def _is_tiled(estimator) -> bool:
    """Whether ``estimator`` is an AnomalyPipeline that tiles its images."""
    return getattr(estimator, "_tiling", lambda: None)() is not None


def _detector_and_input(estimator, X, what: str):
    """The fitted skanomaly detector of ``estimator`` (itself, or a Pipeline's last step)
    and ``X`` through the pipeline's earlier steps; ``TypeError`` naming ``what``."""
    from sklearn.pipeline import Pipeline

    detector = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    if not isinstance(detector, BaseDetector):
        raise TypeError(
            f"{what} needs a skanomaly detector or a Pipeline ending in one, got "
            f"{type(detector).__name__}"
        )
    check_is_fitted(detector)
    if isinstance(estimator, Pipeline) and len(estimator) > 1:
        X = estimator[:-1].transform(X)
    return detector, X


def pvalues(estimator, X):
    """Conformal p-values of normality of ``X`` under a calibrated detector or pipeline.

    The earlier steps of a :class:`~sklearn.pipeline.Pipeline` transform ``X`` first;
    then :meth:`BaseDetector.pvalues` of its last step.

    Parameters
    ----------
    estimator : skanomaly detector or Pipeline ending in one, calibrated
        By :func:`calibrate` (or :meth:`BaseDetector.calibrate`).
    X : array-like of shape (n_samples, ...)
        Samples in the input format of ``estimator``.

    Returns
    -------
    pvalues : ndarray of shape (n_samples,), float64
        See :meth:`BaseDetector.pvalues`.

    Raises
    ------
    TypeError
        If the (last step of the) estimator is not a skanomaly detector.
    sklearn.exceptions.NotFittedError
        If it is not fitted, or not calibrated on held-out samples.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skanomaly import GaussianDetector, calibrate, pvalues
    >>> rng = np.random.default_rng(0)
    >>> model = make_pipeline(StandardScaler(), GaussianDetector(device="cpu"))
    >>> model = calibrate(model.fit(rng.normal(size=(200, 3))), rng.normal(size=(99, 3)))
    >>> pvalues(model, [[0.0, 0.0, 0.0], [6.0, 6.0, 6.0]])
    array([1.  , 0.01])
    """
    if _is_tiled(estimator):
        return estimator.pvalues(X)
    detector, Xt = _detector_and_input(estimator, X, "pvalues")
    return detector.pvalues(Xt)


class BaseDetector(OutlierMixin, BaseEstimator):
    """Base class of skanomaly's detectors (scikit-learn's outlier contract).

    Subclasses implement ``_fit(X)`` on a validated tensor and ``_score(X)``
    returning one anomaly score per sample (a tensor, HIGHER = MORE
    ANOMALOUS). This class turns them into scikit-learn's convention:
    :meth:`score_samples` returns the negated anomaly score as numpy float64
    (higher = more normal), :meth:`decision_function` subtracts ``offset_``
    and :meth:`predict` returns +1 (inlier) / -1 (outlier).

    Parameters
    ----------
    contamination : float in (0, 0.5], default=0.1
        Share of new normal samples that :meth:`predict` flags as outliers:
        ``offset_`` is the ``contamination`` quantile of out-of-sample scores of the
        training samples (see Notes), or of held-out normals passed to
        :meth:`calibrate`.
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the kernels run. Fitted attributes are CPU numpy arrays whatever
        the device, so a model fitted on CUDA pickles and loads on a CPU machine.

    Attributes
    ----------
    offset_ : float
        Threshold on :meth:`score_samples`; ``decision_function = score_samples - offset_``.
    calibration_ : str
        How ``offset_`` was set: ``"leave-one-out"`` (exact leave-one-out scores of the
        training samples), ``"leave-one-image-out"`` (PatchCore), ``"cross-fit"``
        (K-fold cross-fitting), ``"in-sample"`` (too few samples for either; optimistic),
        ``"held-out"`` (:meth:`calibrate`), ``"labelled-f1"`` (:meth:`calibrate` with
        labels: the F1-maximising threshold), ``"score-then-update"`` (``partial_fit`` of
        detectors without cheap leave-one-out scores: each batch scored before it is
        absorbed).
    calibration_scores_ : ndarray of shape (n_calibration,), float64
        Normality scores (:meth:`score_samples`) of the held-out normal samples of the
        last :meth:`calibrate`, sorted ascending: the reference of :meth:`pvalues`. Only
        after :meth:`calibrate`; a later ``fit`` or ``partial_fit`` removes it.

    Notes
    -----
    In-sample scores are optimistic for most detectors (a training patch is its own
    nearest neighbour, a KDE point counts in its own density, a Mahalanobis distance
    to a mean and covariance that include the sample is shrunk), so ``fit`` sets
    ``offset_`` from out-of-sample scores of the training samples: each detector's
    exact leave-one-out scores where the algebra gives them cheaply, else
    ``n_splits = 5`` cross-fitting (each fifth of the samples scored by a model fitted
    on the other four fifths; five extra fits). With fewer than ``2 * n_splits``
    samples, or when a fold cannot be fitted, the in-sample scores are used and a
    :class:`CalibrationWarning` says so. :meth:`calibrate` (or
    :func:`skanomaly.calibrate` through a :class:`~sklearn.pipeline.Pipeline`) replaces
    ``offset_`` with the quantile of held-out normal samples.

    :meth:`fit_predict` labels the training samples from these same out-of-sample scores,
    so about ``contamination`` of them are flagged (as scikit-learn's
    :class:`~sklearn.neighbors.LocalOutlierFactor` without ``novelty`` does), whereas
    ``predict(X_train)`` after ``fit`` scores them in-sample, as any new data: in-sample
    scores are optimistic, so it usually flags fewer of them (none of the images whose
    patches PatchCore keeps in its memory bank).

    A sample's scores do not depend on the other samples scored with it, bitwise:
    scoring runs in blocks of a fixed number of samples (the last one padded), so
    every kernel call has the same shape whatever the batch.

    Input may be a numpy array, any array-like, or a torch tensor on any
    device; it is never modified. Read-only and memory-mapped arrays work.

    A :class:`dask.array.Array` is fitted on the dask workers (the current
    :class:`distributed.Client`, else dask's default scheduler) without gathering it:
    each block's partial state (as ``partial_fit`` keeps it) is tree-reduced with the
    same merges, and ``offset_`` comes from a second pass of out-of-sample scores per
    block: exact leave-one-out scores under the final state where the detector has them
    (``calibration_ == "leave-one-out"``, or ``"leave-one-image-out"`` for PatchCore),
    else ``"cross-fit"`` over ``min(5, n_blocks)`` folds of consecutive blocks. Scoring a
    dask array returns a dask array computed block by block (see the scaling guide).

    Examples
    --------
    A detector scoring the distance to the training mean:

    >>> import numpy as np
    >>> from skanomaly.base import BaseDetector
    >>> class MeanDistance(BaseDetector):
    ...     def _fit(self, X):
    ...         self.center_ = X.mean(0).cpu().numpy()
    ...     def _score(self, X):
    ...         return (X - self._device_tensor("center_", X.dtype)).norm(dim=1)
    >>> X = np.random.default_rng(0).normal(size=(50, 2))
    >>> MeanDistance(device="cpu").fit(X).predict([[0.0, 0.0], [8.0, 8.0]])
    array([ 1, -1])
    """

    _parameter_constraints: dict = {
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "device": [StrOptions(set(_DEVICE_NAMES)), str, torch.device],
    }

    #: number of dimensions of one sample accepted besides the 2-D (N, D) form
    _sample_ndim = 1
    #: folds of the cross-fitting that sets ``offset_`` when a detector has no cheaper
    #: out-of-sample scores
    _n_splits = 5
    #: whether scoring must run in fixed-shape blocks to be batch-invariant (False where
    #: the kernels are batch-invariant by themselves)
    _fixed_blocks = True
    #: magnitudes of input the kernels can represent (squares must neither overflow nor,
    #: for the whole data, underflow), and what is computed, for the error message
    _max_abs = math.inf
    _min_max_abs = 0.0
    _range_reason = ""
    #: private fitted attributes, dropped with the public ``*_`` ones when a fit starts
    _private_state: tuple = ("_device_cache", "_streaming_state_dropped", "_stale",
                             "_model_as_it_stood", "_buffer", "_last_batch")
    #: public fitted attributes that ``partial_fit`` leaves to the refresh (see finalize)
    _deferred: tuple = ()
    #: private fitted attributes that only ``partial_fit`` (and the merges of a dask fit)
    #: needs, not scoring: a model file leaves them out unless asked to keep them
    _streaming_state: tuple = ()

    def __init__(self, *, contamination=0.1, device="auto"):
        self.contamination = contamination
        self.device = device

    # ------------------------------------------------------------------ state
    def __sklearn_is_fitted__(self):
        # offset_ is set last in fit, so a fit that failed half-way is not "fitted"; a
        # partial_fit that deferred its refresh (see finalize) is fitted too
        return "offset_" in self.__dict__ or bool(self.__dict__.get("_stale"))

    def __getattr__(self, name):
        # called only where ordinary lookup fails: a fitted attribute that partial_fit
        # deferred is computed now (see finalize), so that it is never read stale
        if self.__dict__.get("_stale") and (
                name in self._deferred or name in ("offset_", "calibration_")
                or isinstance(getattr(type(self), name, None), property)):
            self._refresh()
        return object.__getattribute__(self, name)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_device_cache", None)
        # what partial_fit deferred travels as it is (a stream goes on after a round trip
        # exactly as without it), its batches as CPU numpy (a pickle loads anywhere)
        for name in ("_buffer", "_last_batch"):
            if name in state:
                state[name] = _on_host(state[name])
        return state

    def _refresh_if_stale(self) -> None:
        if self.__dict__.get("_stale"):
            self._refresh()

    def finalize(self):
        """Bring the model up to date with every batch passed to ``partial_fit``.

        ``partial_fit`` keeps only the cheap, mergeable state of each batch (moments,
        buffered patch features) and leaves the work that only the end needs (factors,
        memory-bank reduction, threshold) to the first call that reads the model:
        scoring (``score_samples``, ``decision_function``, ``predict``,
        ``anomaly_map``, ``score_and_map``, ``calibrate``, ...), a fitted attribute
        read, pickling, saving or exporting. ``finalize`` does it now; it is never
        needed for correct results (each detector's ``partial_fit`` says what the
        refresh computes). On a detector that is up to date it does nothing.

        Returns
        -------
        self : object
            The detector, with its fitted attributes and ``offset_`` up to date.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the detector is not fitted.
        ValueError
            If the model of the data seen cannot be computed (a singular covariance, a
            rank-deficient PCA: the errors each detector's ``partial_fit`` lists); the
            detector is then left as it was, still to be refreshed.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import GaussianDetector
        >>> X = np.random.default_rng(0).normal(size=(100, 3))
        >>> det = GaussianDetector(device="cpu")
        >>> for batch in np.array_split(X, 4):
        ...     det = det.partial_fit(batch)
        >>> det = det.finalize()
        >>> det.n_samples_seen_, det.calibration_
        (100, 'leave-one-out')
        """
        check_is_fitted(self)
        self._refresh_if_stale()
        return self

    def _refresh(self) -> None:
        """Compute what ``partial_fit`` deferred; the state is left as it was on error."""
        before = dict(self.__dict__)
        try:
            del self.__dict__["_stale"]  # what the refresh reads is its own work
            self._refresh_deferred()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        for name in ("_model_as_it_stood", "_buffer", "_last_batch"):
            self.__dict__.pop(name, None)

    def _refresh_deferred(self) -> None:  # pragma: no cover - by the streaming mixins
        raise NotImplementedError

    def _mark_stale(self, deferred) -> None:
        """Drop the fitted attributes ``deferred`` (and the threshold): they are computed
        again by the next refresh (see :meth:`finalize`)."""
        for name in (*deferred, "offset_", "calibration_", *_CALIBRATION_STATE):
            self.__dict__.pop(name, None)
        self._reset_device_cache()
        self._stale = True

    def _without_streaming_state(self):
        """This fitted detector without its ``_streaming_state``, for a compact model file.

        A new object sharing the fitted arrays (nothing is copied; ``self`` is left as it
        is); ``partial_fit`` on it raises a ``ValueError`` that says why. ``self`` itself
        when the detector keeps no streaming state.
        """
        self._refresh_if_stale()
        dropped = tuple(name for name in self._streaming_state if name in self.__dict__)
        if not dropped:
            return self
        out = object.__new__(type(self))
        out.__dict__.update({k: v for k, v in self.__dict__.items()
                             if k not in dropped and k != "_device_cache"})
        out._streaming_state_dropped = dropped
        out._reset_device_cache()
        return out

    def _check_streaming_state(self) -> None:
        """``ValueError`` if this fitted detector was saved without its streaming state."""
        dropped = self.__dict__.get("_streaming_state_dropped")
        if dropped:
            raise ValueError(
                f"{type(self).__name__} was saved without its streaming state (the "
                f"{', '.join(dropped)} that partial_fit updates), so partial_fit cannot "
                "continue it: save it with skanomaly.persistence.save_model(..., "
                "keep_streaming_state=True) (`skanomaly fit --keep-streaming-state`), or "
                "fit it again")

    def _cached(self, key, build):
        """``build()``, computed once per fit and kept out of pickles."""
        self._refresh_if_stale()  # a model read: brought up to date first
        cache = self.__dict__.setdefault("_device_cache", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _device_tensor(self, name: str, dtype=None) -> torch.Tensor:
        """Fitted numpy attribute ``name`` as a tensor on the fit device (cached)."""
        return self._cached((name, dtype), lambda: torch.as_tensor(
            np.asarray(getattr(self, name)), dtype=dtype, device=self._device()))

    def _reset_device_cache(self):
        # an (empty) cache exists from fit on, so that scoring does not add attributes
        self.__dict__["_device_cache"] = {}

    def _clear_fitted_state(self):
        """Drop every fitted attribute (public ``*_`` and ``_private_state``): unfitted."""
        for name in [k for k in self.__dict__
                     if (k.endswith("_") and not k.startswith("__"))
                     or k in self._private_state]:
            del self.__dict__[name]

    def _block_size(self) -> int:
        """Samples per fixed-shape scoring block: fixed by the fitted per-sample shape."""
        numbers = math.prod(self.input_shape_) or 1
        block = 1 << max(0, (_BLOCK_NUMBERS // numbers).bit_length() - 1)
        return min(max(block, _MIN_BLOCK), _MAX_BLOCK)

    def _blockwise(self, fn, X: torch.Tensor) -> torch.Tensor:
        """``fn(X)`` with a result per sample that does not depend on the batch."""
        if not self._fixed_blocks:
            return fn(X)
        return in_fixed_blocks(fn, X, self._block_size())

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    # ------------------------------------------------------------- validation
    def _validate_input(self, X, *, reset: bool) -> torch.Tensor:
        """Validate ``X`` and return it as a float tensor on the detector's device.

        2-D input is (n_samples, n_features); spatial detectors also take
        4-D feature maps (n_samples, C, H, W). The full per-sample shape seen in
        ``fit`` is checked at score time.
        """
        device = self._device()
        allowed = (2,) if self._sample_ndim == 1 else (2, 4)
        if isinstance(X, torch.Tensor):
            t = X.detach()
            if t.ndim not in allowed:
                raise ValueError(
                    f"Expected {' or '.join(map(str, allowed))}-D input, got a tensor of "
                    f"shape {tuple(t.shape)}"
                )
            if t.shape[0] == 0:
                raise ValueError(
                    f"Found array with 0 sample(s) (shape={tuple(t.shape)}) while a "
                    "minimum of 1 is required."
                )
            if t.is_complex():
                raise ValueError("Complex data not supported")
            if not t.is_floating_point() or t.dtype not in (torch.float32, torch.float64):
                t = t.to(torch.float64)
            t = t.to(device)
            if not all_finite(t):
                kind = "NaN" if bool(torch.isnan(t).any()) else "infinity"
                raise ValueError(f"Input X contains {kind}.")
            self._check_n_features_tensor(t, reset=reset)
        else:
            arr = validate_data(
                self,
                X,
                reset=reset,
                dtype=[np.float64, np.float32],
                allow_nd=self._sample_ndim > 1,
                ensure_min_samples=1,
            )
            if arr.ndim not in allowed:
                raise ValueError(
                    f"Expected {' or '.join(map(str, allowed))}-D input, got shape {arr.shape}"
                )
            t = torch.from_numpy(np.array(arr, copy=True) if not arr.flags.writeable else arr)
            t = t.to(device)
        if self._sample_ndim > 1 and t.ndim == 2:
            t = t[:, :, None, None]
        sample_shape = tuple(t.shape[1:])
        empty = [name for name, size in zip(("feature/channel", "height", "width"),
                                            sample_shape) if size == 0]
        if empty:
            raise ValueError(f"X has an empty {' and '.join(empty)} axis (shape "
                             f"{tuple(t.shape)}): there is nothing to model")
        self._check_range(t, fit=reset)
        if reset:
            self.input_shape_ = sample_shape
        elif sample_shape != tuple(self.input_shape_):
            raise ValueError(
                f"X has per-sample shape {sample_shape}, but {type(self).__name__} was "
                f"fitted on shape {tuple(self.input_shape_)}"
            )
        return t

    def _check_range(self, t: torch.Tensor, *, fit: bool) -> None:
        """``ValueError`` if the magnitude of ``X`` is beyond what the detector computes with.

        Too large: at fit and score time. Too small (the whole data, so that the squares
        underflow and the model degenerates): at fit time only; a query near 0 is fine.
        """
        if t.numel() == 0 or (self._max_abs == math.inf and self._min_max_abs == 0.0):
            return
        low, high = torch.aminmax(t)  # a reduction: no |X|-sized temporary
        largest = max(-float(low), float(high))
        if largest > self._max_abs:
            raise ValueError(
                f"X holds values up to {largest:.3g}: {type(self).__name__} computes "
                f"{self._range_reason}, which overflows beyond {self._max_abs:.0e}; rescale "
                "the features (e.g. with sklearn.preprocessing.StandardScaler)")
        if fit and 0.0 < largest < self._min_max_abs:
            raise ValueError(
                f"X holds values of at most {largest:.3g}: {type(self).__name__} computes "
                f"{self._range_reason}, which underflow below {self._min_max_abs:.0e}; "
                "rescale the features (e.g. with sklearn.preprocessing.StandardScaler)")

    def _check_n_features_tensor(self, t: torch.Tensor, *, reset: bool) -> None:
        n_features = int(t.shape[1])
        if reset:
            self.n_features_in_ = n_features
            self.__dict__.pop("feature_names_in_", None)
        elif n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    def _check_min_samples(self, X: torch.Tensor, minimum: int) -> None:
        if X.shape[0] < minimum:
            raise ValueError(
                f"{type(self).__name__} needs at least {minimum} samples to fit, "
                f"got n_samples = {X.shape[0]}"
            )

    # ------------------------------------------------------------ public API
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the detector on (mostly) normal samples.

        Sets ``offset_`` from out-of-sample scores of the training samples (see the
        class Notes), so that ``predict`` flags about ``contamination`` of new normal
        samples. A fit that raises leaves the estimator unfitted.

        Parameters
        ----------
        X : array-like, torch.Tensor or dask.array.Array of shape (n_samples, n_features)
            Training samples (spatial detectors also take (n_samples, C, H, W)). A dask
            array is fitted on the dask workers, block by block (see the class Notes).
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : object
            The fitted detector.
        """
        self._clear_fitted_state()
        try:
            if is_dask_array(X):  # fitted on the dask workers: see skanomaly/_dask.py
                from ._dask import fit_dask
                return fit_dask(self, X)
            self._reset_device_cache()
            Xt = self._validate_input(X, reset=True)
            self._fit(Xt)
            self._set_offset(*self._out_of_sample_scores(Xt))
        except BaseException:
            self._clear_fitted_state()
            raise
        return self

    def _fit_features(self, X: torch.Tensor, input_shape) -> BaseDetector:
        """``fit`` on features a pipeline's extractor computed on the device: ``X`` holds
        the channels of :meth:`_fit_channels` (all when None) of input of per-sample
        shape ``input_shape``. Finite by the extractor's check; the detector's own
        parameter, range and sample checks run here.
        """
        self._validate_params()
        self._clear_fitted_state()
        try:
            self._reset_device_cache()
            self._check_range(X, fit=True)
            self.input_shape_ = tuple(int(s) for s in input_shape)
            self.n_features_in_ = self.input_shape_[0]
            self._fit(X)
            self._set_offset(*self._out_of_sample_scores(X))
        except BaseException:
            self._clear_fitted_state()
            raise
        return self

    def _fit_channels(self, n_channels: int):
        """Sorted indices of the ``n_channels`` input channels that ``fit`` reads, or
        None (all): a pipeline's extractor computes only these (PaDiM's subset)."""
        return None

    def _input_channels(self):
        """Sorted indices of the input channels that scoring reads, or None (all)."""
        return None

    def _check_features(self, X: torch.Tensor) -> torch.Tensor:
        """Score-time checks of device features of a pipeline's extractor (finite by its
        check): per-sample shape, with only :meth:`_input_channels` present, and range."""
        channels = self._input_channels()
        expected = tuple(self.input_shape_)
        got = (expected[0] if channels is not None and X.shape[1] == len(channels)
               else int(X.shape[1]), *(int(s) for s in X.shape[2:]))
        if got != expected:
            raise ValueError(
                f"the feature extractor gives maps of per-sample shape {got}, but "
                f"{type(self).__name__} was fitted on shape {expected}: score images of "
                "the size the pipeline was fitted on")
        if self._range_can_fail(X.dtype):
            self._check_range(X, fit=False)
        return X

    def _range_can_fail(self, dtype: torch.dtype) -> bool:
        """Whether values of ``dtype`` can lie outside what the kernels represent."""
        info = torch.finfo(dtype)
        return info.max > self._max_abs or info.tiny < self._min_max_abs

    def _out_of_sample_scores(self, X: torch.Tensor):
        """Anomaly scores of the training samples ``X`` by models that did not see them.

        Returns ``(scores, method)``. The default is K-fold cross-fitting; detectors
        with exact leave-one-out scores override it.
        """
        return self._cross_fitted_scores(X)

    def _cross_fitted_scores(self, X: torch.Tensor):
        """``(scores, "cross-fit")``: each fold scored by a model fitted on the others."""
        n, k = X.shape[0], self._n_splits
        if n < 2 * k:
            return self._in_sample_scores(X, f"{n} samples are too few for {k}-fold "
                                             "cross-fitting")
        folds = torch.arange(n, device=X.device) % k
        held_out = [folds == fold for fold in range(k)]
        models = self._fold_models(X, held_out)
        scores = torch.empty(n, dtype=torch.float64, device=X.device)
        for held in held_out:
            try:
                model = next(models)
            except ValueError as exc:
                return self._in_sample_scores(X, f"a {k}-fold cross-fit failed ({exc})")
            scores[held] = model._score(X[held]).to(torch.float64)
        return scores, "cross-fit"

    def _fold_models(self, X: torch.Tensor, held_out):
        """Models fitted without each fold (boolean masks ``held_out``), one at a time."""
        for held in held_out:
            model = self._unfitted_copy()
            model._fit(X[~held])
            yield model

    def _unfitted_copy(self):
        """An unfitted clone that knows this fit's input shape (for models of folds)."""
        model = clone(self)
        model.__dict__.update(input_shape_=self.input_shape_,
                              n_features_in_=self.n_features_in_)
        return model

    def _in_sample_scores(self, X: torch.Tensor, why: str):
        warnings.warn(CalibrationWarning(
            f"{type(self).__name__}: {why}; offset_ is set from in-sample scores, which "
            "are optimistic: predict may flag more than `contamination` of new normal "
            "samples. Call calibrate(X_heldout) with normal samples not used in fit.",
            reason=why), stacklevel=_user_stacklevel())
        return self._score(X), "in-sample"

    def _per_image(self, anomaly_scores: torch.Tensor) -> torch.Tensor:
        """Anomaly scores of whole images from those of their tiles: the largest of each
        image's ``_tiles_per_image`` consecutive scores (an int, or one count per image
        for images of several sizes) while a tiled
        :class:`~skanomaly.AnomalyPipeline` fits this detector on tiles (its threshold
        is then per image, not per tile); unchanged otherwise."""
        tiles = self.__dict__.get("_tiles_per_image")
        if tiles is None or tiles == 1:
            return anomaly_scores
        return _per_image_reduce(anomaly_scores, tiles, "amax")

    def _set_offset(self, anomaly_scores: torch.Tensor, method: str) -> None:
        anomaly_scores = self._per_image(anomaly_scores)
        normality = -to_numpy(anomaly_scores).astype(np.float64)
        self.offset_ = _quantile_offset(normality, self.contamination)
        self.calibration_ = method
        for name in _CALIBRATION_STATE:  # the model they were set with is gone
            self.__dict__.pop(name, None)
        # the scores that set offset_, one per sample of the last fit, for fit_predict:
        # in the per-fit cache, so that they stay out of pickles
        self.__dict__.setdefault("_device_cache", {})["fit_normality"] = normality

    def fit_predict(self, X, y=None):
        """Fit on ``X`` and label its samples from their out-of-sample scores.

        The labels come from the scores that set ``offset_`` (see the class Notes:
        leave-one-out, leave-one-image-out or cross-fit), so about ``contamination``
        of the training samples are flagged, as scikit-learn's
        :class:`~sklearn.neighbors.LocalOutlierFactor` without ``novelty`` labels its
        training samples. ``fit(X).predict(X)`` differs: ``predict`` scores ``X``
        in-sample, like any new data, and in-sample scores are optimistic, so it
        usually flags fewer of the training samples.

        Parameters
        ----------
        X : array-like, torch.Tensor or dask.array.Array of shape (n_samples, n_features)
            Training samples, as in :meth:`fit`.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        labels : ndarray or torch.Tensor of shape (n_samples,), int
            -1 where the sample's out-of-sample score is below ``offset_``, else +1 (an
            int64 tensor on ``X``'s device for a tensor ``X``).

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import GaussianDetector
        >>> X = np.random.default_rng(0).normal(size=(200, 3))
        >>> det = GaussianDetector(contamination=0.1, device="cpu")
        >>> int((det.fit_predict(X) == -1).sum())  # 10 % of 200, leave-one-out scores
        20
        >>> det.calibration_
        'leave-one-out'
        >>> bool((det.predict(X) == -1).sum() <= 20)  # in-sample: fewer flagged
        True
        """
        self.fit(X, y)
        normality = self._device_cache.pop("fit_normality")
        labels = np.where(normality < self.offset_, -1, 1)
        return torch.from_numpy(labels).to(X.device) if isinstance(X, torch.Tensor) else labels

    def calibrate(self, X, y=None):
        """Set ``offset_`` from normal samples that were not used for fitting (conformal).

        With ``n`` held-out samples, ``alpha = contamination`` and
        ``k = ceil((1 - alpha) (n + 1))``, ``predict`` flags a sample whose anomaly score
        ``-score_samples`` exceeds the ``k``-th smallest anomaly score of ``X`` (split
        conformal prediction). If the held-out samples and a new normal sample are
        exchangeable (e.g. drawn independently from the same distribution, and not used
        in ``fit``), the new sample is flagged with probability at most ``alpha``, and
        at least ``alpha - 1 / (n + 1)`` when scores have no ties: a finite-sample
        guarantee, on average over the draw of the calibration set. With
        ``n < (1 - alpha) / alpha`` samples (``k > n``) no threshold gives it, and a
        ``ValueError`` says how many are needed. The scores are kept
        (``calibration_scores_``) for :meth:`pvalues`. Through a
        :class:`~sklearn.pipeline.Pipeline`, use :func:`skanomaly.calibrate`.

        With labels ``y`` (+1 normal, -1 anomalous), ``offset_`` is instead the threshold
        that maximises F1 (anomalies the positive class) on ``X``: anomalib's adaptive
        threshold. Chosen on these very samples, its F1 is optimistic for new data and it
        carries no false-alarm guarantee; the normal samples among them become the
        ``calibration_scores_`` of :meth:`pvalues` (valid p-values, as the threshold
        does not enter them).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out normal samples (or, with ``y``, labelled validation samples), shaped
            as in ``fit``.
        y : array-like of shape (n_samples,) or None, default=None
            None: ``X`` is normal, the conformal threshold. Else +1 / -1 labels, at least
            one -1: the F1-maximising threshold; a sample is flagged when its anomaly
            score is at least the chosen one.

        Returns
        -------
        self : object
            The detector, with ``offset_``, ``calibration_`` (``"held-out"``, or
            ``"labelled-f1"`` with ``y``) and ``calibration_scores_`` updated.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the detector is not fitted.
        ValueError
            If ``X`` is invalid (see :meth:`score_samples`), has fewer than
            ``(1 - contamination) / contamination`` samples (without ``y``), or ``y`` is
            not one +1 / -1 label per sample with at least one -1.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import GaussianDetector
        >>> rng = np.random.default_rng(0)
        >>> det = GaussianDetector(contamination=0.2, device="cpu").fit(rng.normal(size=(100, 2)))
        >>> det = det.calibrate(rng.normal(size=(1000, 2)))
        >>> bool(abs((det.predict(rng.normal(size=(5000, 2))) == -1).mean() - 0.2) < 0.03)
        True
        """
        if y is not None:
            return self._calibrate_labelled(X, y)
        return self._set_held_out_offset(self.score_samples(X))

    def _set_held_out_offset(self, normality):
        """Conformal ``offset_`` from normality scores (numpy or tensor) of held-out
        normal samples (see :meth:`calibrate`)."""
        if isinstance(normality, torch.Tensor):  # the scores alone come to the host
            normality = to_numpy(normality)
        offset, scores = _conformal_offset(normality, self.contamination)
        if offset == -math.inf:
            raise ValueError(
                f"{type(self).__name__}: X has {scores.shape[0]} held-out sample(s), too few "
                f"for a conformal threshold at contamination={self.contamination:g}: it "
                f"needs at least {conformal_min_samples(self.contamination)} (the threshold "
                "is the ceil((1 - contamination)(n + 1))-th smallest of n anomaly scores); "
                "give more held-out normal samples or a larger contamination")
        self.offset_ = offset
        self.calibration_ = "held-out"
        self.calibration_scores_ = scores
        return self

    def _calibrate_labelled(self, X, y):
        return self._set_labelled_offset(self.score_samples(X), y)

    def _set_labelled_offset(self, normality, y):
        """F1-maximising ``offset_`` from normality scores and +1/-1 labels ``y``."""
        if isinstance(normality, torch.Tensor):  # the scores alone come to the host
            normality = to_numpy(normality)
        anomalous = _check_labels(y, normality.shape[0])
        best = _f1_max_threshold(-_finite_normality(normality), anomalous)
        # flagged where the anomaly score is >= best: normality <= -best < offset_
        self.offset_ = float(np.nextafter(-best, np.inf))
        self.calibration_ = "labelled-f1"
        if anomalous.all():
            self.__dict__.pop("calibration_scores_", None)
        else:
            self.calibration_scores_ = np.sort(_finite_normality(normality[~anomalous]))
        return self

    def pvalues(self, X):
        """Conformal p-value of normality of each sample, from the calibration scores.

        ``p(x) = (1 + #{i : s_i <= s(x)}) / (n + 1)`` with ``s = score_samples`` and
        ``s_i`` the ``n`` scores of the held-out normals of :meth:`calibrate`: the share
        of calibration samples at least as anomalous as ``x``, counting ``x`` itself.
        Small p-values are evidence of an anomaly. For a new normal sample exchangeable
        with the calibration samples, ``P(p(x) <= t) <= t`` for every ``t`` in [0, 1]
        (the p-value is valid; without ties it is uniform on ``{1/(n+1), ..., 1}``), so
        p-values can be thresholded at any level later, ranked, or combined over a batch
        (e.g. the Benjamini-Hochberg procedure, :func:`scipy.stats.false_discovery_control`).
        ``predict(X) == -1`` exactly where ``pvalues(X) <= contamination`` when scores
        have no ties.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Samples shaped as in ``fit``.

        Returns
        -------
        pvalues : ndarray of shape (n_samples,), float64
            In ``[1 / (n + 1), 1]``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the detector is not fitted, or was not calibrated on held-out samples
            (or was refitted or updated since).

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import GaussianDetector
        >>> rng = np.random.default_rng(0)
        >>> det = GaussianDetector(device="cpu").fit(rng.normal(size=(200, 2)))
        >>> det = det.calibrate(rng.normal(size=(99, 2)))
        >>> det.pvalues([[0.0, 0.0], [5.0, 5.0]])
        array([1.  , 0.01])
        >>> p = det.pvalues(rng.normal(size=(5000, 2)))  # new normals: uniform p-values
        >>> bool(abs((p <= 0.1).mean() - 0.1) < 0.05)
        True
        """
        from sklearn.exceptions import NotFittedError

        check_is_fitted(self)
        if "calibration_scores_" not in self.__dict__:
            raise NotFittedError(
                f"{type(self).__name__} has no calibration scores for p-values: call "
                "calibrate(X_heldout) with normal samples not used in fit first (a fit or "
                "partial_fit since the last calibrate removes them)")
        scores = self.score_samples(X)
        if is_dask_array(scores):
            return scores.map_blocks(self._pvalues_of, dtype=np.float64)
        if isinstance(scores, torch.Tensor):  # a tensor out, on X's device
            return torch.from_numpy(self._pvalues_of(to_numpy(scores))).to(scores.device)
        return self._pvalues_of(scores)

    def _pvalues_of(self, normality: np.ndarray) -> np.ndarray:
        reference = self.calibration_scores_
        normality = np.asarray(normality, dtype=np.float64)
        # an overflow (-inf) ranks below every calibration score
        at_most = np.searchsorted(reference, np.where(np.isfinite(normality), normality,
                                                      -np.inf), side="right")
        return (1.0 + at_most) / (reference.shape[0] + 1.0)

    def score_samples(self, X):
        """Normality score of each sample: higher means more normal.

        Parameters
        ----------
        X : array-like, torch.Tensor or dask.array.Array of shape (n_samples, n_features)
            Samples to score, shaped as in ``fit``.

        Returns
        -------
        scores : ndarray or torch.Tensor of shape (n_samples,), float64
            The negated anomaly score of each sample: a tensor on ``X``'s device for a
            tensor ``X`` (scikit-learn's Array API convention), a dask array computed
            block by block for a dask ``X``, else a numpy array. So for
            ``decision_function`` and ``predict``.
        """
        check_is_fitted(self)
        if is_dask_array(X):  # a dask array, scored block by block
            from ._dask import map_samples
            return map_samples(self, "score_samples", X, (), np.float64)
        Xt = self._validate_input(X, reset=False)
        return _like_input(X, -self._blockwise(self._score, Xt).to(torch.float64))

    def decision_function(self, X):
        """Shifted normality score: negative for outliers, positive for inliers.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Samples to score.

        Returns
        -------
        decision : ndarray or torch.Tensor of shape (n_samples,), float64
            ``score_samples(X) - offset_`` (a tensor on ``X``'s device for a tensor ``X``).
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """Label each sample as inlier (+1) or outlier (-1).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Samples to label.

        Returns
        -------
        labels : ndarray or torch.Tensor of shape (n_samples,), int
            +1 where ``decision_function(X) >= 0``, else -1 (an int64 tensor on ``X``'s
            device for a tensor ``X``).
        """
        return _predict_labels(self.decision_function(X))

    # ------------------------------------------------------ fitted modules
    def _torch_module(self, device=None, dtype=torch.float64) -> torch.nn.Module:
        """The fitted scoring as an eval-mode :class:`torch.nn.Module` (cached).

        Built once per ``(device, dtype)`` by ``_build_torch_module`` from the fitted
        numpy attributes and kept in the private per-fit cache (never pickled).

        The module's contract, which :mod:`skanomaly.export` composes and exports:

        - ``forward(x)`` takes one tensor shaped as the validated input of
          ``score_samples`` ((n_samples, n_features) for 1-D samples, (n_samples, C,
          H, W) for spatial ones), any float dtype; it casts ``x`` to ``dtype`` and
          computes there.
        - It returns the anomaly scores ``-score_samples(x)``, shape (n_samples,),
          and, for spatial detectors (:class:`BaseSpatialDetector`), also the maps
          ``anomaly_map(x)`` at feature resolution, shape (n_samples, H, W): a tuple
          ``(scores, maps)``. Both in ``dtype``.
        - It is traceable by ``torch.jit.trace`` and by the TorchScript-based ONNX
          exporter (opset 17) with a dynamic batch axis: no Python control flow on
          tensor values, no ``.item()``, no numpy, only shapes read from ``x``.
        - It does not validate ``x`` (the estimator did); its buffers are the only
          state.
        """
        check_is_fitted(self)
        dev = self._device() if device is None else resolve_device(device)
        return self._scoring_module(dev, dtype)

    def _scoring_module(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """:meth:`_torch_module` without the fitted check: for the scoring hot paths,
        which also run inside ``fit`` (before ``offset_`` exists) and on cross-fit folds."""
        return self._cached(("torch_module", str(device), dtype),
                            lambda: self._build_torch_module(device, dtype).eval())

    def _build_torch_module(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        raise NotImplementedError(  # pragma: no cover - implemented by every detector
            f"{type(self).__name__} has no fitted torch module")

    # --------------------------------------------------------- to implement
    def _fit(self, X: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class IncrementalMixin:
    """``fit`` and ``partial_fit`` over one ``_accumulate(X, reset, incremental)`` step.

    The streaming machinery of the moment-based detectors (the Gaussian detector and
    PaDiM), public to the package so that both take it from here.

    ``_accumulate`` folds a validated batch into the fitted state (starting afresh when
    ``reset``; ``incremental`` when called by ``partial_fit``, so the state must stay
    updatable), refreshes the model and leaves the state unchanged if it raises.
    """

    def _fit(self, X: torch.Tensor) -> None:
        self._accumulate(X, reset=True, incremental=False)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the detector with one more batch of (mostly) normal samples.

        On an unfitted detector the batch starts the model, as ``fit(X)``. Later calls
        (after ``fit`` too) add it to the moments accumulated so far and defer the rest:
        the factors and ``offset_`` (from the leave-one-out scores of the batch passed
        last under the updated model, see the class Notes) are computed once, by the
        first read of the model (scoring, a fitted attribute, saving, exporting) or
        :meth:`finalize`, exactly as an eager refresh after the last batch would
        compute them; the batch passed last is kept until then. ``fit(X)`` equals
        ``partial_fit`` over any split of ``X`` into batches up to float64 rounding.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            A batch shaped like the training data (the first batch fixes the shape).
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : object
            The updated detector.

        Raises
        ------
        ValueError
            If the batch does not match the shape of earlier batches or holds NaN or
            infinity, if the first batch has fewer than 2 samples, if the updated
            covariance is singular, or if the detector's parameters do not allow
            incremental fitting (PaDiM's ``solver="woodbury"``), or if the detector was
            loaded from a model file saved without its streaming state (the moments). The
            fitted state is then left as it was. A later batch's covariance is factored
            by the refresh, which raises there (and stays pending) if it is singular.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import GaussianDetector
        >>> X = np.random.default_rng(0).normal(size=(100, 3))
        >>> det = GaussianDetector(device="cpu")
        >>> for batch in np.array_split(X, 4):
        ...     det = det.partial_fit(batch)
        >>> whole = GaussianDetector(device="cpu").fit(X)
        >>> det.n_samples_seen_, bool(np.allclose(det.covariance_, whole.covariance_))
        (100, True)
        """
        first = not hasattr(self, "n_samples_seen_")
        if not first:
            self._check_streaming_state()
        Xt = self._validate_input(X, reset=first)
        if first:  # the batch starts the model: as fit, refreshed at once
            self._accumulate(Xt, reset=True, incremental=True)
            self._set_offset(*self._out_of_sample_scores(Xt))
            return self
        self._accumulate(Xt, reset=False, incremental=True, refresh=False)
        self._mark_stale(self._deferred)
        # the leave-one-out scores of the threshold need the batch passed last
        self._last_batch = Xt.clone() if _shares_memory(X, Xt) else Xt
        return self

    def _refresh_deferred(self) -> None:
        """The factors of the moments and ``offset_`` from the leave-one-out scores of
        the batch passed last, exactly as an eager refresh after that batch."""
        self._refresh_factors()
        last = torch.as_tensor(self._last_batch, device=self._device())
        self._set_offset(*self._out_of_sample_scores(last))

    def _out_of_sample_scores(self, X: torch.Tensor):
        """Exact leave-one-out scores of training samples ``X`` from the moments."""
        if self.n_samples_seen_ < self._loo_ddof + 2:
            return self._in_sample_scores(
                X, f"{self.n_samples_seen_} samples are too few for leave-one-out scores")
        try:
            return self._leave_one_out(X), "leave-one-out"
        except ValueError as exc:
            if X.shape[0] == self.n_samples_seen_:  # X is the whole training set
                return self._cross_fitted_scores(X)
            return self._in_sample_scores(X, f"no leave-one-out scores ({exc})")


class ScoreThenUpdateMixin:
    """``partial_fit`` for detectors without cheap leave-one-out scores (PatchCore, DFM,
    DFKDE): the first call fits; each later batch is scored by the model as it stood
    (which has not seen it), then its cheap state is kept (``_buffer_batch``), and
    ``offset_`` is the ``contamination`` quantile of a bounded record of the latest
    out-of-sample scores.

    Deferred refresh: the model is rebuilt from the buffered batches
    (``_refresh_model``) only when the buffer is full (``_buffer_full``) or the model
    is read (see :meth:`~BaseDetector.finalize`); until then later batches are scored
    by the model of the last refresh, kept as ``_model_as_it_stood``. A call that
    raises leaves the fitted state as it was.
    """

    def _stream(self, X):
        before = dict(self.__dict__)
        try:
            if not self.__sklearn_is_fitted__():
                self._clear_fitted_state()
                self._reset_device_cache()
                Xt = self._validate_input(X, reset=True)
                self._fit(Xt)
                self._set_offset(*self._out_of_sample_scores(Xt))
            else:
                self._check_streaming_state()
                Xt = self._validate_input(X, reset=False)
                self._check_streamed_batch()
                model = self.__dict__.get("_model_as_it_stood", self)
                # scored by a model that has not seen X: the last one refreshed; in
                # fixed blocks no larger than the batch (for the threshold only: equal to
                # score_samples up to rounding, without padding a small batch to a block)
                block = 1 << (Xt.shape[0] - 1).bit_length()
                scores = (in_fixed_blocks(model._score, Xt, min(block, model._block_size()))
                          if model._fixed_blocks else model._score(Xt))
                n_model = model.n_samples_seen_
                if model is self:  # the model as it stands scores the batches to come
                    self._model_as_it_stood = self._snapshot()
                    self._mark_stale(self._deferred)
                    self._buffer = []
                self._buffer_batch(Xt)
                self._record_scores(scores, n_model)
                if self._buffer_full():
                    self._refresh()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        return self

    def _snapshot(self):
        """This fitted model as it stands, sharing its arrays and its device cache."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    def _refresh_deferred(self) -> None:
        """The model from the buffered batches, and ``offset_`` from the record."""
        self._refresh_model()
        record = self._offset_record
        self.offset_ = _quantile_offset(-record[:, 0], self.contamination)
        self.calibration_ = "score-then-update"

    def _check_streamed_batch(self) -> None:
        """Checks of the fitted state before a later batch is scored (none by default)."""

    def _set_offset(self, anomaly_scores: torch.Tensor, method: str) -> None:
        super()._set_offset(anomaly_scores, method)
        record = _score_record(self._per_image(anomaly_scores), self.n_samples_seen_)
        # in-sample scores are optimistic: a stream does not build on them
        self._offset_record = record[:0] if method == "in-sample" else record[-_OFFSET_RECORD:]

    def _record_scores(self, anomaly_scores: torch.Tensor, n_model: int) -> None:
        """Add a batch's out-of-sample scores to the record that sets ``offset_``.

        ``n_model``: samples seen by the model that scored the batch. Scores of models
        that had seen fewer than half as many are dropped (they are too pessimistic);
        the latest 2,048 are kept.
        """
        old = self._offset_record
        self._offset_record = np.concatenate([old[old[:, 1] >= n_model / 2], _score_record(
            self._per_image(anomaly_scores), n_model)])[-_OFFSET_RECORD:]


class BaseSpatialDetector(BaseDetector):
    """Base class of detectors over feature maps (PaDiM, PatchCore, DFM).

    Input is (n_samples, C, H, W); 2-D input (n_samples, D) is read as
    (n_samples, D, 1, 1). Subclasses implement ``_anomaly_map(X)`` returning
    (n_samples, H, W) per-position anomaly scores; the image anomaly score is
    the maximum of the map unless ``_score`` is overridden.

    Parameters
    ----------
    contamination : float in (0, 0.5], default=0.1
        As in :class:`BaseDetector`.
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        As in :class:`BaseDetector`.

    Examples
    --------
    A detector mapping the distance of each position's features to their mean:

    >>> import numpy as np
    >>> from skanomaly.base import BaseSpatialDetector
    >>> class MapDistance(BaseSpatialDetector):
    ...     def _fit(self, X):
    ...         self.center_ = X.mean(0).cpu().numpy()
    ...     def _anomaly_map(self, X):
    ...         return (X - self._device_tensor("center_", X.dtype)).norm(dim=1)
    >>> X = np.random.default_rng(0).normal(size=(20, 3, 4, 4))
    >>> det = MapDistance(device="cpu").fit(X)
    >>> det.anomaly_map(X[:2]).shape, det.anomaly_map(X[:2], output_size=16).shape
    ((2, 4, 4), (2, 16, 16))
    """

    _sample_ndim = 3

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return self._anomaly_map(X).flatten(1).amax(dim=1)

    def anomaly_map(self, X, output_size=None, sigma=4.0):
        """Per-position anomaly scores, optionally upsampled and blurred.

        Parameters
        ----------
        X : array-like, torch.Tensor or dask.array.Array of shape (n_samples, C, H, W)
            Feature maps shaped as in ``fit`` (a dask array gives a dask array).
        output_size : int or (int, int), optional
            Image size (height, width) in pixels. When given, the map is
            upsampled bilinearly to it and blurred with a Gaussian of standard
            deviation ``sigma`` pixels, as anomalib's ``AnomalyMapGenerator``.
        sigma : float, default=4.0
            Blur standard deviation in output pixels; used only with ``output_size``.

        Returns
        -------
        maps : ndarray or torch.Tensor of shape (n_samples, H, W) or (n_samples, height, width)
            Higher = more anomalous; float64, a tensor on ``X``'s device for a tensor
            ``X``.
        """
        check_is_fitted(self)
        if is_dask_array(X):  # a dask array, mapped block by block
            from ._dask import map_samples, map_shape
            return map_samples(self, "anomaly_map", X, map_shape(self, output_size),
                               np.float64, output_size=output_size, sigma=sigma)
        Xt = self._validate_input(X, reset=False)
        post = self._map_postprocess(output_size, sigma)
        return _like_input(X, self._blockwise(lambda x: post(self._anomaly_map(x)), Xt))

    def score_and_map(self, X, output_size=None, sigma=4.0):
        """``score_samples(X)`` and ``anomaly_map(X, output_size, sigma)`` from one pass.

        The detector's scoring runs once per block of samples and gives both results,
        as anomalib's torch models return ``pred_score`` and ``anomaly_map`` from one
        forward; each equals what its own method returns, bitwise.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, C, H, W)
            Feature maps shaped as in ``fit``.
        output_size : int or (int, int), optional
            Map size (height, width) in pixels, as in :meth:`anomaly_map`.
        sigma : float, default=4.0
            Blur standard deviation in output pixels; used only with ``output_size``.

        Returns
        -------
        scores : ndarray or torch.Tensor of shape (n_samples,), float64
            Higher = more normal (:meth:`score_samples`).
        maps : ndarray or torch.Tensor of shape (n_samples, H, W) or (n_samples, height, width)
            Higher = more anomalous (:meth:`anomaly_map`), float64. Both are tensors on
            ``X``'s device for a tensor ``X``, else numpy arrays.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the detector is not fitted.
        ValueError
            If ``X`` is invalid (see :meth:`score_samples`), or ``output_size`` or
            ``sigma`` is (see :func:`~skanomaly.anomaly_map.postprocess_anomaly_map`).

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import PaDiMDetector
        >>> X = np.random.default_rng(0).normal(size=(30, 6, 4, 4))
        >>> det = PaDiMDetector(random_state=0, device="cpu").fit(X)
        >>> scores, maps = det.score_and_map(X[:3], output_size=16)
        >>> scores.shape, maps.shape
        ((3,), (3, 16, 16))
        >>> bool((scores == det.score_samples(X[:3])).all())
        True
        """
        check_is_fitted(self)
        Xt = self._validate_input(X, reset=False)
        scores, maps = self._score_and_map_blockwise(Xt, output_size, sigma)
        return _like_input(X, scores), _like_input(X, maps)

    def _score_and_map_blockwise(self, Xt: torch.Tensor, output_size, sigma):
        """(normality scores, maps) of validated ``Xt`` in fixed-shape blocks."""
        post = self._map_postprocess(output_size, sigma)
        n_scores = Xt.shape[0]

        def both(x):
            scores, maps = self._score_and_map(x)
            # one tensor per block, so that _blockwise keeps both batch-invariant
            return torch.cat([scores.to(torch.float64)[:, None],
                              post(maps).to(torch.float64).flatten(1)], dim=1)

        out = self._blockwise(both, Xt)
        maps = out[:, 1:].reshape(n_scores, *self._map_shape(Xt, output_size))
        return -out[:, 0], maps

    @staticmethod
    def _map_shape(Xt: torch.Tensor, output_size):
        if output_size is None:
            return tuple(Xt.shape[2:])
        return (output_size, output_size) if isinstance(output_size, Integral) else tuple(
            int(s) for s in output_size)

    @staticmethod
    def _map_postprocess(output_size, sigma):
        """maps -> maps at ``output_size`` (upsampled and blurred), or unchanged for None."""
        from .anomaly_map import postprocess_anomaly_map

        if output_size is None:
            return lambda maps: maps
        return lambda maps: postprocess_anomaly_map(maps, output_size, sigma=sigma)

    def _score_and_map(self, X: torch.Tensor):
        """(anomaly scores (n,), maps (n, H, W)) of validated ``X``: both from one pass
        where the detector overrides this; by default ``_score`` and ``_anomaly_map``."""
        return self._score(X), self._anomaly_map(X)

    def calibrate_pixels(self, X, masks=None, *, output_size=None, sigma=4.0):
        """Set the pixel threshold of :meth:`predict_mask` from validation maps.

        With ``masks`` (True on anomalous pixels), ``pixel_threshold_`` maximises F1 over
        all pixels of ``anomaly_map(X)`` (anomalib's adaptive pixel threshold; optimistic
        on these very images). Without, ``X`` is normal and the threshold is the
        conformal ``contamination`` quantile of its pixels' anomaly scores: with ``N``
        pixels, the ``ceil((1 - contamination)(N + 1))``-th smallest, so that a pixel of
        a new normal image is predicted anomalous with probability at most
        ``contamination`` if it is exchangeable with those pixels (pixels of one image
        are dependent, so this holds on average over images, not image by image).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, C, H, W)
            Validation feature maps, shaped as in ``fit``.
        masks : array-like of bool of shape (n_samples, height, width), optional
            Ground truth (non-zero = anomalous); the maps are computed at its size
            (upsampled and blurred, unless it is the feature resolution).
        output_size : int or (int, int), optional
            Without ``masks``: the map size in pixels, as in :meth:`anomaly_map` (None:
            the feature resolution).
        sigma : float, default=4.0
            Blur of upsampled maps, as in :meth:`anomaly_map`.

        Returns
        -------
        self : object
            With ``pixel_threshold_`` (on the map: a pixel is anomalous where the map
            exceeds it), ``pixel_calibration_`` (``"labelled-f1"`` or ``"held-out"``),
            ``pixel_map_size_`` and ``pixel_sigma_`` (the map settings that
            :meth:`predict_mask` reuses). A later ``fit`` or ``partial_fit`` removes them.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the detector is not fitted.
        ValueError
            If ``masks`` does not have one (height, width) mask per sample, or marks no
            anomalous pixel.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import PaDiMDetector
        >>> rng = np.random.default_rng(0)
        >>> det = PaDiMDetector(n_features=4, random_state=0, device="cpu")
        >>> det = det.fit(rng.normal(size=(40, 6, 4, 4)))
        >>> X_val = rng.normal(size=(10, 6, 4, 4))
        >>> masks = np.zeros((10, 4, 4), bool)
        >>> X_val[:5, :, 1, 2] += 8.0
        >>> masks[:5, 1, 2] = True
        >>> det = det.calibrate_pixels(X_val, masks)
        >>> bool((det.predict_mask(X_val) == masks).all())
        True
        """
        check_is_fitted(self)
        if masks is not None:
            truth = np.asarray(masks).astype(bool)
            if truth.ndim != 3:
                raise ValueError(f"masks must be (n_samples, height, width), got shape "
                                 f"{truth.shape}")
            size = tuple(truth.shape[1:])  # masks at the feature resolution: the raw map
            output_size = None if size == tuple(self.input_shape_[1:]) else size
        maps = self.anomaly_map(X, output_size=output_size, sigma=sigma)
        return self._set_pixel_threshold(maps, truth if masks is not None else None,
                                         output_size, sigma)

    def _set_pixel_threshold(self, maps, truth, output_size, sigma):
        """:meth:`calibrate_pixels` on computed ``maps`` (numpy or tensor) and masks
        ``truth`` (bool numpy, or None for normal images)."""
        if isinstance(maps, torch.Tensor):  # the maps come to the host for the threshold
            maps = to_numpy(maps)
        if truth is not None:
            if truth.shape != maps.shape:
                raise ValueError(f"masks have shape {truth.shape}, but X gives "
                                 f"{maps.shape[0]} maps of {maps.shape[1:]}")
            if not truth.any():
                raise ValueError("masks mark no anomalous pixel: an F1-maximising "
                                 "threshold needs some; for normal images only call "
                                 "calibrate_pixels(X) without masks (conformal)")
            best = _f1_max_threshold(maps.ravel(), truth.ravel())
            threshold, method = float(np.nextafter(best, -np.inf)), "labelled-f1"
        else:
            pixels = np.sort(maps.ravel())
            k = _conformal_rank(pixels.size, self.contamination)
            if k > pixels.size:
                raise ValueError(
                    f"{pixels.size} pixels are too few for a conformal pixel threshold at "
                    f"contamination={self.contamination:g}: it needs at least "
                    f"{conformal_min_samples(self.contamination)}")
            threshold, method = float(pixels[k - 1]), "held-out"
        self.pixel_threshold_ = threshold
        self.pixel_calibration_ = method
        self.pixel_map_size_ = None if output_size is None else tuple(maps.shape[1:])
        self.pixel_sigma_ = float(sigma)
        return self

    def predict_mask(self, X):
        """Predicted anomalous pixels: ``anomaly_map(X) > pixel_threshold_``.

        The maps are computed with the size and blur of :meth:`calibrate_pixels`.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, C, H, W)
            Feature maps shaped as in ``fit``.

        Returns
        -------
        masks : ndarray of bool of shape (n_samples, height, width)
            True on pixels predicted anomalous.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the detector is not fitted or has no pixel threshold
            (:meth:`calibrate_pixels`).

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import PaDiMDetector
        >>> rng = np.random.default_rng(0)
        >>> det = PaDiMDetector(contamination=0.05, random_state=0, device="cpu")
        >>> det = det.fit(rng.normal(size=(40, 4, 3, 3)))
        >>> det = det.calibrate_pixels(rng.normal(size=(30, 4, 3, 3)))  # normal images
        >>> X = rng.normal(size=(2, 4, 3, 3))
        >>> X[0, :, 2, 2] += 10.0
        >>> det.predict_mask(X)[:, 2, 2]
        array([ True, False])
        """
        from sklearn.exceptions import NotFittedError

        check_is_fitted(self)
        if "pixel_threshold_" not in self.__dict__:
            raise NotFittedError(f"{type(self).__name__} has no pixel threshold: call "
                                 "calibrate_pixels(X_val, masks) or calibrate_pixels("
                                 "X_normal) first")
        maps = self.anomaly_map(X, output_size=self.pixel_map_size_, sigma=self.pixel_sigma_)
        return maps > self.pixel_threshold_

    def _anomaly_map(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
