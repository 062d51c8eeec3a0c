"""Estimator glue shared by every skanomaly detector.

This is the one place for input validation (numpy arrays, array-likes and torch
tensors on any device), device resolution, seeding through a local
:class:`torch.Generator`, ``contamination``/``offset_``, ``decision_function`` and
``predict``, and pickling of device state. Detectors subclass
:class:`BaseDetector` and implement ``_fit`` and ``_score``; spatial detectors
subclass :class:`BaseSpatialDetector` and implement ``_anomaly_map``.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from sklearn_compat.utils.validation import validate_data
from .functional._validation import all_finite

__all__ = ["BaseDetector", "BaseSpatialDetector", "resolve_device", "make_generator"]

_DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


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


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


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
        Expected share of outliers, as in :class:`sklearn.covariance.EllipticEnvelope`:
        ``offset_`` is the ``contamination`` quantile of the training scores, so a
        share ``contamination`` of the training set is predicted -1.
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the kernels run. Fitted attributes are CPU numpy arrays whatever
        the device, so a model fitted on CUDA pickles and loads on a CPU machine.

    Notes
    -----
    Input may be a numpy array, any array-like, or a torch tensor on any
    device; it is never modified. Read-only and memory-mapped arrays work.

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
        self.__dict__.pop("_device_cache", None)

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
        if reset:
            self.input_shape_ = sample_shape
        elif sample_shape != tuple(self.input_shape_):
            raise ValueError(
                f"X has per-sample shape {sample_shape}, but {type(self).__name__} was "
                f"fitted on shape {tuple(self.input_shape_)}"
            )
        return t

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

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Training samples (spatial detectors also take (n_samples, C, H, W)).
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : object
            The fitted detector.
        """
        self._reset_device_cache()
        Xt = self._validate_input(X, reset=True)
        self._fit(Xt)
        self._set_offset(self._score(Xt))
        return self

    def _set_offset(self, train_anomaly_scores: torch.Tensor) -> None:
        scores = -_to_numpy(train_anomaly_scores).astype(np.float64)
        self.offset_ = float(np.percentile(scores, 100.0 * self.contamination))

    def score_samples(self, X):
        """Normality score of each sample: higher means more normal.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Samples to score, shaped as in ``fit``.

        Returns
        -------
        scores : ndarray of shape (n_samples,), float64
            The negated anomaly score of each sample.
        """
        check_is_fitted(self)
        Xt = self._validate_input(X, reset=False)
        return -_to_numpy(self._score(Xt)).astype(np.float64)

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

    # --------------------------------------------------------- to implement
    def _fit(self, X: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


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
        X : array-like or torch.Tensor of shape (n_samples, C, H, W)
            Feature maps shaped as in ``fit``.
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
        Xt = self._validate_input(X, reset=False)
        maps = self._anomaly_map(Xt)
        if output_size is not None:
            maps = postprocess_anomaly_map(maps, output_size, sigma=sigma)
        return _to_numpy(maps).astype(np.float64)

    def _anomaly_map(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
