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
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from sklearn_compat.utils.validation import validate_data
from ._dask import is_dask_array
from .functional._validation import all_finite

__all__ = [
    "CalibrationWarning",
    "BaseDetector",
    "BaseSpatialDetector",
    "calibrate",
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


def make_generator(random_state, device="cpu") -> torch.Generator:
    """Build a local :class:`torch.Generator` from a scikit-learn ``random_state``.

    Parameters
    ----------
    random_state : int, numpy.random.RandomState or None
        ``None`` seeds from fresh OS entropy (results vary between calls); an
        int gives reproducible draws; a ``RandomState`` instance supplies the
        seed by one draw of its own. The global RNGs of Python, numpy and torch
        are never read nor advanced.
    device : str or torch.device, default="cpu"
        Device of the generator (it must match the tensors it draws).

    Returns
    -------
    torch.Generator
        A seeded generator.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.base import make_generator
    >>> a = torch.rand(3, generator=make_generator(0))
    >>> b = torch.rand(3, generator=make_generator(0))
    >>> bool(torch.equal(a, b))
    True
    """
    gen = torch.Generator(device=device)
    if random_state is None:
        gen.seed()
    elif isinstance(random_state, Integral):
        gen.manual_seed(int(random_state))
    else:
        rs = check_random_state(random_state)
        gen.manual_seed(int(rs.randint(np.iinfo(np.int32).max)))
    return gen


class CalibrationWarning(UserWarning):
    """``fit`` could not take out-of-sample scores: ``offset_`` comes from in-sample ones.

    In-sample scores are optimistic, so ``predict`` may then flag more than
    ``contamination`` of new normal samples; :meth:`BaseDetector.calibrate` with held-out
    normal samples fixes the threshold. ``reason`` says why the fallback happened.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from skanomaly import DFMDetector
    >>> from skanomaly.base import CalibrationWarning
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     det = DFMDetector(device="cpu").fit(np.random.default_rng(0).normal(size=(4, 3)))
    >>> [issubclass(w.category, CalibrationWarning) for w in caught], det.calibration_
    ([True], 'in-sample')
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def _user_stacklevel() -> int:
    """Stack level of the first frame outside skanomaly and scikit-learn (for warnings)."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(here) or f"{os.sep}sklearn{os.sep}" in name):
            return level
        frame, level = frame.f_back, level + 1
    return level


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


#: out-of-sample anomaly scores that streaming keeps to set ``offset_`` (the latest ones)
_OFFSET_RECORD = 2048


def _score_record(anomaly_scores: torch.Tensor, n_model: int) -> np.ndarray:
    """Rows ``(anomaly score, samples seen by the model that scored it)``, float64."""
    scores = _to_numpy(anomaly_scores).astype(np.float64)
    return np.stack([scores, np.full_like(scores, n_model)], axis=1)


def _draw_seed(generator: torch.Generator) -> int:
    """A seed for the next call's generator, drawn from this one (reproducible streams)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def _in_fixed_blocks(fn, x: torch.Tensor, block: int) -> torch.Tensor:
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
    normality = np.asarray(normality, dtype=np.float64)
    finite = np.isfinite(normality)
    if not finite.all():
        if not finite.any():
            raise ValueError("every score used to set offset_ is infinite (an overflow: the "
                             "magnitude of X is too large for the detector's precision; "
                             "rescale the features)")
        low = normality[finite].min()
        normality = np.where(finite, normality, low - abs(low) - 1.0)
    return float(np.percentile(normality, 100.0 * contamination))


def calibrate(estimator, X, y=None):
    """Set the decision threshold of a fitted detector or pipeline from held-out normals.

    The last step of ``estimator`` (or ``estimator`` itself) must be a fitted skanomaly
    detector; the earlier steps of a :class:`~sklearn.pipeline.Pipeline` transform ``X``
    first. ``offset_`` becomes the ``contamination`` quantile of the held-out scores,
    so that ``predict`` flags about ``contamination`` of new normal samples.

    Parameters
    ----------
    estimator : fitted skanomaly detector or Pipeline ending in one
        Modified in place.
    X : array-like of shape (n_samples, ...)
        Normal samples that were not used for fitting, in the input format of
        ``estimator`` (images for a pipeline starting with a feature extractor).
    y : Ignored
        Not used, present for API consistency.

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
    from sklearn.pipeline import Pipeline

    detector = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    if not isinstance(detector, BaseDetector):
        raise TypeError(
            f"calibrate needs a skanomaly detector or a Pipeline ending in one, got "
            f"{type(detector).__name__}"
        )
    check_is_fitted(detector)
    Xt = X
    if isinstance(estimator, Pipeline) and len(estimator) > 1:
        Xt = estimator[:-1].transform(X)
    detector.calibrate(Xt)
    return estimator


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
        ``"held-out"`` (:meth:`calibrate`), ``"score-then-update"`` (``partial_fit`` of
        detectors without cheap leave-one-out scores: each batch scored before it is
        absorbed).

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
    _private_state: tuple = ("_device_cache",)

    def __init__(self, *, contamination=0.1, device="auto"):
        self.contamination = contamination
        self.device = device

    # ------------------------------------------------------------------ state
    def __sklearn_is_fitted__(self):
        # offset_ is set last in fit, so a fit that failed half-way is not "fitted"
        return hasattr(self, "offset_")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_device_cache", None)
        return state

    def _cached(self, key, build):
        """``build()``, computed once per fit and kept out of pickles."""
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
        return _in_fixed_blocks(fn, X, self._block_size())

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
        scores = torch.empty(n, dtype=torch.float64, device=X.device)
        for fold in range(k):
            held = folds == fold
            model = clone(self)
            model.__dict__.update(input_shape_=self.input_shape_,
                                  n_features_in_=self.n_features_in_)
            try:
                model._fit(X[~held])
            except ValueError as exc:
                return self._in_sample_scores(X, f"a {k}-fold cross-fit failed ({exc})")
            scores[held] = model._score(X[held]).to(torch.float64)
        return scores, "cross-fit"

    def _in_sample_scores(self, X: torch.Tensor, why: str):
        warnings.warn(CalibrationWarning(
            f"{type(self).__name__}: {why}; offset_ is set from in-sample scores, which "
            "are optimistic: predict may flag more than `contamination` of new normal "
            "samples. Call calibrate(X_heldout) with normal samples not used in fit.",
            reason=why), stacklevel=_user_stacklevel())
        return self._score(X), "in-sample"

    def _set_offset(self, anomaly_scores: torch.Tensor, method: str) -> None:
        normality = -_to_numpy(anomaly_scores).astype(np.float64)
        self.offset_ = _quantile_offset(normality, self.contamination)
        self.calibration_ = method
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
        labels : ndarray of shape (n_samples,), int
            -1 where the sample's out-of-sample score is below ``offset_``, else +1.

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
        return np.where(normality < self.offset_, -1, 1)

    def calibrate(self, X, y=None):
        """Set ``offset_`` from normal samples that were not used for fitting.

        ``offset_`` becomes the ``contamination`` quantile of ``score_samples(X)``,
        so that ``predict`` flags about ``contamination`` of new normal samples like
        these. Through a :class:`~sklearn.pipeline.Pipeline`, use
        :func:`skanomaly.calibrate`.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out normal samples, shaped as in ``fit``.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : object
            The detector, with ``offset_`` and ``calibration_`` (``"held-out"``) updated.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the detector is not fitted.
        ValueError
            If ``X`` is invalid (see :meth:`score_samples`).

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
        normality = self.score_samples(X)
        self.offset_ = _quantile_offset(normality, self.contamination)
        self.calibration_ = "held-out"
        return self

    def score_samples(self, X):
        """Normality score of each sample: higher means more normal.

        Parameters
        ----------
        X : array-like, torch.Tensor or dask.array.Array of shape (n_samples, n_features)
            Samples to score, shaped as in ``fit``.

        Returns
        -------
        scores : ndarray of shape (n_samples,), float64
            The negated anomaly score of each sample (a dask array, computed block by
            block, for a dask ``X``; so for ``decision_function`` and ``predict``).
        """
        check_is_fitted(self)
        if is_dask_array(X):  # a dask array, scored block by block
            from ._dask import map_samples
            return map_samples(self, "score_samples", X, (), np.float64)
        Xt = self._validate_input(X, reset=False)
        return -_to_numpy(self._blockwise(self._score, Xt)).astype(np.float64)

    def decision_function(self, X):
        """Shifted normality score: negative for outliers, positive for inliers.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Samples to score.

        Returns
        -------
        decision : ndarray of shape (n_samples,), float64
            ``score_samples(X) - offset_``.
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
        labels : ndarray of shape (n_samples,), int
            +1 where ``decision_function(X) >= 0``, else -1.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

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


class _ScoreThenUpdateMixin:
    """``partial_fit`` for detectors without cheap leave-one-out scores (PatchCore, DFM,
    DFKDE): the first call fits; each later batch is scored by the model that has not
    seen it, then absorbed (``_absorb``), and ``offset_`` is the ``contamination``
    quantile of a bounded record of the latest out-of-sample scores.

    A call that raises leaves the fitted state as it was.
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
                Xt = self._validate_input(X, reset=False)
                self._check_streamed_batch()
                scores = self._blockwise(self._score, Xt)  # by a model that has not seen X
                n_model = self.n_samples_seen_
                self._absorb(Xt)
                self._score_then_update(scores, n_model)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        return self

    def _check_streamed_batch(self) -> None:
        """Checks of the fitted state before a later batch is scored (none by default)."""

    def _set_offset(self, anomaly_scores: torch.Tensor, method: str) -> None:
        super()._set_offset(anomaly_scores, method)
        record = _score_record(anomaly_scores, self.n_samples_seen_)
        # in-sample scores are optimistic: a stream does not build on them
        self._offset_record = record[:0] if method == "in-sample" else record[-_OFFSET_RECORD:]

    def _score_then_update(self, anomaly_scores: torch.Tensor, n_model: int) -> None:
        """``offset_`` from the latest out-of-sample scores, those of this batch added.

        ``n_model``: samples seen by the model that scored the batch. Scores of models
        that had seen fewer than half as many are dropped (they are too pessimistic).
        """
        old = self._offset_record
        record = np.concatenate([old[old[:, 1] >= n_model / 2],
                                 _score_record(anomaly_scores, n_model)])[-_OFFSET_RECORD:]
        self.offset_ = _quantile_offset(-record[:, 0], self.contamination)
        self.calibration_ = "score-then-update"
        self._offset_record = record


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
        maps : ndarray of shape (n_samples, H, W) or (n_samples, height, width), float64
            Higher = more anomalous.
        """
        from .anomaly_map import postprocess_anomaly_map

        check_is_fitted(self)
        if is_dask_array(X):  # a dask array, mapped block by block
            from ._dask import map_samples, map_shape
            return map_samples(self, "anomaly_map", X, map_shape(self, output_size),
                               np.float64, output_size=output_size, sigma=sigma)
        Xt = self._validate_input(X, reset=False)

        def maps_of(x):
            maps = self._anomaly_map(x)
            if output_size is not None:
                maps = postprocess_anomaly_map(maps, output_size, sigma=sigma)
            return maps

        return _to_numpy(self._blockwise(maps_of, Xt)).astype(np.float64)

    def _anomaly_map(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
