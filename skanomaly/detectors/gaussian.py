"""One multivariate Gaussian over feature vectors, scored by Mahalanobis distance."""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ..base import BaseDetector, IncrementalMixin
from ..functional import (
    GaussianScorer,
    MomentAccumulator,
    all_finite,
    leave_one_out_mahalanobis,
    mahalanobis,
)
from ..functional.covariance import accumulation_dtype
from ..functional.mahalanobis import cholesky_or_raise

__all__ = ["GaussianDetector"]


def _ledoit_wolf_shrinkage(covariance: torch.Tensor, n_samples: int,
                           fourth_moment: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage from moments, as ``sklearn.covariance.ledoit_wolf_shrinkage``.

    ``covariance`` is the maximum-likelihood covariance ``S`` (d, d) and ``fourth_moment``
    the mean of ``||x - mean||**4`` over the samples. With ``mu = tr(S) / d``:
    ``beta = (fourth_moment - ||S||_F^2) / (d n)``, ``delta = ||S - mu I||_F^2 / d`` and the
    shrinkage is ``min(beta, delta) / delta`` (0 when ``delta`` is 0, e.g. for d = 1).
    """
    d = covariance.shape[-1]
    mu = covariance.trace() / d
    target = torch.eye(d, dtype=covariance.dtype, device=covariance.device) * mu
    delta = (covariance - target).square().sum() / d
    if float(delta) <= 0.0:
        return torch.zeros((), dtype=covariance.dtype, device=covariance.device)
    beta = (fourth_moment - covariance.square().sum()) / (d * n_samples)
    return (beta.clamp(min=0.0) / delta).clamp(max=1.0)


class _GaussianModule(nn.Module):
    """A fitted GaussianDetector's scoring: (N, D) samples -> squared distances (N,).

    The anomaly scores ``-score_samples`` of the fitted-module contract
    (:meth:`~skanomaly.base.BaseDetector._torch_module`); the state is the
    :class:`~skanomaly.functional.GaussianScorer`'s buffers (one Gaussian, P = 1).
    """

    def __init__(self, scorer: GaussianScorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(x[:, None])[:, 0]


class GaussianDetector(IncrementalMixin, BaseDetector):
    """Anomaly detection with one multivariate Gaussian and the Mahalanobis distance.

    Fits the mean and covariance of (deep) features of normal samples and scores a
    sample by its squared Mahalanobis distance to them (Rippel et al., 2020), like
    :class:`sklearn.covariance.EllipticEnvelope` without its robust (MCD) fit. The
    covariance can be shrunk towards a scaled identity (Ledoit-Wolf or a fixed amount),
    which keeps it invertible when features are many or collinear.

    Parameters
    ----------
    shrinkage : None, "ledoit-wolf" or float in [0, 1], default="ledoit-wolf"
        ``"ledoit-wolf"``: ``(1 - s) S + s mu I`` with ``S`` the empirical
        (maximum-likelihood) covariance, ``mu = trace(S) / n_features`` and the
        shrinkage ``s`` of Ledoit & Wolf (2004), as :class:`sklearn.covariance.LedoitWolf`:
        close to ``S`` when samples are plentiful, invertible when features are constant
        or collinear (e.g. the border pixels of scikit-learn's digits). A float ``s``: the
        same with a fixed shrinkage, as :class:`sklearn.covariance.ShrunkCovariance`.
        ``None``: ``S`` itself, as :class:`sklearn.covariance.EmpiricalCovariance`
        (singular data then need ``reg > 0``).
    reg : float >= 0, default=0.0
        Ridge added to the diagonal of the (shrunk) covariance before it is factorised,
        in squared feature units: a last resort for singular data.
    contamination : float in (0, 0.5], default=0.1
        Share of new normal samples that :meth:`predict` flags; sets ``offset_``.
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the kernels run; fitted attributes are CPU numpy arrays regardless.

    Attributes
    ----------
    location_ : ndarray of shape (n_features,), float64
        Mean of the training samples.
    covariance_ : ndarray of shape (n_features, n_features), float64
        Covariance estimate after shrinkage (without the ``reg`` ridge); computed on
        access (from the moments, or from ``covariance_cholesky_`` up to rounding when
        the moments were not kept), not stored.
    covariance_cholesky_ : ndarray of shape (n_features, n_features), float64
        Lower Cholesky factor of ``covariance_ + reg * I``, used for scoring.
    shrinkage_ : float
        Shrinkage intensity used (0 when ``shrinkage`` is None, the Ledoit-Wolf
        estimate for ``"ledoit-wolf"``).
    n_samples_seen_ : int
        Number of training samples accumulated by ``fit`` / ``partial_fit``.
    offset_ : float
        Threshold on :meth:`score_samples`; ``decision_function = score_samples - offset_``.
    n_features_in_ : int
        Number of features seen during ``fit``.
    input_shape_ : tuple of int
        Per-sample shape seen during ``fit``.

    Raises
    ------
    ValueError
        From ``fit`` / ``partial_fit``: fewer than 2 samples, or a covariance singular to
        working precision (constant or collinear features, ``n_samples <= n_features``)
        with no ``shrinkage`` or ``reg`` to make it invertible.

    See Also
    --------
    PaDiMDetector : one Gaussian per position of a feature map.
    sklearn.covariance.EllipticEnvelope : robust Gaussian outlier detection.

    Notes
    -----
    :meth:`score_samples` is minus the squared Mahalanobis distance, exactly
    ``-LedoitWolf().fit(X).mahalanobis(X)`` by default (``EmpiricalCovariance`` with
    ``shrinkage=None``, ``ShrunkCovariance`` with a float); scikit-learn's
    ``EllipticEnvelope`` uses the same convention. The covariance is the maximum-likelihood
    estimate (divided by ``n_samples``, not ``n_samples - 1``) to follow scikit-learn's
    covariance estimators.

    Statistics accumulate in float64 with a mergeable moment accumulator (Chan et al.
    updates), plus ``sum ||x - c||**4`` and ``sum ||x - c||**2 (x - c)`` about a fixed
    centre ``c`` (the first batch's mean) for the Ledoit-Wolf estimate. So
    :meth:`partial_fit` streams data of any size: after any split into batches the
    location, covariance and shrinkage equal those of ``fit`` on all the data up to
    float64 rounding. Every call leaves a usable model, so without ``shrinkage`` or
    ``reg`` the first batch needs more samples than features.

    Threshold. In-sample distances are shrunk (the sample pulled the mean and the
    covariance towards itself), so ``offset_`` is the ``contamination`` quantile of
    exact leave-one-out distances: each training sample's distance to the Gaussian
    refitted without it, from one rank-one downdate of the moments
    (:func:`~skanomaly.functional.leave_one_out_mahalanobis`; the shrinkage intensity,
    its target and ``reg`` are held at their full-data values). Cost: one more
    ``n_features``-sized Cholesky factorisation and one triangular solve per training
    sample. :meth:`partial_fit` sets it from the leave-one-out scores of its own batch
    under the updated model (earlier batches are not kept; a single ``partial_fit(X)``
    equals ``fit(X)``). :meth:`calibrate` sets it from held-out normal samples instead.

    No explicit inverse is formed: the precision factor ``U = L^{-T}`` of the Cholesky
    factor ``L`` (one triangular solve) is computed once per fit and device, and scores
    are one matrix product with it, ``O(n_features**2)`` per sample
    (:class:`~skanomaly.functional.GaussianScorer`, the module that ``_torch_module``
    returns and :mod:`skanomaly.export` exports).

    References
    ----------
    O. Rippel, P. Mertens and D. Merhof, "Modeling the Distribution of Normal Data in
    Pre-Trained Deep Features for Anomaly Detection", ICPR 2020, arXiv:2005.14140.

    O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional
    covariance matrices", Journal of Multivariate Analysis 88(2), 2004.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly import GaussianDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5))
    >>> det = GaussianDetector(shrinkage="ledoit-wolf", device="cpu").fit(X)
    >>> det.covariance_.shape
    (5, 5)
    >>> det.predict([[0.0] * 5, [8.0] * 5]).tolist()
    [1, -1]
    """

    # float64 second (and, for Ledoit-Wolf, fourth) moments
    _max_abs, _min_max_abs = 1e75, 1e-75
    _range_reason = "fourth moments of the features in float64"
    _private_state = (*BaseDetector._private_state, "_moments", "_centre", "_sum_sq2",
                      "_sum_sq_y", "_covariance_reg")
    _streaming_state = ("_moments", "_centre", "_sum_sq2", "_sum_sq_y")

    _parameter_constraints: dict = {
        **BaseDetector._parameter_constraints,
        "shrinkage": [None, StrOptions({"ledoit-wolf"}), Interval(Real, 0, 1, closed="both")],
        "reg": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(self, *, shrinkage="ledoit-wolf", reg=0.0, contamination=0.1, device="auto"):
        self.shrinkage = shrinkage
        self.reg = reg
        self.contamination = contamination
        self.device = device

    #: fitted attributes that partial_fit leaves to the refresh (see finalize)
    _deferred = ("location_", "covariance_cholesky_", "shrinkage_")

    def _accumulate(self, X: torch.Tensor, *, reset: bool, incremental: bool,
                    refresh: bool = True) -> None:
        # ``incremental`` makes no difference: the moments are always kept. Without
        # ``refresh`` only the moments are updated (partial_fit; see _refresh_factors).
        if reset:
            self._check_min_samples(X, 2)
        x = X.to(torch.float64)
        acc = MomentAccumulator(x.shape[1], device=x.device)
        if not reset:
            acc.merge(self._moments)
        acc.update(x)
        # Moments about a fixed centre for the fourth moment of Ledoit-Wolf.
        centre = acc.mean if reset else torch.as_tensor(self._centre, device=x.device)
        y = x - centre
        sq = y.square().sum(1)
        sum_sq2, sum_sq_y = sq.square().sum(), sq @ y
        if not reset:
            sum_sq2 = sum_sq2 + float(self._sum_sq2)
            sum_sq_y = sum_sq_y + torch.as_tensor(self._sum_sq_y, device=x.device)
        factors = self._factors(acc, centre, sum_sq2, sum_sq_y) if refresh else {}

        self._reset_device_cache()
        self._moments = acc.to("cpu")
        self._centre = centre.cpu().numpy()
        self._sum_sq2, self._sum_sq_y = float(sum_sq2), sum_sq_y.cpu().numpy()
        self.__dict__.update(factors)
        self.n_samples_seen_ = acc.n_samples_

    def _refresh_factors(self) -> None:
        """The factors of the moments that ``partial_fit`` accumulated (see finalize)."""
        device = self._device()
        self._reset_device_cache()
        factors = self._factors(
            self._moments.to(device), torch.as_tensor(self._centre, device=device),
            torch.tensor(self._sum_sq2, dtype=torch.float64, device=device),
            torch.as_tensor(self._sum_sq_y, device=device))
        self._moments.to("cpu")  # in place: the state stays CPU
        self.__dict__.update(factors)

    def _factors(self, acc, centre, sum_sq2, sum_sq_y) -> dict:
        """Shrinkage and Cholesky factor of the covariance of the moments ``acc``."""
        n, mean, emp_cov = acc.n_samples_, acc.mean, acc.covariance(ddof=0)
        if self.shrinkage == "ledoit-wolf":
            # mean ||x - mean||^4 from the moments about ``centre`` (see Notes).
            delta = mean - centre
            c = delta.square().sum()
            fourth = (sum_sq2 - 4 * delta @ sum_sq_y) / n + 4 * delta @ emp_cov @ delta \
                + 2 * c * emp_cov.trace() + 3 * c * c
            shrinkage = float(_ledoit_wolf_shrinkage(emp_cov, n, fourth))
        else:
            shrinkage = float(self.shrinkage or 0.0)
        covariance = emp_cov * (1.0 - shrinkage)
        covariance.diagonal().add_(shrinkage * float(emp_cov.trace()) / emp_cov.shape[0])
        factor = cholesky_or_raise(
            covariance, float(self.reg),
            f"{type(self).__name__}: the covariance of the {n} training samples is singular "
            "(constant or collinear features, or n_samples <= n_features); use "
            "shrinkage='ledoit-wolf' (or a float) or a ridge reg > 0")
        # covariance_ is not kept: it is computed from the moments on access
        return {"location_": mean.cpu().numpy(), "covariance_cholesky_": factor.cpu().numpy(),
                "_covariance_reg": float(self.reg), "shrinkage_": shrinkage}

    @property
    def covariance_(self) -> np.ndarray:
        """Covariance estimate after shrinkage (without the ``reg`` ridge).

        Computed on access, not stored: from the moments and ``shrinkage_`` (the matrix
        the fit factorised) while the detector keeps them, else from
        ``covariance_cholesky_`` (``L L^T - reg * I``, equal up to rounding), for a
        detector saved without its streaming state.
        """
        if "covariance_cholesky_" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute "
                                 "'covariance_' (it exists after fit)")
        moments = self.__dict__.get("_moments")
        if moments is not None:
            emp_cov = moments.covariance(ddof=0)
            covariance = emp_cov * (1.0 - self.shrinkage_)
            covariance.diagonal().add_(self.shrinkage_ * float(emp_cov.trace())
                                       / emp_cov.shape[0])
            return covariance.cpu().numpy()
        factor = torch.from_numpy(self.covariance_cholesky_)
        covariance = factor @ factor.mT
        covariance.diagonal().sub_(self._covariance_reg)
        return covariance.numpy()

    _loo_ddof = 0

    def _leave_one_out(self, X: torch.Tensor) -> torch.Tensor:
        moments = self._moments.to(X.device)
        scatter, n = moments.scatter, self.n_samples_seen_
        target = scatter.diagonal().sum() / (n * scatter.shape[0])
        return leave_one_out_mahalanobis(X, moments.mean, scatter, n,
                                         shrinkage=self.shrinkage_, target=target,
                                         reg=float(self.reg))

    def _build_torch_module(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        scorer = GaussianScorer.from_cholesky(
            torch.from_numpy(self.location_)[None],
            torch.from_numpy(self.covariance_cholesky_)[None],
            squared=True, dtype=dtype, device=device)
        return _GaussianModule(scorer)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        module = self._scoring_module(X.device, accumulation_dtype(X.device))
        d2 = module(X)
        if not all_finite(d2):  # unscaled products overflowed: the checked route rescales
            scorer = module.scorer
            d2 = mahalanobis(X, scorer.mean[0], precision_cholesky=scorer.U[0], squared=True)
        return d2

    def _merge_partial(self, other: GaussianDetector) -> None:
        """Fold the fit of ``other`` (on other samples) into this one, in place.

        For the tree reduction of per-block fits in :mod:`skanomaly._dask`: the moments
        merge by :meth:`MomentAccumulator.merge` (Chan et al.), ``other``'s sums of
        ``||y||**4`` and ``||y||**2 y`` (``y = x - c_b``) move to this fit's centre
        ``c_a`` (``x - c_a = y + e``, ``e = c_b - c_a``, expanded exactly), and the model is
        refreshed by ``partial_fit``'s own step on an empty batch. ``offset_`` is not set.
        """
        f64 = dict(dtype=torch.float64)
        theirs = other._moments
        n_b, e = theirs.n_samples_, torch.as_tensor(other._centre - self._centre, **f64)
        u = theirs.mean.cpu() - torch.as_tensor(other._centre, **f64)  # mean of y
        yy = theirs.scatter.cpu() + n_b * torch.outer(u, u)  # sum y y^T
        s1, s2, ee = n_b * u, yy.trace(), e @ e  # sum y, sum ||y||^2, ||e||^2
        s2y = torch.as_tensor(other._sum_sq_y, **f64)
        sum_sq2 = (float(other._sum_sq2) + 4 * e @ yy @ e + n_b * ee * ee + 4 * e @ s2y
                   + 2 * ee * s2 + 4 * ee * (e @ s1))
        sum_sq_y = s2y + 2 * yy @ e + ee * s1 + e * s2 + 2 * e * (e @ s1) + n_b * ee * e
        self._moments = MomentAccumulator(self.n_features_in_).merge(
            self._moments.to("cpu")).merge(theirs)
        self._sum_sq2 = self._sum_sq2 + float(sum_sq2)
        self._sum_sq_y = self._sum_sq_y + sum_sq_y.numpy()
        self._accumulate(torch.empty(0, self.n_features_in_, **f64), reset=False,
                         incremental=True)
