"""DFKDE: Gaussian kernel density of PCA-reduced deep features."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ..base import BaseDetector, make_generator
from ..functional import pca_fit
from ..functional._validation import all_finite, frexp_exponent, ldexp, max_abs_exponent
from ..functional.covariance import _accumulation_dtype
from ..functional.kde import GaussianKDE

__all__ = ["DFKDEDetector"]


def _beyond_range(what: str) -> ValueError:
    return ValueError(
        f"values beyond the float range: {what}; rescale the features (e.g. with "
        "sklearn.preprocessing.StandardScaler)"
    )


def _unit_rows(z: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit Euclidean norm (a zero row stays zero), free of overflow.

    Each row is first brought to a largest entry in [0.5, 1) by an exact power of two,
    so the squares of the norm neither overflow nor underflow.
    """
    z = ldexp(z, -frexp_exponent(z.abs().amax(1, keepdim=True)))
    norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z / torch.where(norm > 0, norm, torch.ones_like(norm))


class DFKDEDetector(BaseDetector):
    """Deep Feature Kernel Density Estimation (DFKDE) anomaly detector.

    Feature vectors are reduced by PCA, scaled, and modelled by a Gaussian
    kernel density estimate (Parzen-Rosenblatt window with a scipy bandwidth
    rule) of the training points; a sample's anomaly score is its negative
    log density.

    Parameters
    ----------
    n_components : int >= 1, default=16
        Most principal components kept. The fitted ``n_components_`` is
        ``min(n_components, n_features, n_training_points - 1, rank)``, ``rank``
        the number of dimensions the centred training points span (numerical
        rank, as :func:`numpy.linalg.matrix_rank`): the KDE needs more points
        than dimensions and a non-singular covariance, so the default works on
        any data with at least 2 distinct training points, 1 feature included.
    feature_scaling : {"scale", "norm"} or None, default="scale"
        ``"scale"`` divides the PCA features by the largest norm of a training
        point in PCA space (``max_length_``); ``"norm"`` scales every vector
        to unit norm (a zero vector stays zero); None leaves them as they are.
    max_training_points : int >= 2, default=40000
        At most this many training samples, drawn at random without
        replacement, fit the PCA and form the KDE.
    bandwidth : {"scott", "silverman"} or float > 0, default="scott"
        Bandwidth rule or factor, as in :class:`scipy.stats.gaussian_kde`.
    random_state : int, RandomState instance or None, default=None
        Seeds the choice of training points when there are more than
        ``max_training_points``.
    contamination : float in (0, 0.5], default=0.1
        Share of new normal samples flagged by :meth:`predict`; sets ``offset_``
        from leave-one-out scores (see Notes and :class:`BaseDetector`).
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the kernels run.

    Attributes
    ----------
    n_components_ : int
        Principal components kept (see ``n_components``).
    pca_components_ : ndarray of shape (k, n_features)
        Principal axes of the training points (``k = n_components_``).
    pca_mean_ : ndarray of shape (n_features,)
        Mean of the training points.
    scale_ : float
        The power of two by which the pooled vectors are divided before the PCA
        and the KDE (their largest absolute value then lies in [1, 2)); exact, and
        undone in every reported quantity, so that any finite scale works.
    max_length_ : float
        Largest norm of a training point in PCA space (``feature_scaling="scale"`` only).
    dataset_ : ndarray of shape (n_training_points, k)
        The kernel centres: training points after PCA and scaling (``k = n_components_``).
    input_shape_ : tuple of int
        Per-sample shape seen in ``fit``: ``(n_features, 1, 1)`` for 2-D input.
    n_features_in_ : int
        Number of features (channels for 4-D input).
    offset_ : float
        Threshold on :meth:`score_samples` (see :class:`BaseDetector`).
    calibration_ : str
        ``"leave-one-out"`` after ``fit``, or ``"cross-fit"`` with fewer than ten KDE
        points per feature (see Notes); ``"held-out"`` after :meth:`calibrate`.

    Raises
    ------
    ValueError
        From ``fit``, with fewer than 2 samples, if every training point is the
        same (nothing to model), or if the kernel density of the scaled PCA
        features is singular (see :class:`skanomaly.functional.kde.GaussianKDE`);
        from ``fit`` or scoring, if a result is beyond the float range (a sample
        so far from the training points that its log density is not
        representable in float64).

    Notes
    -----
    Input is (n_samples, n_features) feature vectors, or feature maps
    (n_samples, C, H, W) that are global-average-pooled to (n_samples, C) as
    anomalib's ``DfkdeModel`` does (``adaptive_avg_pool2d(features, 1)``); to
    use several layers, pool and concatenate them yourself. When there are more
    training samples than ``max_training_points``, the rows kept are
    ``torch.randperm(n_samples, generator=g)[:max_training_points]`` with ``g``
    seeded by ``random_state`` on the detector's device.

    **Offset.** A training point counts in its own density, so its in-sample
    score is optimistic. ``fit`` therefore sets ``offset_`` from the exact
    leave-one-out log density of each KDE point (its own kernel dropped, the
    other weights renormalised; see
    :func:`~skanomaly.functional.gaussian_kde_logpdf`), with the PCA, the
    scaling (``max_length_``), the bandwidth and the kernel covariance held at
    their full-data values; training samples beyond ``max_training_points``,
    which the KDE never saw, are scored as new samples. The cost is one
    evaluation of the KDE at its own ``n_training_points`` centres
    (``O(n_training_points**2 n_components_)``, the cost of scoring them once)
    plus scoring the samples left out of the KDE, instead of the five refits of
    cross-fitting. The PCA held fixed is the approximation: its axes were fitted
    to the training points, which therefore project a little farther out than new
    samples do. With many more training points than features this is negligible;
    with about as many it is not (120 brick images of 448 resnet18 channels: 0.000,
    0.013 and 0.113 of new normals flagged at ``contamination`` 0.05, 0.1 and 0.2), so
    with fewer than ``10 * n_features_in_`` KDE points ``fit`` uses 5-fold
    cross-fitting instead, PCA included (0.037, 0.125, 0.250 on the same data; five
    extra fits, 7.5x the fit time there). :meth:`calibrate` on held-out normal samples
    remains the most direct threshold.

    Follows anomalib's ``KDEClassifier`` (PCA, then scaling, then KDE), with
    the KDE of :func:`scipy.stats.gaussian_kde` (anomalib's ``GaussianKDE``
    differs in normalisation) computed in float64 (float32 on MPS) as a log
    density with ``logsumexp``, so far outliers keep finite, ordered scores
    where anomalib's density underflows to its floor ``1e-300``. The kernel
    covariance is factorised once per fit, not per scoring call. anomalib
    draws the subset with Python's global ``random`` module; its sigmoid map of
    log densities to probabilities is not applied here; and ``"norm"`` scales
    to exactly unit norm, where anomalib's ``F.normalize`` divides vectors of
    norm below ``1e-12`` by ``1e-12``.

    References
    ----------
    E. Parzen, "On Estimation of a Probability Density Function and Mode",
    Ann. Math. Statist. 33(3), 1962.
    M. Rosenblatt, "Remarks on Some Nonparametric Estimates of a Density
    Function", Ann. Math. Statist. 27(3), 1956.
    D. W. Scott, "Multivariate Density Estimation", Wiley, 1992.
    anomalib, ``anomalib.models.image.dfkde.torch_model.DfkdeModel``.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.detectors import DFKDEDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(400, 32))
    >>> det = DFKDEDetector(n_components=4, random_state=0, device="cpu").fit(X)
    >>> det.dataset_.shape, det.calibration_
    ((400, 4), 'leave-one-out')
    >>> bool(det.score_samples(X[:1] + 8.0)[0] < det.score_samples(X).min())
    True
    >>> maps = rng.normal(size=(50, 32, 3, 3))  # pooled to (50, 32)
    >>> DFKDEDetector(n_components=4, device="cpu").fit(maps).dataset_.shape
    (50, 4)

    The default keeps at most as many components as the data allow:

    >>> DFKDEDetector(device="cpu").fit(rng.normal(size=(100, 3))).n_components_
    3
    """

    _sample_ndim = 3

    _parameter_constraints: dict = {
        **BaseDetector._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "feature_scaling": [StrOptions({"scale", "norm"}), None],
        "max_training_points": [Interval(Integral, 2, None, closed="left")],
        "bandwidth": [
            StrOptions({"scott", "silverman"}),
            Interval(Real, 0, None, closed="neither"),
        ],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        n_components=16,
        feature_scaling="scale",
        max_training_points=40000,
        bandwidth="scott",
        random_state=None,
        contamination=0.1,
        device="auto",
    ):
        super().__init__(contamination=contamination, device=device)
        self.n_components = n_components
        self.feature_scaling = feature_scaling
        self.max_training_points = max_training_points
        self.bandwidth = bandwidth
        self.random_state = random_state

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _vectors(X: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled feature vectors (n_samples, C) in the working dtype.

        A row whose sum overflows (values near the float maximum) is pooled after an
        exact power-of-two scaling, so every finite row has a finite mean; the choice
        depends on the row alone.
        """
        dtype = _accumulation_dtype(X.device)
        vectors = X.mean(dim=(2, 3), dtype=dtype)
        if not all_finite(vectors):
            rows = ~torch.isfinite(vectors).all(1)
            x = X[rows].to(dtype)
            e = frexp_exponent(x.abs().amax(dim=(1, 2, 3)))
            vectors[rows] = ldexp(ldexp(x, -e[:, None, None, None]).mean(dim=(2, 3)), e[:, None])
        return vectors

    def _exponent(self) -> int:
        return math.frexp(self.scale_)[1] - 1  # scale_ = 2**e exactly

    def _kde_points(self, z: torch.Tensor) -> torch.Tensor:
        """PCA coordinates (in units of ``scale_``) -> the KDE's coordinates."""
        if self.feature_scaling == "scale":
            return z / math.ldexp(self.max_length_, -self._exponent())
        if self.feature_scaling == "norm":
            return _unit_rows(z)
        return z  # in units of scale_: the KDE below is built in them too

    def _log_unit(self) -> float:
        """Log density in the units of ``dataset_`` minus the one the KDE computes."""
        if self.feature_scaling is None:  # KDE of z / scale_: p(z) = p_u(z / s) / s**k
            return -self.n_components_ * self._exponent() * math.log(2.0)
        return 0.0

    def _kde(self) -> GaussianKDE:
        def build():
            dataset = self._device_tensor("dataset_", _accumulation_dtype(self._device()))
            if self.feature_scaling is None:
                dataset = ldexp(dataset, -self._exponent())
            return GaussianKDE(dataset, self.bandwidth)

        return self._cached("kde", build)

    def _pca_mean(self, dtype) -> torch.Tensor:
        """``pca_mean_`` in units of ``scale_``, on the device."""
        return self._cached(("pca_mean", dtype), lambda: ldexp(
            self._device_tensor("pca_mean_", dtype), -self._exponent()))

    # ------------------------------------------------------------------- fit
    def _fit(self, X: torch.Tensor) -> None:
        self._check_min_samples(X, 2)
        vectors = self._vectors(X)
        n_samples, n_features = vectors.shape
        rows = None
        if n_samples > self.max_training_points:
            generator = make_generator(self.random_state, vectors.device)
            keep = torch.randperm(n_samples, generator=generator, device=vectors.device)
            rows = keep[: self.max_training_points]
            vectors = vectors[rows]
            n_samples = self.max_training_points
        self._cached("kde_rows", lambda: rows)  # for the leave-one-out offset
        exponent = max_abs_exponent(vectors) - 1
        u = ldexp(vectors, -exponent)  # largest |u| in [1, 2): exact
        fit = pca_fit(u)
        s = fit.singular_values
        # numpy.linalg.matrix_rank's tolerance, with a floor at the rounding noise of the
        # centring (entries of about eps * max|u| <= 2 eps), so identical points are rank 0
        floor = math.sqrt(n_samples) * float(u.abs().max())
        tolerance = max(float(s[0]), floor) * max(n_samples, n_features) * torch.finfo(
            s.dtype).eps
        rank = int((s > tolerance).sum())
        if rank == 0:
            raise ValueError(
                f"all {n_samples} training points are the same (after pooling): a kernel "
                "density needs at least 2 distinct points"
            )
        k = min(self.n_components, n_features, n_samples - 1, rank)
        components = fit.components[:k]
        z = (u - fit.mean) @ components.T

        self.n_components_ = k
        self.scale_ = math.ldexp(1.0, exponent)
        self.pca_components_ = components.cpu().numpy()
        self.pca_mean_ = ldexp(fit.mean, exponent).cpu().numpy()
        self.__dict__.pop("max_length_", None)  # from an earlier fit with "scale"
        if self.feature_scaling == "scale":
            self.max_length_ = math.ldexp(float(torch.linalg.vector_norm(z, dim=1).max()),
                                          exponent)
            if not math.isfinite(self.max_length_):
                raise _beyond_range("the largest norm of a training point in PCA space "
                                    "overflows float64")
        points = self._kde_points(z)
        dataset = ldexp(points, exponent) if self.feature_scaling is None else points
        if not all_finite(dataset):
            raise _beyond_range("the PCA coordinates of the training points overflow float64")
        self.dataset_ = dataset.cpu().numpy()
        try:
            self._kde()
        except ValueError as exc:
            raise ValueError(
                f"{type(self).__name__}: the kernel density of the {k} PCA feature(s) of the "
                f"{n_samples} training points cannot be fitted ({exc}); lower n_components "
                "or change feature_scaling"
            ) from exc

    def _out_of_sample_scores(self, X: torch.Tensor):
        """Exact leave-one-out scores of the KDE points; the others scored as new samples.

        Cross-fitting (PCA refitted per fold) where the KDE points are fewer than ten per
        feature: the PCA fitted to them would make the leave-one-out scores pessimistic.
        """
        kde = self._kde()
        if self.dataset_.shape[0] < 10 * self.n_features_in_:
            return self._cross_fitted_scores(X)
        dataset = self._device_tensor("dataset_", kde.dtype)
        if self.feature_scaling is None:
            dataset = ldexp(dataset, -self._exponent())
        loo = -(kde.logpdf(dataset, leave_one_out=True) + self._log_unit())
        rows = self._cached("kde_rows", lambda: None)
        if rows is None:
            return loo, "leave-one-out"
        scores = torch.empty(X.shape[0], dtype=loo.dtype, device=loo.device)
        scores[rows] = loo
        rest = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
        rest[rows] = False
        scores[rest] = self._blockwise(self._score, X[rest]).to(loo.dtype)
        return scores, "leave-one-out"

    # ----------------------------------------------------------------- score
    def _score(self, X: torch.Tensor) -> torch.Tensor:
        vectors = self._vectors(X)
        u = ldexp(vectors, -self._exponent())
        components = self._device_tensor("pca_components_", vectors.dtype)
        z = (u - self._pca_mean(vectors.dtype)) @ components.T
        if not all_finite(z):
            raise _beyond_range("samples too far from the training data for their PCA "
                                "coordinates to be represented in float64")
        return -(self._kde().logpdf(self._kde_points(z)) + self._log_unit())
