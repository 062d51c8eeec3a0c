"""DFM: PCA of pooled deep features, scored by reconstruction error or Gaussian likelihood."""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from torch import nn

from ..base import BaseDetector, BaseSpatialDetector, ScoreThenUpdateMixin, to_numpy
from ..functional import (
    GaussianScorer,
    PCAFit,
    PCAProjection,
    all_finite,
    ldexp,
    mahalanobis,
    max_abs_exponent,
    pca_fit,
    pca_inverse_transform,
    pca_transform,
    regularized_cholesky,
    upsample_bilinear,
)
from ..functional.covariance import accumulation_dtype
from ..functional.decomposition import merge_moments, resolve_n_components, subset_moments
from ..functional.spatial import bilinear_matrix

__all__ = ["DFMDetector"]

#: numbers per block of images cast to the working dtype before pooling (32 MiB float64)
_POOL_BLOCK = 2**22


def _pca_from_moments(n: int, mean, s, vt, n_components) -> PCAFit:
    """The PCA of ``n`` samples from their factorised moments, as :func:`pca_fit`'s.

    ``s`` and ``vt`` hold every component (``min(n, d)``); variances are
    ``s**2 / (n - 1)``, computed at unit scale (an exact power of two) so that no
    square overflows on the way, and ``n_components`` is resolved as scikit-learn does.
    """
    exponent = max_abs_exponent(s)
    variance = ldexp(s, -exponent).square() / (n - 1)
    total = variance.sum()
    ratio = variance / total if bool(total > 0) else torch.zeros_like(variance)
    k = resolve_n_components(n_components, ratio, s.shape[0])
    noise = variance[k:].mean() if k < variance.shape[0] else variance.new_zeros(())
    variance, noise = ldexp(variance, 2 * exponent), ldexp(noise, 2 * exponent)
    if not (all_finite(variance) and all_finite(noise)):
        raise ValueError(f"the variances (squared singular values / (n - 1)) exceed the "
                         f"range of {variance.dtype}; rescale the features")
    return PCAFit(components=vt[:k].contiguous(), explained_variance=variance[:k].clone(),
                  explained_variance_ratio=ratio[:k].clone(), singular_values=s[:k].clone(),
                  mean=mean, n_components=k, noise_variance=noise)


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


def _average_pool(x: torch.Tensor, kernel, grid) -> torch.Tensor:
    """``F.avg_pool2d(x, kernel)`` (stride = kernel, the remainder dropped) of maps on the
    (H, W) ``grid`` (Python ints: nothing read from a traced shape) as a reshape and a
    mean: ONNX ReduceMean, which onnxruntime runs in float64 (its AveragePool is float
    only)."""
    (kh, kw), (h, w) = kernel, grid
    ph, pw = int(h) // kh, int(w) // kw
    x = x[:, :, : ph * kh, : pw * kw]
    return x.reshape(-1, x.shape[1], ph, kh, pw, kw).mean(dim=(3, 5))


class _DFMModule(nn.Module):
    """A fitted DFM's scoring: (N, C, H, W) maps -> anomaly scores (and maps for "fre").

    The fitted-module contract of :meth:`~skanomaly.base.BaseDetector._torch_module`:
    average pooling, then the :class:`~skanomaly.functional.PCAProjection`'s
    reconstruction error (``score_type="fre"``: returns ``(scores, maps)``, the maps
    upsampled bilinearly from the pooled grid to the input's), or the
    :class:`~skanomaly.functional.GaussianScorer` of the PCA coordinates plus the log
    determinant (``"nll"``: returns the scores alone, as it has no anomaly map).
    """

    def __init__(self, projection: PCAProjection, kernel, grid, gaussian=None,
                 log_det=None):
        super().__init__()
        self.projection = projection
        self.gaussian = gaussian
        if log_det is not None:
            self.register_buffer("log_det", log_det)
        self.kernel = tuple(int(k) for k in kernel)
        self.grid = tuple(int(g) for g in grid)
        # avg_pool2d (stride = kernel, floor): fixed here, not read from a traced shape
        pooled = tuple(g // k for g, k in zip(self.grid, self.kernel))
        self.upsample = pooled != self.grid
        if self.upsample:  # bilinear from the pooled grid, as matrices (float64 in ONNX)
            like = dict(dtype=projection.components.dtype,
                        device=projection.components.device)
            self.register_buffer("rows", bilinear_matrix(pooled[0], self.grid[0], **like))
            self.register_buffer("cols", bilinear_matrix(pooled[1], self.grid[1], **like).T)

    def forward(self, x: torch.Tensor):
        x = x.to(self.projection.components.dtype)
        pooled = x if self.kernel == (1, 1) else _average_pool(x, self.kernel, self.grid)
        vectors = pooled.flatten(1)
        if self.gaussian is not None:
            return self.gaussian(self.projection(vectors)[:, None])[:, 0] + self.log_det
        squared = self.projection.residual(vectors).square().reshape(pooled.shape)
        maps = squared.sum(1)
        if self.upsample:
            maps = self.rows @ maps @ self.cols
        return squared.flatten(1).sum(1), maps


class DFMDetector(ScoreThenUpdateMixin, BaseSpatialDetector):
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
        ``score_type="nll"`` only): ``diag(singular_values_**2) / n_samples``, exactly
        diagonal since the coordinates are uncorrelated along principal axes.
    n_samples_seen_ : int
        Number of training images seen by ``fit`` and ``partial_fit``.
    input_shape_ : tuple of int
        Per-sample shape ``(C, H, W)`` seen in ``fit``.
    n_features_in_ : int
        Number of channels ``C``.
    offset_ : float
        Threshold on :meth:`score_samples` (see :class:`BaseDetector`).
    calibration_ : str
        ``"cross-fit"`` after ``fit`` (see Notes; ``"in-sample"`` with fewer than 10
        samples or when a fold cannot be fitted); ``"score-then-update"`` after a
        :meth:`partial_fit` that updated a fitted model; ``"held-out"`` after
        :meth:`calibrate`.

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
    fifths. The five fold PCAs come from one Gram matrix of the pooled training
    vectors (``O(n_samples**2 * n_pooled_features)``), each by an eigendecomposition
    of its four fifths' block (``O(n_samples**3)``) instead of an SVD of their rows,
    plus one scoring pass over the training set. With
    fewer training images than pooled features, a fold's subspace (fitted to four
    fifths of them) reconstructs a little worse than the full one, so the offset is
    conservative and ``predict`` flags somewhat fewer than ``contamination`` of new
    normals; :meth:`calibrate` on held-out normal images sets it exactly.

    **Streaming.** The PCA is kept as the factorised moments of every pooled vector
    seen: the count, the mean and the thin SVD ``vt.T diag(s**2) vt`` of the centred
    scatter (``min(n_samples_seen_, n_pooled_features)`` components, float64).
    :meth:`partial_fit` merges a batch into them (Chan et al.'s pairwise update in
    factorised form: the rows ``diag(s) vt``, the centred batch and ``sqrt(n_a n_b / n)
    (mean_b - mean_a)`` stacked, then one SVD), so the model after any split into
    batches is that of ``fit`` on all of them up to float64 rounding: components (up to
    sign), explained variances and scores agreed to ``1e-14`` on the tests' data. The
    state holds at most ``n_pooled_features**2`` numbers (less
    than the covariance while fewer images than pooled features have been seen), and a
    call costs one SVD of ``(min(n_seen, n_pooled_features) + n_batch + 1) x
    n_pooled_features``. ``fit`` keeps the same moments, so that :meth:`partial_fit` may
    follow it: a fitted model (and its pickle) holds ``min(n_samples,
    n_pooled_features) x n_pooled_features`` float64 numbers besides the components kept.
    The merges are deferred: ``partial_fit`` buffers the pooled vectors and merges them
    in one SVD when the buffer holds as many as the last refresh had seen (at least the
    moments' rows, at most ``4 * n_pooled_features``: never more than four times the
    moments) or when the model is read, so the SVDs of a stream cost a bounded multiple
    of one SVD of everything seen; a batch is scored by the model of the last refresh.
    ``offset_``: a call on an unfitted detector is ``fit`` (5-fold
    cross-fitting); later calls score the batch with the current model before absorbing
    it (score-then-update: out of sample) and set ``offset_`` to the
    ``contamination`` quantile of the latest 2,048 out-of-sample scores (the first
    batch's cross-fit included, in-sample ones never) by models that had seen at least
    half as many images as the one that scored the batch: earlier, smaller models
    score a little pessimistically, and this bounds how stale a score may be.
    :meth:`calibrate` after the last batch sets it from held-out normals.
    In the ``"nll"`` model, the mean of the PCA coordinates is 0 and their covariance
    ``diag(s**2) / n`` (both exact consequences of the moments).

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
    computes it in float32 through an SVD; here it is float64 with the precision
    factor of a Cholesky factor, computed once per fit (float32 on MPS). Scoring goes
    through the fitted kernel modules built once per fit and device
    (:class:`~skanomaly.functional.PCAProjection`, and
    :class:`~skanomaly.functional.GaussianScorer` for ``"nll"``); maps are pooled in
    float64 whatever the input dtype. Deviations: a fractional ``n_components`` keeps
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
    _private_state = (*BaseDetector._private_state, "_moments", "_offset_record")
    _streaming_state = ("_moments", "_offset_record")

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

    def _kernel(self, grid) -> tuple:
        """The pooling kernel on a (H, W) grid: an axis shorter than it is pooled whole."""
        return tuple(min(self.pooling_kernel_size, size) for size in grid)

    def _pooled(self, X: torch.Tensor) -> torch.Tensor:
        """Average-pooled maps (n_samples, C, h, w) in the working float dtype.

        Blocks of images are cast to the working dtype, then pooled (float32 sums near
        float32's maximum do not overflow), as the fitted module pools.
        """
        kernel = self._kernel(X.shape[2:])
        dtype = accumulation_dtype(X.device)
        if kernel == (1, 1):
            return X.to(dtype)
        step = max(1, _POOL_BLOCK // max(1, math.prod(X.shape[1:])))
        grid = tuple(X.shape[2:])
        return torch.cat([_average_pool(block.to(dtype), kernel, grid)
                          for block in X.split(step)])

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
        full = pca_fit(pooled.flatten(1))  # every component: the factorised moments
        self._set_model(X.shape[0], full.mean, full.singular_values, full.components)

    def _set_model(self, n: int, mean, s, vt) -> None:
        """Fitted attributes from the factorised moments of ``n`` pooled vectors."""
        fit = _pca_from_moments(n, mean, s, vt, self.n_components)
        gaussian = {}
        if self.score_type == "nll":
            _check_pca_rank(fit, n, mean.shape[0], "Gaussian (score_type='nll')")
            sk = fit.singular_values
            exponent = max_abs_exponent(sk)
            variance = ldexp(ldexp(sk, -exponent).square() / n, 2 * exponent)
            if not all_finite(variance):
                raise ValueError("the covariance of the PCA coordinates exceeds the range "
                                 f"of {variance.dtype}; rescale the features")
            gaussian = {"gaussian_mean_": to_numpy(torch.zeros_like(sk)),
                        "gaussian_covariance_": to_numpy(torch.diag(variance))}
        for name in ("gaussian_mean_", "gaussian_covariance_"):  # from an earlier "nll" fit
            self.__dict__.pop(name, None)
        self.__dict__.update(gaussian)
        self.components_ = to_numpy(fit.components)
        self.mean_ = to_numpy(fit.mean)
        self.explained_variance_ = to_numpy(fit.explained_variance)
        self.explained_variance_ratio_ = to_numpy(fit.explained_variance_ratio)
        self.singular_values_ = to_numpy(fit.singular_values)
        self.noise_variance_ = float(fit.noise_variance)
        self.n_components_ = fit.n_components
        self.n_samples_seen_ = int(n)
        self._moments = (int(n), to_numpy(mean), to_numpy(s), to_numpy(vt))

    def _fold_models(self, X: torch.Tensor, held_out):
        """The cross-fit's models: each fold's PCA from one Gram matrix of the pooled
        training vectors (:func:`~skanomaly.functional.decomposition.subset_moments`),
        not an SVD per fold."""
        vectors = self._pooled(X).flatten(1)
        for moments in subset_moments(vectors, [~held for held in held_out]):
            model = self._unfitted_copy()
            model.pooled_shape_ = self.pooled_shape_
            model._set_model(*moments)
            yield model

    def _check_pooling(self) -> None:
        """``ValueError`` if ``pooling_kernel_size`` changed since the model was fitted."""
        channels, *grid = self.input_shape_
        pooled = (channels, *(size // min(self.pooling_kernel_size, size) for size in grid))
        if pooled != tuple(self.pooled_shape_):
            raise ValueError(
                f"pooling_kernel_size={self.pooling_kernel_size} pools the maps to shape "
                f"{pooled}, but the model was fitted on pooled maps of shape "
                f"{tuple(self.pooled_shape_)} (pooling_kernel_size changed since): fit anew")

    #: fitted attributes that partial_fit leaves to the refresh (see finalize)
    _deferred = ("components_", "mean_", "explained_variance_", "explained_variance_ratio_",
                 "singular_values_", "noise_variance_", "n_components_", "gaussian_mean_",
                 "gaussian_covariance_")

    def _buffer_batch(self, X: torch.Tensor) -> None:
        """Keep a validated batch's pooled vectors for the next merge of the moments."""
        self._buffer = [*self._buffer, self._pooled(X).flatten(1)]
        self.n_samples_seen_ += int(X.shape[0])

    def _buffer_full(self) -> bool:
        """Whether the buffer holds as many vectors as the last refresh had seen, but at
        least the moments' rows and at most four times the number of features: the model
        that scores a batch has then seen at least about half the samples seen (or all
        but ``4 * n_features``), the buffer holds at most four times the moments, and
        the merges cost a bounded multiple of one SVD of everything seen."""
        n, _, s = self._moments[:3]
        limit = max(s.shape[0], min(n, 4 * self._moments[3].shape[1]))
        return sum(v.shape[0] for v in self._buffer) >= limit

    def _refresh_model(self) -> None:
        """Merge the buffered vectors into the moments at once and refit the PCA."""
        device = self._device()
        vectors = torch.cat([torch.as_tensor(v, device=device) for v in self._buffer])
        n, mean, s, vt = (torch.as_tensor(v, dtype=vectors.dtype, device=vectors.device)
                          if isinstance(v, np.ndarray) else v for v in self._moments)
        batch_mean = vectors.mean(0)
        merged = merge_moments((n, mean, s[:, None] * vt),
                               (vectors.shape[0], batch_mean, vectors - batch_mean))
        self._reset_device_cache()
        self._set_model(*merged)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the PCA with one more batch of (mostly) normal feature maps.

        On an unfitted detector the batch starts the model exactly as ``fit(X)``
        (``offset_`` by cross-fitting). Later calls (after ``fit`` too) first score the
        batch with the model of the last refresh, then buffer its pooled vectors; they
        are merged into the float64 moments at once, and the PCA refitted from them,
        when the buffer holds as many vectors as the last refresh had seen (at least the
        moments' rows, at most ``4 * n_pooled_features``) or when the model is read
        (scoring, a fitted attribute, :meth:`finalize`): after any split of the data
        into batches the model equals ``fit`` on all of it up to float64 rounding (see the class
        Notes). ``offset_`` is the ``contamination`` quantile of the latest
        out-of-sample scores (``calibration_ == "score-then-update"``), replacing one
        set by :meth:`calibrate`: call :meth:`calibrate` after the last batch to set it
        from held-out normals.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, C, H, W) or (n_samples, C)
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
            If the batch does not match the shape of earlier batches, holds NaN,
            infinity or values beyond the range (see the class Notes), if the first
            batch has fewer than 2 samples or an int ``n_components`` above what the
            data seen allow, or (``"nll"``) if the principal components kept span
            fewer dimensions than their number. The fitted state is then left as it
            was.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import DFMDetector
        >>> X = np.random.default_rng(0).normal(size=(60, 4, 8, 8))
        >>> det = DFMDetector(n_components=5, device="cpu")
        >>> for batch in np.array_split(X, 3):
        ...     det = det.partial_fit(batch)
        >>> whole = DFMDetector(n_components=5, device="cpu").fit(X)
        >>> det.n_samples_seen_, det.calibration_
        (60, 'score-then-update')
        >>> bool(np.allclose(det.score_samples(X[:5]), whole.score_samples(X[:5]), rtol=1e-8))
        True
        """
        return self._stream(X)

    def _check_streamed_batch(self) -> None:
        self._check_pooling()

    def _squared_error(self, X: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction error of the pooled maps, (n_samples, C, h, w)."""
        pooled = self._pooled(X)
        vectors = pooled.flatten(1)
        fit = self._pca()
        recon = pca_inverse_transform(pca_transform(vectors, fit), fit)
        return (vectors - recon).square().view(pooled.shape)

    def _build_torch_module(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        projection = PCAProjection(torch.from_numpy(self.components_),
                                   torch.from_numpy(self.mean_), dtype=dtype, device=device)
        gaussian = log_det = None
        if self.score_type == "nll":
            chol = regularized_cholesky(torch.from_numpy(self.gaussian_covariance_))
            gaussian = GaussianScorer.from_cholesky(
                torch.from_numpy(self.gaussian_mean_)[None], chol[None], squared=True,
                dtype=dtype, device=device)
            log_det = (2.0 * chol.diagonal().log().sum()).to(device=device, dtype=dtype)
        return _DFMModule(projection, self._kernel(self.input_shape_[1:]),
                          self.input_shape_[1:], gaussian, log_det)

    def _module(self, X: torch.Tensor) -> nn.Module:
        return self._scoring_module(X.device, accumulation_dtype(X.device))

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        module = self._module(X)
        out = module(X)
        if self.score_type == "fre":
            scores = out[0]
            if not all_finite(scores):  # the checked route rescales, or raises
                scores = _finite(self._squared_error(X).flatten(1).sum(dim=1), "squared "
                                 "reconstruction error")
            return scores
        if not all_finite(out):
            z = pca_transform(self._pooled(X).flatten(1), self._pca())
            gaussian = module.gaussian
            maha = mahalanobis(z, gaussian.mean[0], precision_cholesky=gaussian.U[0],
                               squared=True)
            out = _finite(maha + module.log_det, "Mahalanobis distance")
        return out

    def _score_and_map(self, X: torch.Tensor):
        if self.score_type == "fre":
            scores, maps = self._module(X)(X)
            if all_finite(scores) and all_finite(maps):
                return scores, maps
        return self._score(X), self._anomaly_map(X)  # the checked routes (or the error)

    def _anomaly_map(self, X: torch.Tensor) -> torch.Tensor:
        if self.score_type != "fre":
            raise ValueError(
                f"DFMDetector has no anomaly map for score_type={self.score_type!r}: the "
                "Gaussian likelihood is per image; fit with score_type='fre' for maps"
            )
        maps = self._module(X)(X)[1]
        if all_finite(maps):
            return maps
        maps = _finite(self._squared_error(X).sum(dim=1), "squared reconstruction error")
        return maps if maps.shape[1:] == X.shape[2:] else upsample_bilinear(maps, X.shape[2:])

    def _merge_partial(self, other: DFMDetector) -> None:
        """Fold the fit of ``other`` (on other samples) into this one, in place.

        For the tree reduction of per-block fits in :mod:`skanomaly._dask`: both
        factorised moments merge by ``partial_fit``'s :func:`merge_moments` and the PCA
        is refitted from them by the same ``_set_model``. ``offset_`` is not set.
        """
        def root(moments):
            n, mean, s, vt = moments
            mean, s, vt = (torch.as_tensor(v, dtype=torch.float64) for v in (mean, s, vt))
            return n, mean, s[:, None] * vt

        merged = merge_moments(root(self._moments), root(other._moments))
        self._reset_device_cache()
        self._set_model(*merged)
