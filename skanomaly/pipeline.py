"""A scikit-learn :class:`~sklearn.pipeline.Pipeline` that reaches its detector's maps.

``model[-1].anomaly_map(model[:-1].transform(X), output_size=...)`` becomes
``model.anomaly_map(X)``: :class:`AnomalyPipeline` is a ``Pipeline`` (same parameters,
``clone``, ``get_params``, grid search) with the detector's :meth:`anomaly_map` and
:meth:`calibrate` and :meth:`pvalues` reached through the earlier steps.
"""

from __future__ import annotations

import numpy as np
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

__all__ = ["AnomalyPipeline", "make_anomaly_pipeline"]


def _final_has(attr):
    def check(self):
        getattr(self._final_estimator, attr)  # AttributeError: the method is not available
        return True

    return check


def _image_size(X):
    """(H, W) of 4-D image input ``X`` (any array-like or tensor), else None."""
    shape = tuple(X.shape) if hasattr(X, "shape") else np.shape(X)
    return tuple(int(s) for s in shape[-2:]) if len(shape) == 4 else None


class AnomalyPipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` ending in a skanomaly detector, with maps.

    Everything of scikit-learn's ``Pipeline`` (parameters, ``fit``, ``score_samples``,
    ``decision_function``, ``predict``, ``clone``, ``get_params``/``set_params``,
    :class:`~sklearn.model_selection.GridSearchCV`), plus :meth:`anomaly_map` (when the
    last step is a spatial detector: PaDiM, PatchCore, DFM), :meth:`calibrate` and
    :meth:`pvalues`, which run ``X`` through the earlier steps first.

    Parameters
    ----------
    steps : list of (str, estimator) tuples
        As in :class:`~sklearn.pipeline.Pipeline`; typically a
        :class:`~skanomaly.features.FeatureExtractor` then a detector.
    memory, verbose, **kwargs
        As in :class:`~sklearn.pipeline.Pipeline` (whose constructor this class keeps).

    See Also
    --------
    make_anomaly_pipeline : Build one from estimators, naming the steps.
    skanomaly.export.to_torch : The fitted pipeline as one torch module.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly import AnomalyPipeline, FeatureExtractor, PaDiMDetector
    >>> X = np.random.default_rng(0).random((12, 3, 32, 32), dtype=np.float32)
    >>> model = AnomalyPipeline([
    ...     ("features", FeatureExtractor("resnet18", ["layer1"], random_state=0)),
    ...     ("padim", PaDiMDetector(n_features=8, random_state=0))]).fit(X)
    >>> model.anomaly_map(X[:2]).shape  # at the image size
    (2, 32, 32)
    >>> model.anomaly_map(X[:2], output_size=16).shape
    (2, 16, 16)
    """

    @available_if(_final_has("anomaly_map"))
    def anomaly_map(self, X, output_size=None, sigma=4.0):
        """Per-pixel anomaly scores of ``X``: its detector's map through the earlier steps.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step: images (n_samples, C, H, W) for a pipeline that
            starts with a :class:`~skanomaly.features.FeatureExtractor`.
        output_size : int, (int, int) or None, default=None
            Map size (height, width) in pixels. ``None`` means the input image size
            (H, W) when the first step is a ``FeatureExtractor`` and ``X`` is 4-D,
            else the detector's feature resolution (no upsampling nor blur).
        sigma : float, default=4.0
            Standard deviation of the Gaussian blur in output pixels, applied when the
            map is upsampled (see the detector's ``anomaly_map``).

        Returns
        -------
        maps : ndarray of shape (n_samples, height, width), float64
            Higher = more anomalous; ``self[-1].anomaly_map(self[:-1].transform(X),
            output_size, sigma)``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the pipeline is not fitted.
        ValueError
            If ``X`` is invalid for the first step, or ``output_size``/``sigma`` for
            the detector.
        """
        from .features import FeatureExtractor

        check_is_fitted(self)
        if output_size is None and isinstance(self.steps[0][1], FeatureExtractor):
            output_size = _image_size(X)
        Xt = self[:-1].transform(X) if len(self) > 1 else X
        return self._final_estimator.anomaly_map(Xt, output_size=output_size, sigma=sigma)

    @available_if(_final_has("calibrate"))
    def calibrate(self, X, y=None):
        """Set the detector's threshold from held-out normal input, or from labelled
        validation input (see :func:`skanomaly.calibrate`).

        Parameters
        ----------
        X : array-like or torch.Tensor
            Normal samples not used in ``fit`` (or, with ``y``, labelled validation
            samples), in the input format of the first step.
        y : array-like of shape (n_samples,) or None, default=None
            None: the conformal threshold. +1 / -1 labels: the F1-maximising one.

        Returns
        -------
        self : AnomalyPipeline
            The pipeline, its detector's ``offset_`` and ``calibration_`` updated.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the pipeline is not fitted.
        TypeError
            If the last step is not a skanomaly detector.
        """
        from .base import calibrate

        check_is_fitted(self)
        return calibrate(self, X, y)

    @available_if(_final_has("calibrate_pixels"))
    def calibrate_pixels(self, X, masks=None, *, output_size=None, sigma=4.0):
        """Set the detector's pixel threshold from validation input (spatial detectors).

        See :meth:`~skanomaly.base.BaseSpatialDetector.calibrate_pixels`: F1-maximising
        over the pixels of ``masks``, or without masks the conformal ``contamination``
        quantile of the pixels of normal input.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Validation input of the first step.
        masks : array-like of bool of shape (n_samples, height, width), optional
            Ground truth; the maps are computed at its size.
        output_size : int, (int, int) or None, default=None
            Without ``masks``: the map size; ``None`` means as :meth:`anomaly_map` (the
            input image size after a ``FeatureExtractor``).
        sigma : float, default=4.0
            Blur of upsampled maps.

        Returns
        -------
        self : AnomalyPipeline
            The pipeline, its detector's pixel threshold set.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import AnomalyPipeline, FeatureExtractor, PaDiMDetector
        >>> X = np.random.default_rng(0).random((14, 3, 32, 32), dtype=np.float32)
        >>> model = AnomalyPipeline([
        ...     ("features", FeatureExtractor("resnet18", ["layer1"], random_state=0)),
        ...     ("padim", PaDiMDetector(n_features=8, random_state=0))]).fit(X[:10])
        >>> model.calibrate_pixels(X[10:]).predict_mask(X[:2]).shape
        (2, 32, 32)
        """
        from .features import FeatureExtractor

        check_is_fitted(self)
        first = self.steps[0][1]
        if masks is None and output_size is None and isinstance(first, FeatureExtractor):
            output_size = _image_size(X)
        Xt = self[:-1].transform(X) if len(self) > 1 else X
        self._final_estimator.calibrate_pixels(Xt, masks, output_size=output_size,
                                               sigma=sigma)
        return self

    @available_if(_final_has("predict_mask"))
    def predict_mask(self, X):
        """Predicted anomalous pixels of ``X``: the detector's, through the earlier steps.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step.

        Returns
        -------
        masks : ndarray of bool of shape (n_samples, height, width)
            ``self[-1].predict_mask(self[:-1].transform(X))`` (after
            :meth:`calibrate_pixels`).

        Examples
        --------
        See :meth:`calibrate_pixels`.
        """
        check_is_fitted(self)
        Xt = self[:-1].transform(X) if len(self) > 1 else X
        return self._final_estimator.predict_mask(Xt)

    @available_if(_final_has("pvalues"))
    def pvalues(self, X):
        """Conformal p-values of normality of ``X``: its detector's, through the earlier steps.

        See :meth:`~skanomaly.base.BaseDetector.pvalues` (after :meth:`calibrate` on
        held-out normal input): the share of calibration samples at least as anomalous,
        with the +1 correction.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step.

        Returns
        -------
        pvalues : ndarray of shape (n_samples,), float64
            ``self[-1].pvalues(self[:-1].transform(X))``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the pipeline is not fitted or its detector not calibrated.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.preprocessing import StandardScaler
        >>> from skanomaly import GaussianDetector, make_anomaly_pipeline
        >>> rng = np.random.default_rng(0)
        >>> model = make_anomaly_pipeline(StandardScaler(), GaussianDetector(device="cpu"))
        >>> model = model.fit(rng.normal(size=(200, 2))).calibrate(rng.normal(size=(49, 2)))
        >>> model.pvalues([[0.0, 0.0], [9.0, 9.0]])
        array([1.  , 0.02])
        """
        from .base import pvalues

        check_is_fitted(self)
        return pvalues(self, X)


def make_anomaly_pipeline(*steps, memory=None, verbose=False):
    """An :class:`AnomalyPipeline` from estimators, named as
    :func:`~sklearn.pipeline.make_pipeline` names them (lowercased class names).

    Parameters
    ----------
    *steps : estimators
        Typically a :class:`~skanomaly.features.FeatureExtractor` then a detector.
    memory : str, object with the joblib.Memory interface or None, default=None
        As in :func:`~sklearn.pipeline.make_pipeline`.
    verbose : bool, default=False
        As in :func:`~sklearn.pipeline.make_pipeline`.

    Returns
    -------
    AnomalyPipeline
        The unfitted pipeline.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.base import clone
    >>> from skanomaly import DFMDetector, FeatureExtractor, make_anomaly_pipeline
    >>> X = np.random.default_rng(0).random((12, 3, 32, 32), dtype=np.float32)
    >>> model = make_anomaly_pipeline(FeatureExtractor(random_state=0), DFMDetector())
    >>> [name for name, _ in model.steps]
    ['featureextractor', 'dfmdetector']
    >>> clone(model).fit(X).anomaly_map(X[:1]).shape
    (1, 32, 32)
    """
    plain = make_pipeline(*steps, memory=memory, verbose=verbose)
    return AnomalyPipeline(plain.steps, memory=memory, verbose=verbose)
