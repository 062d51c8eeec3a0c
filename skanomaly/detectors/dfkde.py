"""DFKDE: Gaussian kernel density of PCA-reduced deep features."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, StrOptions

import numpy as np
from sklearn.base import _fit_context

from ..base import (
    BaseDetector,
    ScoreThenUpdateMixin,
    draw_seed,
    make_generator,
    to_numpy,
)
from ..functional import (
    PCAProjection,
    all_finite,
    frexp_exponent,
    ldexp,
    max_abs_exponent,
    pca_fit,
)
from ..functional.covariance import accumulation_dtype
from ..functional.decomposition import merge_moments
from ..functional.kde import GaussianKDE

__all__ = ["DFKDEDetector"]


def _batch_moments(x: torch.Tensor):
    """``(n, mean, root)`` of the rows of ``x``: the centred rows are a scatter root."""
    mean = x.mean(0)
    return x.shape[0], mean, x - mean


def _root(n: int, mean, s, vt):
    """``(n, mean, root)`` of factorised moments: ``diag(s) @ vt`` is a scatter root."""
    return n, mean, s[:, None] * vt


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


class _DFKDEModule(torch.nn.Module):
    """Fitted DFKDE scoring: ``forward(x (N, C, H, W)) -> anomaly scores (N,)``.

    Global average pooling, the exact power-of-two scaling, the PCA projection
    (:class:`~skanomaly.functional.PCAProjection`), the feature scaling and the
    kernel density (:class:`~skanomaly.functional.GaussianKDE`), all in ``dtype``.
    """

    def __init__(self, projection: PCAProjection, kde: GaussianKDE, *, exponent: int,
                 feature_scaling, max_length: float, log_unit: float, dtype: torch.dtype):
        super().__init__()
        self.projection, self.kde = projection, kde
        self.exponent, self.feature_scaling, self.max_length, self.log_unit, self.dtype = (
            exponent, feature_scaling, max_length, log_unit, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projection(ldexp(x.to(self.dtype).mean(dim=(2, 3)), -self.exponent))
        if self.feature_scaling == "scale":
            z = z / self.max_length
        elif self.feature_scaling == "norm":
            norm = z.square().sum(1, keepdim=True).sqrt()
            z = z / torch.where(norm > 0, norm, torch.ones_like(norm))
        return -(self.kde(z) + self.log_unit)


class DFKDEDetector(ScoreThenUpdateMixin, BaseDetector):
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
        replacement, form the KDE (and, in ``fit``, the PCA); :meth:`partial_fit`
        keeps a reservoir sample of at most this many.
    bandwidth : {"scott", "silverman"} or float > 0, default="scott"
        Bandwidth rule or factor, as in :class:`scipy.stats.gaussian_kde`.
    random_state : int, RandomState instance or None, default=None
        Seeds the choice of training points when there are more than
        ``max_training_points`` (in ``fit``, and in the reservoir of
        :meth:`partial_fit`).
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
    kde_indices_ : ndarray of shape (n_training_points,), int64
        The training sample of each row of ``dataset_``, numbered across every batch
        seen (the ``i``-th sample of a batch passed after ``n`` samples is ``n + i``).
    n_samples_seen_ : int
        Number of training samples seen by ``fit`` and ``partial_fit``.
    input_shape_ : tuple of int
        Per-sample shape seen in ``fit``: ``(n_features, 1, 1)`` for 2-D input.
    n_features_in_ : int
        Number of features (channels for 4-D input).
    offset_ : float
        Threshold on :meth:`score_samples` (see :class:`BaseDetector`).
    calibration_ : str
        ``"leave-one-out"`` after ``fit``, or ``"cross-fit"`` with fewer than ten KDE
        points per feature (see Notes); ``"score-then-update"`` after a
        :meth:`partial_fit` that updated a fitted model; ``"held-out"`` after
        :meth:`calibrate`.

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

    **Streaming.** :meth:`partial_fit` keeps the PCA as the float64 factorised moments
    of every sample seen (count, mean and thin SVD of the centred scatter, at most
    ``n_features**2`` numbers, merged by Chan et al.'s pairwise update in factorised
    form) and the KDE points as a reservoir sample (Vitter's algorithm R, seeded by
    ``random_state`` through one generator per call, each call drawing the next one's
    seed) of at most ``max_training_points`` pooled vectors: every sample seen is in it
    with the same probability. Each call then rebuilds the model from them: PCA from
    the moments, ``n_components_``, ``scale_``, ``max_length_`` and ``dataset_`` from
    the reservoir. So a streamed DFKDE differs from ``fit`` in which points the KDE
    keeps (a reservoir instead of ``fit``'s ``randperm``), and, with more samples than
    ``max_training_points``, in its PCA (fitted to every sample instead of to the
    points kept); with at most ``max_training_points`` samples in all it is ``fit``'s
    model up to float64 rounding. Memory: the reservoir, ``max_training_points x
    n_features`` numbers, plus the moments and the batch; ``fit`` keeps both too (its
    KDE points are the reservoir), so that :meth:`partial_fit` may follow it, and a
    fitted model (and its pickle) holds ``n_training_points x n_features`` float64
    numbers besides ``dataset_``. ``offset_``: a call on an
    unfitted detector is ``fit``; later calls score the batch with the current model
    before absorbing it (score-then-update: out of sample) and set ``offset_`` to the
    ``contamination`` quantile of the latest 2,048 out-of-sample scores (the first
    batch's included, in-sample ones never) by models that had seen at least half as
    many samples as the one that scored the batch: earlier, smaller models score a
    little pessimistically, and this bounds how stale a score may be. Measured on
    2,000 correlated Gaussian vectors of 12 features streamed in batches of 10 or 100
    (default parameters), ``predict`` then flagged 0.109 and 0.110 of 20,000 new
    normals at ``contamination=0.1`` (``fit``: 0.108). :meth:`calibrate` after the
    last batch sets it from held-out normals.

    Follows anomalib's ``KDEClassifier`` (PCA, then scaling, then KDE), with
    the KDE of :func:`scipy.stats.gaussian_kde` (anomalib's ``GaussianKDE``
    differs in normalisation) computed in float64 (float32 on MPS) as a log
    density with ``logsumexp``, so far outliers keep finite, ordered scores
    where anomalib's density underflows to its floor ``1e-300``. The kernel
    covariance is factorised once per fit, not per scoring call: scoring runs
    through the fitted :class:`~skanomaly.functional.PCAProjection` and
    :class:`~skanomaly.functional.GaussianKDE` modules, cached per fit, which
    the exported model composes too. anomalib
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
    _private_state = (*BaseDetector._private_state, "_moments", "_reservoir", "_largest_seen",
                      "_next_seed", "_offset_record")
    _streaming_state = ("_moments", "_reservoir", "_largest_seen", "_next_seed",
                        "_offset_record")

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
        dtype = accumulation_dtype(X.device)
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
            dataset = self._device_tensor("dataset_", accumulation_dtype(self._device()))
            if self.feature_scaling is None:
                dataset = ldexp(dataset, -self._exponent())
            return GaussianKDE(dataset, self.bandwidth)

        return self._cached("kde", build)

    def _projection(self, dtype, device=None) -> PCAProjection:
        """The fitted PCA (``pca_mean_`` in units of ``scale_``) as a module (cached)."""
        device = self._device() if device is None else device
        return self._cached(("pca", dtype, str(device)), lambda: PCAProjection(
            torch.as_tensor(self.pca_components_, dtype=dtype, device=device),
            ldexp(torch.as_tensor(self.pca_mean_, dtype=dtype, device=device),
                  -self._exponent())))

    def _build_torch_module(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The fitted scoring as a module: ``forward(x (N, C, H, W)) -> scores (N,)``.

        Anomaly scores ``-score_samples(x)`` in ``dtype``, from the cached PCA
        projection and kernel density (fitted in float64 and cast to ``dtype``).
        """
        kde = copy.deepcopy(self._kde()).to(device=device, dtype=dtype)
        length = (math.ldexp(self.max_length_, -self._exponent())
                  if self.feature_scaling == "scale" else 1.0)
        return _DFKDEModule(self._projection(dtype, device), kde, exponent=self._exponent(),
                            feature_scaling=self.feature_scaling, max_length=length,
                            log_unit=self._log_unit(), dtype=dtype)

    # ------------------------------------------------------------------- fit
    def _fit(self, X: torch.Tensor) -> None:
        self._check_min_samples(X, 2)
        vectors = self._vectors(X)
        n_samples = vectors.shape[0]
        generator = make_generator(self.random_state, vectors.device)
        rows = None
        kept = vectors
        if n_samples > self.max_training_points:
            keep = torch.randperm(n_samples, generator=generator, device=vectors.device)
            rows = keep[: self.max_training_points]
            kept = vectors[rows]
        self._cached("kde_rows", lambda: rows)  # for the leave-one-out offset
        exponent = max_abs_exponent(kept) - 1
        u = ldexp(kept, -exponent)  # largest |u| in [1, 2): exact
        fit = pca_fit(u)  # the PCA of the KDE points, as anomalib's
        moments = (kept.shape[0], fit.mean, fit.singular_values, fit.components)
        if rows is not None:  # the moments of every sample, for a later partial_fit
            rest = torch.ones(n_samples, dtype=torch.bool, device=vectors.device)
            rest[rows] = False
            moments = merge_moments(_root(*moments),
                                    _batch_moments(ldexp(vectors[rest], -exponent)))
        self._build(kept, exponent, fit.mean, fit.singular_values, fit.components,
                    n_pca=kept.shape[0], max_abs=float(kept.abs().max()))
        self._moments = (moments[0], *map(to_numpy, moments[1:]), exponent)
        self._reservoir = to_numpy(kept)
        self.kde_indices_ = (np.arange(n_samples, dtype=np.int64) if rows is None
                             else to_numpy(rows).astype(np.int64))
        self.n_samples_seen_ = int(n_samples)
        self._largest_seen = float(vectors.abs().max())
        self._next_seed = draw_seed(generator)

    def _build(self, kde_vectors: torch.Tensor, exponent: int, pca_mean, singular_values,
               components, *, n_pca: int, max_abs: float) -> None:
        """The model: PCA (given, in units of ``2**exponent``), scaling and KDE points.

        ``kde_vectors`` are the pooled vectors the KDE keeps; the PCA was fitted to
        ``n_pca`` vectors whose largest magnitude is ``max_abs``.
        """
        n_points, n_features = kde_vectors.shape
        u = ldexp(kde_vectors, -exponent)  # largest |u| in [1, 2): exact
        s = singular_values
        # numpy.linalg.matrix_rank's tolerance, with a floor at the rounding noise of the
        # centring (entries of about eps * max|u| <= 2 eps), so identical points are rank 0
        floor = math.sqrt(n_pca) * math.ldexp(max_abs, -exponent)
        tolerance = max(float(s[0]), floor) * max(n_pca, n_features) * torch.finfo(
            s.dtype).eps
        rank = int((s > tolerance).sum())
        if rank == 0:
            raise ValueError(
                f"all {n_pca} training points are the same (after pooling): a kernel "
                "density needs at least 2 distinct points"
            )
        k = min(self.n_components, n_features, n_points - 1, rank)
        components = components[:k]
        z = PCAProjection(components, pca_mean)(u)

        self.n_components_ = k
        self.scale_ = math.ldexp(1.0, exponent)
        self.pca_components_ = components.cpu().numpy()
        self.pca_mean_ = ldexp(pca_mean, exponent).cpu().numpy()
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
                f"{n_points} training points cannot be fitted ({exc}); lower n_components "
                "or change feature_scaling"
            ) from exc

    #: fitted attributes that partial_fit leaves to the refresh (see finalize)
    _deferred = ("n_components_", "pca_components_", "pca_mean_", "scale_", "max_length_",
                 "dataset_")

    def _buffer_batch(self, X: torch.Tensor) -> None:
        """Add a validated batch to the reservoir now, and keep its vectors for the next
        merge of the PCA moments (see :meth:`_refresh_model`)."""
        vectors = self._vectors(X)
        device, dtype = vectors.device, vectors.dtype
        n_batch, n_before = vectors.shape[0], self.n_samples_seen_
        generator = torch.Generator(device=device).manual_seed(self._next_seed)

        # reservoir sampling (Vitter's algorithm R): the t-th sample (1-based) replaces a
        # uniformly drawn slot with probability max_training_points / t
        reservoir = torch.as_tensor(self._reservoir, dtype=dtype, device=device)
        indices = self.kde_indices_.copy()
        take = max(0, min(self.max_training_points - reservoir.shape[0], n_batch))
        reservoir = torch.cat([reservoir, vectors[:take]])
        indices = np.concatenate([indices, n_before + np.arange(take, dtype=np.int64)])
        if n_batch > take:
            count = torch.arange(take, n_batch, device=device, dtype=torch.float64) + (
                n_before + 1)
            draws = torch.rand(n_batch - take, generator=generator, device=device,
                               dtype=torch.float64)
            slots = to_numpy(torch.floor(draws * count).to(torch.int64))
            items = np.arange(take, n_batch)
            hit = slots < reservoir.shape[0]
            slots, items = slots[hit][::-1], items[hit][::-1]
            _, last = np.unique(slots, return_index=True)  # the latest sample of a slot wins
            slots, items = slots[last], items[last]
            reservoir[torch.as_tensor(slots, device=device)] = vectors[
                torch.as_tensor(items, device=device)]
            indices[slots] = n_before + items

        self._reservoir = to_numpy(reservoir)
        self.kde_indices_ = indices
        self._largest_seen = max(self._largest_seen, float(vectors.abs().max()))
        self._buffer = [*self._buffer, vectors]
        self.n_samples_seen_ = n_before + n_batch
        self._next_seed = draw_seed(generator)

    def _buffer_full(self) -> bool:
        """Whether the buffer holds as many vectors as the last refresh had seen, but at
        least the moments' rows and at most ``max(max_training_points, 4 * n_features)``:
        the model that scores a batch has then seen at least about half the samples seen
        (or all but that many), the buffer holds no more vectors than the reservoir (or
        four times the moments), and the merges cost a bounded multiple of one SVD of
        everything seen."""
        n, _, s, vt = self._moments[:4]
        limit = max(s.shape[0], min(n, max(self.max_training_points, 4 * vt.shape[1])))
        return sum(v.shape[0] for v in self._buffer) >= limit

    def _refresh_model(self) -> None:
        """Merge the buffered vectors into the PCA moments at once and rebuild the PCA,
        the scaling and the KDE on the reservoir."""
        device = self._device()
        vectors = torch.cat([torch.as_tensor(v, device=device) for v in self._buffer])
        dtype = vectors.dtype
        # moments of every sample, in units of 2**exponent (exact powers of two)
        n_m, mean_m, s_m, vt_m, e_m = self._moments
        e = max(e_m, max_abs_exponent(vectors) - 1)
        to_device = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        mean_m, s_m = ldexp(to_device(mean_m), e_m - e), ldexp(to_device(s_m), e_m - e)
        n, mean, s, vt = merge_moments(_root(n_m, mean_m, s_m, to_device(vt_m)),
                                       _batch_moments(ldexp(vectors, -e)))
        self._set_streamed_state(n, mean, s, vt, e, to_device(self._reservoir),
                                 self.kde_indices_, self._largest_seen)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the detector with one more batch of (mostly) normal samples.

        On an unfitted detector the batch starts the model exactly as ``fit(X)``
        (``offset_`` from leave-one-out scores or cross-fitting). Later calls (after
        ``fit`` too) first score the batch with the model of the last refresh, then add
        it to a seeded reservoir sample of at most ``max_training_points`` of the samples
        seen and buffer it for the float64 PCA moments of every sample seen. The merge
        of the buffer and the rebuild of the PCA (from the moments), the scaling and the
        KDE (on the reservoir; see the class Notes) are deferred until the buffer holds
        as many samples as the last refresh had seen (at least the moments' rows, at
        most ``max(max_training_points, 4 * n_features)``) or the model is read
        (scoring, a fitted attribute, :meth:`finalize`). ``offset_`` is
        the ``contamination`` quantile of the latest out-of-sample scores
        (``calibration_ == "score-then-update"``), replacing one set by
        :meth:`calibrate`: call :meth:`calibrate` after the last batch to set it from
        held-out normals.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or (n_samples, C, H, W)
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
            infinity, if the first batch has fewer than 2 samples, if every sample seen
            is the same, if the kernel density cannot be fitted or a result is beyond the
            float range (see the class). The fitted state is then left as it was.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import DFKDEDetector
        >>> X = np.random.default_rng(0).normal(size=(300, 8))
        >>> det = DFKDEDetector(n_components=3, max_training_points=100, random_state=0,
        ...                     device="cpu")
        >>> for batch in np.array_split(X, 6):
        ...     det = det.partial_fit(batch)
        >>> det.n_samples_seen_, det.dataset_.shape, det.calibration_
        (300, (100, 3), 'score-then-update')
        >>> bool(det.kde_indices_.max() >= 100)  # the reservoir keeps later samples too
        True
        """
        return self._stream(X)

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
        z = self._projection(vectors.dtype)(ldexp(vectors, -self._exponent()))
        if not all_finite(z):
            raise _beyond_range("samples too far from the training data for their PCA "
                                "coordinates to be represented in float64")
        return -(self._kde().logpdf(self._kde_points(z)) + self._log_unit())

    def _set_streamed_state(self, n, mean, s, vt, e, reservoir, indices, max_abs) -> None:
        """Rebuild the model from merged PCA moments (at scale ``2**e``) and a reservoir,
        and keep both for the next merge (``partial_fit`` and ``_merge_partial``)."""
        exponent = max_abs_exponent(reservoir) - 1
        self._reset_device_cache()
        self._build(reservoir, exponent, ldexp(mean, e - exponent), ldexp(s, e - exponent),
                    vt, n_pca=n, max_abs=max_abs)
        self._moments = (n, to_numpy(mean), to_numpy(s), to_numpy(vt), e)
        self._reservoir = to_numpy(reservoir)
        self.kde_indices_ = indices
        self._largest_seen = max_abs

    def _merge_partial(self, other: DFKDEDetector) -> None:
        """Fold the fit of ``other`` (on other samples) into this one, in place.

        For the tree reduction of per-block fits in :mod:`skanomaly._dask`. The PCA
        moments merge as in ``partial_fit`` (:func:`merge_moments` at a common power of
        two). The reservoirs, uniform samples of ``n_a`` and ``n_b`` samples, merge into
        a uniform sample of ``m = min(max_training_points, n_a + n_b)`` of the union:
        ``k ~ Hypergeometric(n_a, n_b, m)`` rows from the first, ``m - k`` from the
        second, each a uniform subset in order (seeded by this fit's stream). The model
        is rebuilt by ``partial_fit``'s ``_build``. ``offset_`` is not set.
        """
        f64 = dict(dtype=torch.float64)
        e = max(self._moments[4], other._moments[4])

        def root(moments):
            n, mean, s, vt, e_m = moments
            mean, s, vt = (torch.as_tensor(v, **f64) for v in (mean, s, vt))
            return _root(n, ldexp(mean, e_m - e), ldexp(s, e_m - e), vt)

        n, mean, s, vt = merge_moments(root(self._moments), root(other._moments))
        generator = torch.Generator().manual_seed(self._next_seed)
        rng = np.random.default_rng(draw_seed(generator))
        n_a, n_b = self.n_samples_seen_, other.n_samples_seen_
        m = min(self.max_training_points, n_a + n_b)
        k = n_a if m == n_a + n_b else int(rng.hypergeometric(n_a, n_b, m))
        pick_a = np.sort(rng.choice(self._reservoir.shape[0], k, replace=False))
        pick_b = np.sort(rng.choice(other._reservoir.shape[0], m - k, replace=False))
        reservoir = torch.as_tensor(np.concatenate([self._reservoir[pick_a],
                                                    other._reservoir[pick_b]]), **f64)
        max_abs = max(self._largest_seen, other._largest_seen)
        indices = np.concatenate([self.kde_indices_[pick_a],
                                  other.kde_indices_[pick_b]]).astype(np.int64)
        self._set_streamed_state(n, mean, s, vt, e, reservoir, indices, max_abs)
        self.n_samples_seen_ = n_a + n_b
        self._next_seed = draw_seed(generator)
