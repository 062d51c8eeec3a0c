"""DFKDE: Gaussian kernel density of PCA-reduced deep features."""

from __future__ import annotations

from numbers import Integral, Real

import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval, StrOptions

from ..base import BaseDetector, make_generator
from ..functional import PCAFit, gaussian_kde_logpdf, pca_fit, pca_transform
from ..functional.covariance import _accumulation_dtype
from .dfm import _check_pca_rank

__all__ = ["DFKDEDetector"]


class DFKDEDetector(BaseDetector):
    """Deep Feature Kernel Density Estimation (DFKDE) anomaly detector.

    Feature vectors are reduced by PCA, scaled, and modelled by a Gaussian
    kernel density estimate (Parzen-Rosenblatt window with a scipy bandwidth
    rule) of the training points; a sample's anomaly score is its negative
    log density.

    Parameters
    ----------
    n_components : int >= 1, default=16
        Principal components kept. It must not exceed
        ``min(n_training_points - 1, n_features)``: the KDE needs more points
        than dimensions.
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
        Expected share of outliers; sets ``offset_`` (see :class:`BaseDetector`).
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the kernels run.

    Attributes
    ----------
    pca_components_ : ndarray of shape (n_components, n_features)
        Principal axes of the training points.
    pca_mean_ : ndarray of shape (n_features,)
        Mean of the training points.
    max_length_ : float
        Largest norm of a training point in PCA space (``feature_scaling="scale"`` only).
    dataset_ : ndarray of shape (n_training_points, n_components)
        The kernel centres: training points after PCA and scaling.
    input_shape_ : tuple of int
        Per-sample shape seen in ``fit``: ``(n_features, 1, 1)`` for 2-D input.
    n_features_in_ : int
        Number of features (channels for 4-D input).
    offset_ : float
        Threshold on :meth:`score_samples` (see :class:`BaseDetector`).

    Raises
    ------
    ValueError
        From ``fit``, if ``n_components`` exceeds
        ``min(n_training_points - 1, n_features)`` or the number of dimensions
        the centred training points span (numerical rank, as
        :func:`numpy.linalg.matrix_rank`), or if the scaled PCA features have a
        singular covariance (see :func:`skanomaly.functional.gaussian_kde_logpdf`).

    Notes
    -----
    Input is (n_samples, n_features) feature vectors, or feature maps
    (n_samples, C, H, W) that are global-average-pooled to (n_samples, C) as
    anomalib's ``DfkdeModel`` does (``adaptive_avg_pool2d(features, 1)``); to
    use several layers, pool and concatenate them yourself. When there are more
    training samples than ``max_training_points``, the rows kept are
    ``torch.randperm(n_samples, generator=g)[:max_training_points]`` with ``g``
    seeded by ``random_state`` on the detector's device.

    Follows anomalib's ``KDEClassifier`` (PCA, then scaling, then KDE), with
    the KDE of :func:`scipy.stats.gaussian_kde` (anomalib's ``GaussianKDE``
    differs in normalisation) computed in float64 (float32 on MPS) as a log
    density with ``logsumexp``, so far outliers keep finite, ordered scores
    where anomalib's density underflows to its floor ``1e-300``. anomalib
    draws the subset with Python's global ``random`` module; its sigmoid map of
    log densities to probabilities is not applied here.

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
    >>> X = rng.normal(size=(200, 32))
    >>> det = DFKDEDetector(n_components=4, random_state=0, device="cpu").fit(X)
    >>> det.dataset_.shape
    (200, 4)
    >>> bool(det.score_samples(X[:1] + 8.0)[0] < det.score_samples(X).min())
    True
    >>> maps = rng.normal(size=(50, 32, 3, 3))  # pooled to (50, 32)
    >>> DFKDEDetector(n_components=4, device="cpu").fit(maps).dataset_.shape
    (50, 4)
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

    @staticmethod
    def _vectors(X: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled feature vectors (n_samples, C) in the working dtype."""
        return X.mean(dim=(2, 3), dtype=_accumulation_dtype(X.device))

    def _scaled(self, z: torch.Tensor) -> torch.Tensor:
        if self.feature_scaling == "scale":
            return z / self.max_length_
        if self.feature_scaling == "norm":
            return F.normalize(z, dim=1)
        return z

    def _fit(self, X: torch.Tensor) -> None:
        vectors = self._vectors(X)
        n_samples, n_features = vectors.shape
        if n_samples > self.max_training_points:
            generator = make_generator(self.random_state, vectors.device)
            keep = torch.randperm(n_samples, generator=generator, device=vectors.device)
            vectors = vectors[keep[: self.max_training_points]]
            n_samples = self.max_training_points
        limit = min(n_samples - 1, n_features)
        if self.n_components > limit:
            raise ValueError(
                f"n_components={self.n_components} must be at most min(n_samples - 1, "
                f"n_features) = {limit} with n_samples = {n_samples} training points and "
                f"n_features = {n_features}: the KDE needs more points than PCA dimensions"
            )
        fit = pca_fit(vectors, self.n_components)
        _check_pca_rank(fit, n_samples, n_features, "kernel density")
        z = pca_transform(vectors, fit)
        self.__dict__.pop("max_length_", None)  # from an earlier fit with "scale"
        if self.feature_scaling == "scale":
            self.max_length_ = float(torch.linalg.vector_norm(z, dim=1).max())
        self.pca_components_ = fit.components.cpu().numpy()
        self.pca_mean_ = fit.mean.cpu().numpy()
        self.dataset_ = self._scaled(z).cpu().numpy()

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        vectors = self._vectors(X)
        components = self._device_tensor("pca_components_", vectors.dtype)
        # pca_transform reads only the mean and the components of a fit.
        fit = PCAFit(
            components=components, explained_variance=None, explained_variance_ratio=None,
            singular_values=None, mean=self._device_tensor("pca_mean_", vectors.dtype),
            n_components=components.shape[0], noise_variance=None,
        )
        z = self._scaled(pca_transform(vectors, fit))
        dataset = self._device_tensor("dataset_", vectors.dtype)
        return -gaussian_kde_logpdf(z, dataset, self.bandwidth)
