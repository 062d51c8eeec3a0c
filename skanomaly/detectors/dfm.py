"""DFM: PCA of pooled deep features, scored by reconstruction error or Gaussian likelihood."""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions

from ..base import BaseDetector, BaseSpatialDetector
from ..functional import (
    PCAFit,
    cov,
    mahalanobis,
    pca_fit,
    pca_inverse_transform,
    pca_transform,
    regularized_cholesky,
    upsample_bilinear,
)
from ..functional._validation import all_finite
from ..functional.covariance import _accumulation_dtype

__all__ = ["DFMDetector"]


def _check_pca_rank(fit: PCAFit, n_samples: int, n_features: int, model: str) -> None:
    """Raise ``ValueError`` if ``fit`` keeps axes of (numerically) zero variance.

    The tolerance on singular values is :func:`numpy.linalg.matrix_rank`'s,
    ``s_max * max(n_samples, n_features) * eps``. A density model on such axes
    is degenerate.
    """
    s = fit.singular_values
    tol = s[0] * max(n_samples, n_features) * torch.finfo(s.dtype).eps
    if not bool(s[-1] > tol):
        raise ValueError(
            f"the training points span only {int((s > tol).sum())} dimension(s) after "
            f"centring, fewer than the {fit.n_components} principal components kept: the "
            f"{model} would be degenerate; lower n_components"
        )


def _finite(scores: torch.Tensor, what: str) -> torch.Tensor:
    """``scores``, or ``ValueError`` if one overflowed (a sample far beyond the training data)."""
    if not all_finite(scores):
        raise ValueError(
            f"values beyond the float range: the {what} of a sample overflows float64 (its "
            "features are too far from the training data's, in their units); rescale the "
            "features (e.g. with sklearn.preprocessing.StandardScaler)"
        )
    return scores


class DFMDetector(BaseSpatialDetector):
    """Deep Feature Modeling (DFM) anomaly detector (Ahuja et al., 2019).

    Feature maps are average-pooled, flattened to one vector per image and
    reduced by PCA fitted on the training images. An image is scored by its
    feature reconstruction error (FRE) from the principal subspace, or by the
    negative log-likelihood of a Gaussian fitted to the training images in
    PCA space.

    Parameters
    ----------
    n_components : int >= 1 or float in (0, 1), default=0.97
        Principal components kept, with :class:`sklearn.decomposition.PCA`
        semantics: an int is a count (at most ``min(n_samples, n_features)``),
        a float the smallest number of components whose cumulative explained
        variance ratio exceeds it.
    pooling_kernel_size : int >= 1, default=4
        Kernel (and stride) of the average pooling applied to the feature maps
        before PCA, as anomalib's ``F.avg_pool2d(features, pooling_kernel_size)``;
        an axis shorter than the kernel is pooled whole, and 1 disables pooling.
    score_type : {"fre", "nll"}, default="fre"
        ``"fre"``: squared reconstruction error ``||x - x_hat||^2`` of the
        pooled feature vector (the only type with an :meth:`anomaly_map`).
        ``"nll"``: anomalib's Gaussian score in PCA space (see Notes).
    contamination : float in (0, 0.5], default=0.1
        Expected share of outliers; sets ``offset_`` (see :class:`BaseDetector`).
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the kernels run.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_pooled_features)
        Principal axes of the pooled, flattened training features.
    mean_ : ndarray of shape (n_pooled_features,)
        Mean pooled feature vector.
    explained_variance_ : ndarray of shape (n_components,)
        Variance along each principal axis (``ddof=1``).
    explained_variance_ratio_ : ndarray of shape (n_components,)
        Share of the total variance along each principal axis.
    singular_values_ : ndarray of shape (n_components,)
        Singular values of the centred training matrix.
    noise_variance_ : float
        Mean variance of the discarded axes (0 when none is discarded).
    n_components_ : int
        Number of principal components kept.
    pooled_shape_ : tuple of int
        ``(C, h, w)`` of the pooled feature maps; ``n_pooled_features = C * h * w``.
    gaussian_mean_ : ndarray of shape (n_components,)
        Mean of the training features in PCA space (``score_type="nll"`` only).
    gaussian_covariance_ : ndarray of shape (n_components, n_components)
        Their maximum-likelihood covariance (divided by ``n_samples``;
        ``score_type="nll"`` only).
    input_shape_ : tuple of int
        Per-sample shape ``(C, H, W)`` seen in ``fit``.
    n_features_in_ : int
        Number of channels ``C``.
    offset_ : float
        Threshold on :meth:`score_samples` (see :class:`BaseDetector`).
    calibration_ : str
        ``"cross-fit"`` after ``fit`` (see Notes; ``"in-sample"`` with fewer than 10
        samples or when a fold cannot be fitted); ``"held-out"`` after :meth:`calibrate`.

    Raises
    ------
    ValueError
        From ``fit``, with fewer than 2 samples, an empty channel, height or
        width axis, an int ``n_components`` above ``min(n_samples,
        n_features)``, or (``"nll"``) more components than the centred training
        vectors span (numerical rank, as :func:`numpy.linalg.matrix_rank`); from
        ``fit`` and scoring, for values beyond the float range (see Notes); from
        :meth:`anomaly_map` when ``score_type="nll"``.

    Notes
    -----
    **Offset.** The principal subspace is fitted to the training vectors, so their
    in-sample reconstruction errors (and Gaussian scores) are optimistic, and no
    exact leave-one-out shortcut exists for a PCA refitted without each sample.
    ``fit`` therefore sets ``offset_`` by the base class's 5-fold cross-fitting:
    each fifth of the training images is scored by a DFM fitted on the other four
    fifths, which costs five extra PCA fits (SVDs of four fifths of the pooled
    training matrix, ``O(n_samples * n_pooled_features * min(n_samples,
    n_pooled_features))`` each) and one scoring pass over the training set. With
    fewer training images than pooled features, a fold's subspace (fitted to four
    fifths of them) reconstructs a little worse than the full one, so the offset is
    conservative and ``predict`` flags somewhat fewer than ``contamination`` of new
    normals; :meth:`calibrate` on held-out normal images sets it exactly.

    **Range.** Variances and squared reconstruction errors are squares of the
    features: float64 represents them for features of magnitude up to ``1e150``.
    Larger values (at ``fit`` or scoring), training data whose largest value is
    below ``1e-150``, or a sample whose squared error or Mahalanobis distance
    overflows raise a ``ValueError`` saying so, instead of returning infinite
    scores; rescale the features (e.g. ``StandardScaler``) first.

    Follows anomalib's ``DFMModel``: with ``x`` the pooled map flattened in
    ``(C, h, w)`` order, FRE is ``sum((x - x_hat)^2)``, and its map is the
    squared error summed over channels at each pooled position, upsampled
    bilinearly (``align_corners=False``) from ``(h, w)`` to the input grid
    ``(H, W)`` so that :meth:`anomaly_map` has the shape of every spatial
    detector's. anomalib interpolates the pooled map straight to the image size
    and does not blur it: ``anomaly_map(X, output_size, sigma=0)`` comes close,
    but interpolates twice (pooled to input grid to image). The ``"nll"`` score is anomalib's
    ``SingleClassGaussian.score_samples``,
    ``(z - mu)^T S^{-1} (z - mu) + log det S``, with ``z`` the PCA coordinates
    and ``S`` their covariance divided by ``n_samples``: twice the Gaussian
    negative log-likelihood minus ``n_components_ * log(2 pi)``. anomalib
    computes it in float32 through an SVD; here it is float64 with a Cholesky
    factor (float32 on MPS). Deviations: a fractional ``n_components`` keeps
    scikit-learn's number of components, one more than anomalib's ``PCA``
    (see :func:`skanomaly.functional.pca_fit`); and anomalib's pooling fails
    on maps smaller than the kernel, which are pooled whole here.

    References
    ----------
    N. A. Ahuja, I. Ndiour, T. Kalyanpur and O. Tickoo, "Probabilistic Modeling
    of Deep Features for Out-of-Distribution and Adversarial Detection",
    arXiv:1909.11786, 2019.
    anomalib, ``anomalib.models.image.dfm.torch_model.DFMModel``.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.detectors import DFMDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 8, 8, 8))
    >>> det = DFMDetector(device="cpu").fit(X)
    >>> det.pooled_shape_
    (8, 2, 2)
    >>> det.anomaly_map(X[:3]).shape
    (3, 8, 8)
    >>> det.anomaly_map(X[:3], output_size=32).shape
    (3, 32, 32)
    >>> nll = DFMDetector(score_type="nll", device="cpu").fit(X)
    >>> bool(nll.score_samples(X[:1] * 5.0)[0] < nll.score_samples(X).min())
    True
    """

    # float64 variances and squared errors: squares of the features
    _max_abs, _min_max_abs = 1e150, 1e-150
    _range_reason = "variances and squared reconstruction errors (squared features) in float64"

    _parameter_constraints: dict = {
        **BaseDetector._parameter_constraints,
        "n_components": [
            Interval(Integral, 1, None, closed="left"),
            Interval(RealNotInt, 0, 1, closed="neither"),
        ],
        "pooling_kernel_size": [Interval(Integral, 1, None, closed="left")],
        "score_type": [StrOptions({"fre", "nll"})],
    }

    def __init__(
        self,
        *,
        n_components=0.97,
        pooling_kernel_size=4,
        score_type="fre",
        contamination=0.1,
        device="auto",
    ):
        super().__init__(contamination=contamination, device=device)
        self.n_components = n_components
        self.pooling_kernel_size = pooling_kernel_size
        self.score_type = score_type

    def _pooled(self, X: torch.Tensor) -> torch.Tensor:
        """Average-pooled maps (n_samples, C, h, w) in the working float dtype.

        Pooling runs in the input's dtype; a row whose float32 sums overflow (values
        near float32's maximum) is pooled again in the working dtype, a choice that
        depends on the row alone.
        """
        kernel = tuple(min(self.pooling_kernel_size, size) for size in X.shape[2:])
        dtype = _accumulation_dtype(X.device)
        if kernel == (1, 1):
            return X.to(dtype)
        pooled = F.avg_pool2d(X, kernel).to(dtype)
        if not all_finite(pooled):
            rows = ~torch.isfinite(pooled.flatten(1)).all(1)
            pooled[rows] = F.avg_pool2d(X[rows].to(dtype), kernel)
        return pooled

    def _pca(self) -> PCAFit:
        t = self._device_tensor
        return PCAFit(
            components=t("components_"),
            explained_variance=t("explained_variance_"),
            explained_variance_ratio=t("explained_variance_ratio_"),
            singular_values=t("singular_values_"),
            mean=t("mean_"),
            n_components=self.n_components_,
            noise_variance=t("noise_variance_"),
        )

    def _fit(self, X: torch.Tensor) -> None:
        self._check_min_samples(X, 2)
        pooled = self._pooled(X)
        self.pooled_shape_ = tuple(pooled.shape[1:])
        vectors = pooled.flatten(1)
        fit = pca_fit(vectors, self.n_components)
        self.components_ = fit.components.cpu().numpy()
        self.mean_ = fit.mean.cpu().numpy()
        self.explained_variance_ = fit.explained_variance.cpu().numpy()
        self.explained_variance_ratio_ = fit.explained_variance_ratio.cpu().numpy()
        self.singular_values_ = fit.singular_values.cpu().numpy()
        self.noise_variance_ = float(fit.noise_variance)
        self.n_components_ = fit.n_components
        for name in ("gaussian_mean_", "gaussian_covariance_"):  # from an earlier "nll" fit
            self.__dict__.pop(name, None)
        if self.score_type == "nll":
            _check_pca_rank(fit, *vectors.shape, "Gaussian (score_type='nll')")
            z = pca_transform(vectors, fit)
            k = fit.n_components
            self.gaussian_mean_ = z.mean(0).cpu().numpy()
            self.gaussian_covariance_ = cov(z, rowvar=False, bias=True).reshape(k, k).cpu().numpy()

    def _squared_error(self, X: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction error of the pooled maps, (n_samples, C, h, w)."""
        pooled = self._pooled(X)
        vectors = pooled.flatten(1)
        fit = self._pca()
        recon = pca_inverse_transform(pca_transform(vectors, fit), fit)
        return (vectors - recon).square().view(pooled.shape)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        if self.score_type == "fre":
            return _finite(self._squared_error(X).flatten(1).sum(dim=1), "squared "
                           "reconstruction error")
        z = pca_transform(self._pooled(X).flatten(1), self._pca())
        chol = self._cached("gaussian_cholesky", lambda: regularized_cholesky(
            self._device_tensor("gaussian_covariance_")))
        maha = mahalanobis(z, self._device_tensor("gaussian_mean_"), cholesky=chol, squared=True)
        return _finite(maha + 2.0 * chol.diagonal().log().sum(), "Mahalanobis distance")

    def _anomaly_map(self, X: torch.Tensor) -> torch.Tensor:
        if self.score_type != "fre":
            raise ValueError(
                f"DFMDetector has no anomaly map for score_type={self.score_type!r}: the "
                "Gaussian likelihood is per image; fit with score_type='fre' for maps"
            )
        maps = _finite(self._squared_error(X).sum(dim=1), "squared reconstruction error")
        return maps if maps.shape[1:] == X.shape[2:] else upsample_bilinear(maps, X.shape[2:])
