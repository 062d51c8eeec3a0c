"""A fitted detector or pipeline as one torch module, and as an ONNX or TorchScript file.

:func:`to_torch` composes the fitted kernel modules (the feature extractor's images ->
features module, the detector's scoring module, the anomaly-map post-processing) into
one eval-mode :class:`torch.nn.Module`; :func:`export` traces it to ONNX (``.onnx``,
TorchScript-based exporter, dynamic batch axis) or TorchScript (``.pt``). Nothing is
implemented twice: the module runs the same kernels as the estimator's methods.

The decision threshold is not part of the graph: it travels as metadata beside it
(the module's ``metadata`` dict; ONNX ``metadata_props``; a ``metadata.json`` extra
file in TorchScript archives), read back by :func:`read_metadata`, so it can be
changed (recalibrated) without exporting again.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from .base import BaseDetector, BaseSpatialDetector, resolve_device
from .functional.tiling import resize_tiles, tile, tile_grid, untile

__all__ = ["to_torch", "export", "read_metadata", "METADATA_KEY", "DEFAULT_OPSET"]

#: key of the JSON metadata in an ONNX file's ``metadata_props`` (the decision threshold
#: also has its own key, ``"threshold"``) and, with ``.json``, the extra file of a
#: TorchScript archive
METADATA_KEY = "skanomaly"
_EXTRA_FILE = "metadata.json"
#: ONNX opset of :func:`export` (torch's TorchScript-based exporter supports 7-20 in
#: torch 2.1 and later; onnxruntime >= 1.16 runs 17)
DEFAULT_OPSET = 17
_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript"}
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _input_ranks(features, scaler, detector) -> tuple[int, ...]:
    """Ranks of the input the estimator takes: images (n, C, H, W) for a pipeline with a
    feature extractor, (n, D) for a Gaussian or after a StandardScaler, (n, C, H, W) for
    a bare spatial detector (or DFKDE) and also (n, C) where its maps are 1 x 1."""
    if features is not None:
        return (4,)
    if scaler is not None or detector._sample_ndim == 1:
        return (2,)
    return (2, 4) if tuple(detector.input_shape_[1:]) == (1, 1) else (4,)


def _describe_input(ranks, sample_shape, images: bool) -> str:
    """The input a module takes, in words: "2-D (n, 5) or 4-D (n, 5, 1, 1) features"."""
    if images:
        return "4-D images (n, channels, height, width)"
    shapes = {2: (sample_shape[0],), 4: tuple(sample_shape)}
    return " or ".join(f"{r}-D {('n', *shapes[r])}".replace("'", "") for r in ranks) + \
        " features"


class _Exported(torch.nn.Module):
    """features (optional) -> detector module -> map post-processing (optional).

    ``forward(x)`` returns float32 ``scores`` (n,) — and ``maps`` (n, H, W) for spatial
    detectors — whatever the detector module's dtype; maps are post-processed (upsampled
    to the input image size and blurred) in float32 when ``post`` is given. ``x`` must
    have one of the ``ranks`` (the estimator's: see :func:`_input_ranks`); 2-D input of
    a detector on 1 x 1 maps is read as (n, D, 1, 1), as the estimator reads it. Out of
    a trace, features of another per-sample shape than ``sample_shape`` are rejected too.
    """

    def __init__(self, features, detector, post, *, spatial: bool, metadata: dict,
                 ranks: tuple[int, ...], sample_shape: tuple[int, ...], tiling=None):
        super().__init__()
        #: (tile_size, stride, merge, resize) of a tiled pipeline, else None
        self.tiling = tiling
        self.features = features
        self.detector = detector
        self.post = post
        self.spatial = spatial
        self.metadata = metadata
        self.ranks = tuple(ranks)
        #: per-sample shape of the detector's input (features only; None for images)
        self.sample_shape = None if features is not None else tuple(sample_shape)
        #: (H, W) of the maps, set by export() from its example: under a trace, sizes read
        #: from ``x`` are traced values (and the graph's image size is fixed anyway)
        self.image_size = None

    def expects(self) -> str:
        """The input this module takes, in words (for error messages)."""
        return _describe_input(self.ranks, self.sample_shape or (), self.sample_shape is None)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in self.ranks:
            raise ValueError(f"expected {self.expects()}, got a {x.dim()}-D input of shape "
                             f"{tuple(x.shape)}")
        if self.sample_shape is None or torch.jit.is_tracing():
            return  # images: the backbone takes any size; a trace keeps sizes symbolic
        want = self.sample_shape if x.dim() == len(self.sample_shape) + 1 \
            else self.sample_shape[:1]
        if tuple(x.shape[1:]) != tuple(want):
            raise ValueError(f"expected {self.expects()}, got shape {tuple(x.shape)}")

    def _tiled(self, x: torch.Tensor):
        """Images -> tiles -> features -> detector -> scores and stitched maps, as
        :class:`~skanomaly.AnomalyPipeline` with ``tile_size`` computes them."""
        size, stride, merge, resize = self.tiling
        image = self.image_size or (int(x.shape[-2]), int(x.shape[-1]))
        n_tiles = len(tile_grid(image, size, stride))
        out = self.detector(self.features(self._tiles(x)))
        scores, maps = out if self.spatial else (out, None)
        scores = scores.to(torch.float32).reshape(-1, n_tiles).amax(dim=1)
        if maps is None:
            return scores
        maps = untile(self.post(maps.to(torch.float32), size), image, stride, merge)
        return scores, maps

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """The tiles of images ``x`` as the extractor takes them (resized if set)."""
        size, stride, _, resize = self.tiling
        tiles = tile(x, size, stride)
        return tiles if resize is None else resize_tiles(tiles, resize)

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        if self.tiling is not None:
            return self._tiled(x)
        if x.dim() == 2 and 4 in self.ranks:  # (n, D): 1 x 1 maps, as the estimator reads it
            x = x[:, :, None, None]
        z = x if self.features is None else self.features(x)
        out = self.detector(z)
        if not self.spatial:
            return out.to(torch.float32)
        scores, maps = out
        maps = maps.to(torch.float32)
        if self.post is not None:
            size = self.image_size or (int(x.shape[-2]), int(x.shape[-1]))
            maps = self.post(maps, size)
        return scores.to(torch.float32), maps


class _Standardize(torch.nn.Module):
    """A fitted :class:`~sklearn.preprocessing.StandardScaler`: ``(x - mean_) / scale_``.

    Computed in float64 and rounded to the input's float32, as the scaler computes on
    float32 input (its float64 statistics, the result cast back); ``(n, D, 1, 1)`` out
    for a spatial detector (its reading of 2-D input).
    """

    def __init__(self, scaler, n_features: int, to_maps: bool, device):
        super().__init__()
        f64 = dict(dtype=torch.float64, device=device)
        mean, scale = scaler.mean_, scaler.scale_
        self.register_buffer("mean", torch.zeros(n_features, **f64) if mean is None
                             else torch.as_tensor(np.asarray(mean), **f64))
        self.register_buffer("scale", torch.ones(n_features, **f64) if scale is None
                             else torch.as_tensor(np.asarray(scale), **f64))
        self.to_maps = to_maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ((x.to(torch.float64) - self.mean) / self.scale).to(x.dtype)
        return y[:, :, None, None] if self.to_maps else y


def _json_safe(value):
    """``value`` as JSON: numbers, str, None, lists and dicts; anything else by repr."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (torch.device, torch.dtype, os.PathLike)):
        return str(value)
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    return repr(value)


def _split(estimator):
    """``(feature_extractor, scaler, detector)`` of a supported estimator (the first two
    may be None), else TypeError."""
    from sklearn.preprocessing import StandardScaler

    from .features import FeatureExtractor

    if isinstance(estimator, BaseDetector):
        return None, None, estimator
    if isinstance(estimator, Pipeline):
        steps = [step for _, step in estimator.steps]
        kinds = ", ".join(type(s).__name__ if s not in (None, "passthrough") else repr(s)
                          for s in steps)
        if len(steps) == 1 and isinstance(steps[0], BaseDetector):
            return None, None, steps[0]
        if len(steps) == 2 and isinstance(steps[1], BaseDetector):
            if isinstance(steps[0], FeatureExtractor):
                return steps[0], None, steps[1]
            if type(steps[0]) is StandardScaler:
                return None, steps[0], steps[1]
        raise TypeError(
            f"to_torch exports a Pipeline of a FeatureExtractor then a skanomaly detector, "
            f"of a StandardScaler then a detector (2-D input), or of a detector alone; "
            f"this one has steps {kinds}. Export the detector alone (pipeline[-1]) and "
            "run the other steps before it")
    raise TypeError(f"to_torch takes a fitted skanomaly detector or a Pipeline of a "
                    f"FeatureExtractor then a detector, got {type(estimator).__name__}")


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in (torch.float64, torch.float32):
        return dtype
    raise ValueError(f"dtype must be torch.float64 or torch.float32 (or their names), got "
                     f"{dtype!r}")


def _metadata(features, scaler, detector, dtype: torch.dtype, sigma, spatial: bool) -> dict:
    from ._version import __version__

    meta = {
        "format_version": 1,
        "skanomaly_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "detector": type(detector).__name__,
        "detector_params": _json_safe(detector.get_params(deep=False)),
        # outlier where scores > threshold (predict: decision_function < 0)
        "threshold": float(-detector.offset_),
        "offset": float(detector.offset_),
        "contamination": float(detector.contamination),
        "calibration": getattr(detector, "calibration_", None),
        "input": "features" if features is None else "images",
        "outputs": ["scores", "maps"] if spatial else ["scores"],
        "detector_dtype": str(dtype).replace("torch.", ""),
        "feature_shape": _json_safe(detector.input_shape_),
    }
    if features is not None:
        shape = getattr(features, "input_shape_", None)
        meta.update(
            backbone=_json_safe(features.backbone),
            weights=_json_safe(features.weights),
            layers=list(features.layers_),
            normalize=bool(features.normalize),
            input_shape=_json_safe(shape),
            image_size=None if shape is None else _json_safe(shape[1:]),
        )
        if spatial:
            meta["sigma"] = float(sigma)
    elif scaler is not None:
        meta["input_shape"] = [int(scaler.n_features_in_)]
        meta["preprocessing"] = "StandardScaler"
    else:
        meta["input_shape"] = _json_safe(detector.input_shape_)
    return meta


def to_torch(estimator, *, device="cpu", dtype=torch.float64, sigma=4.0):
    """A fitted detector or pipeline as one eval-mode :class:`torch.nn.Module`.

    Composed from the fitted kernel modules the estimator scores with (no second
    implementation): for a :class:`~sklearn.pipeline.Pipeline` of a
    :class:`~skanomaly.features.FeatureExtractor` then a detector, the images ->
    features module (ImageNet normalisation, the backbone cut after its last hooked
    layer, resizing and concatenation), the detector's scoring module and, for spatial
    detectors, the anomaly-map post-processing (bilinear upsampling to the input image
    size, Gaussian blur).

    Parameters
    ----------
    estimator : fitted detector or Pipeline
        A skanomaly detector, or a ``Pipeline`` (or :class:`~skanomaly.AnomalyPipeline`)
        of a ``FeatureExtractor`` then a detector, or of a
        :class:`~sklearn.preprocessing.StandardScaler` then a detector (2-D input).
    device : str or torch.device, default="cpu"
        Where the module's parameters and buffers live.
    dtype : torch.float64 or torch.float32 (or "float64", "float32"), default=torch.float64
        Dtype the detector's statistics compute in: float64 agrees with the estimator
        to float64 rounding; float32 is faster and halves the detector's buffers (about
        1e-6 relative on image features). The backbone and the map post-processing
        always run in float32.
    sigma : float, default=4.0
        Blur standard deviation (output pixels) of the maps of a pipeline with a
        spatial detector, as in the detector's ``anomaly_map``.

    Returns
    -------
    module : torch.nn.Module
        In eval mode, without gradients, owning copies of its tensors (changing it does
        not change the estimator). ``module(x)`` takes float32 ``x`` of the ranks the
        estimator takes: images (n, 3, H, W) in [0, 1] for a pipeline (grayscale
        (n, 1, H, W) too when the extractor normalises), feature maps (n, C, h, w) for a
        bare spatial detector (or DFKDE) and also (n, C) where the maps are 1 x 1 (as
        when fitted on 2-D data, read as (n, C, 1, 1)), (n, D) for
        :class:`~skanomaly.GaussianDetector` and after a ``StandardScaler``, shaped as
        in ``fit``; input of another rank (or, for features, another per-sample shape)
        raises ``ValueError`` naming the shapes. It returns
        ``scores``, float32 (n,), the anomaly scores ``-score_samples(x)`` (higher = more
        anomalous), and for PaDiM, PatchCore and DFM (``score_type="fre"``; ``"nll"``
        has no maps) the tuple ``(scores, maps)``,
        ``maps`` float32 (n, H, W): ``anomaly_map(x, output_size=(H, W), sigma=sigma)``
        at the input image size for a pipeline, ``anomaly_map(x)`` at feature resolution
        for a bare detector. For an :class:`~skanomaly.AnomalyPipeline` with
        ``tile_size``, the graph tiles the images (and resizes the tiles, with
        ``tile_resize``), scores the tiles and stitches their maps at the image size
        (scores: the largest of each image's tiles), as the pipeline does; its metadata
        adds ``tile_size``, ``tile_stride``, ``tile_merge``, ``tile_resize``.
        ``module.metadata`` is a JSON-ready dict: ``threshold``
        (a sample is an outlier where ``scores > threshold``: ``-offset_``),
        ``contamination``, ``calibration``, the detector's class and parameters,
        skanomaly and torch versions and, for a pipeline, ``backbone``, ``weights``,
        ``layers``, ``image_size``. Input is not validated (the estimator's methods do
        that); uint8 images must be scaled to [0, 1] first.

    Raises
    ------
    TypeError
        If ``estimator`` is neither a skanomaly detector nor a supported pipeline.
    sklearn.exceptions.NotFittedError
        If the detector or the feature extractor is not fitted.
    ValueError
        If ``dtype`` or ``device`` is not supported.

    See Also
    --------
    export : The same module as an ONNX or TorchScript file.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skanomaly import PaDiMDetector
    >>> from skanomaly.export import to_torch
    >>> X = np.random.default_rng(0).normal(size=(40, 6, 4, 4))
    >>> det = PaDiMDetector(random_state=0, device="cpu").fit(X)
    >>> module = to_torch(det)
    >>> scores, maps = module(torch.as_tensor(X[:3], dtype=torch.float32))
    >>> scores.shape, maps.shape, scores.dtype
    (torch.Size([3]), torch.Size([3, 4, 4]), torch.float32)
    >>> np.allclose(scores.numpy(), -det.score_samples(X[:3].astype(np.float32)),
    ...             rtol=1e-5)
    True
    >>> module.metadata["threshold"] == -det.offset_
    True

    Tabular data: a detector fitted on (n, D) takes (n, D), as its ``score_samples``
    does, and (n, D, 1, 1):

    >>> from skanomaly import DFKDEDetector
    >>> X2 = np.random.default_rng(0).normal(size=(100, 4))
    >>> kde = DFKDEDetector(random_state=0, device="cpu").fit(X2)
    >>> scores = to_torch(kde)(torch.as_tensor(X2[:3]))
    >>> np.allclose(scores.numpy(), -kde.score_samples(X2[:3]), rtol=1e-5)
    True
    >>> to_torch(kde)(torch.zeros(3, 4, 1))
    Traceback (most recent call last):
    ...
    ValueError: expected 2-D (n, 4) or 4-D (n, 4, 1, 1) features, got a 3-D input of shape (3, 4, 1)
    """
    features, scaler, detector = _split(estimator)
    check_is_fitted(detector)
    for step in (features, scaler):
        if step is not None:
            check_is_fitted(step)
    dtype = _resolve_dtype(dtype)
    dev = resolve_device(device)
    scoring = detector._torch_module(dev, dtype)
    # maps or not: what the module returns (DFM's "nll" has no maps), on one zero sample
    with torch.no_grad():
        probe = scoring(torch.zeros((1, *detector.input_shape_), dtype=dtype, device=dev))
    spatial = isinstance(probe, tuple)
    post = None
    if features is not None and spatial:
        from .anomaly_map import AnomalyMapPostprocess

        post = AnomalyMapPostprocess(sigma=sigma, device=dev)
    first = None if features is None else features._torch_module(dev)
    if scaler is not None:
        first = _Standardize(scaler, int(scaler.n_features_in_),
                             isinstance(detector, BaseSpatialDetector) or
                             detector._sample_ndim > 1, dev)
    ranks = _input_ranks(features, scaler, detector)
    sample_shape = ((int(scaler.n_features_in_),) if scaler is not None
                    else tuple(int(d) for d in detector.input_shape_))
    tiling = estimator._tiling() if hasattr(estimator, "_tiling") else None
    metadata = _metadata(features, scaler, detector, dtype, sigma, spatial)
    if tiling is not None:
        size, stride, merge, resize = tiling
        shape = getattr(estimator, "tiled_input_shape_", None)
        metadata.update(tile_size=list(size), tile_stride=list(stride), tile_merge=merge,
                        tile_resize=None if resize is None else list(resize),
                        input_shape=_json_safe(shape),
                        image_size=None if shape is None else _json_safe(shape[1:]))
    module = _Exported(first, scoring, post, spatial=spatial, metadata=metadata,
                       ranks=ranks, sample_shape=sample_shape, tiling=tiling)
    # own copies: the estimator's cached modules share tensors with its attributes
    module = copy.deepcopy(module).to(dev).eval()
    module.requires_grad_(False)
    return module


def _example(example_input, module) -> torch.Tensor:
    meta = module.metadata
    if example_input is None:
        shape = meta.get("input_shape")
        if shape is None:
            raise ValueError("pass example_input: the feature extractor was pickled "
                             "without input_shape_ (an older skanomaly)")
        return torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    x = example_input
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.uint8:
            x = x / 255
    else:
        arr = np.asarray(x)
        if arr.dtype == np.uint8:
            arr = arr / 255
        x = torch.as_tensor(arr)
    if not x.is_floating_point():
        raise TypeError(f"example_input must hold floats, got {x.dtype}")
    x = x.to(torch.float32)
    want = meta["input_shape"]
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"example_input must hold at least one sample, got shape "
                         f"{tuple(x.shape)}")
    if meta["input"] == "features" and want is not None:
        if x.ndim not in module.ranks:
            raise ValueError(f"example_input must be {module.expects()}, got shape "
                             f"{tuple(x.shape)}")
        # (n, D) of a detector on 1 x 1 maps: compared as (n, D, 1, 1)
        shape = list(x.shape[1:]) + [1] * (len(want) - x.ndim + 1)
        if shape != list(want):
            raise ValueError(f"example_input has per-sample shape {tuple(x.shape[1:])}, but "
                             f"the detector was fitted on {tuple(want)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("example_input holds NaN or infinity")
    return x


def export(estimator, path, example_input=None, *, dtype=torch.float64, opset=DEFAULT_OPSET,
           sigma=4.0):
    """Write a fitted detector or pipeline as an ONNX (``.onnx``) or TorchScript (``.pt``)
    file, its metadata (threshold, versions, backbone) beside the graph.

    The module of :func:`to_torch` (on the CPU) is traced on ``example_input``:

    - ``.onnx``: :func:`torch.onnx.export` with the TorchScript-based exporter
      (``dynamo=False`` where the argument exists, torch >= 2.9; no onnxscript needed),
      opset ``opset`` (default 17), input ``"input"``, outputs ``"scores"`` (and
      ``"maps"``), a dynamic batch axis ``"batch"`` (and a dynamic channel axis for
      pipelines that take grayscale as well as RGB). :func:`read_metadata` returns the
      metadata, stored as JSON under ``metadata_props[METADATA_KEY]`` (and the
      threshold alone under ``"threshold"``): in onnxruntime,
      ``session.get_modelmeta().custom_metadata_map``.
    - ``.pt``: :func:`torch.jit.trace` then :func:`torch.jit.save` with the metadata as
      the extra file ``metadata.json`` (``torch.jit.load(path, _extra_files=...)``).

    Parameters
    ----------
    estimator : fitted detector or Pipeline
        As in :func:`to_torch`.
    path : str or path-like
        Output file; its suffix picks the format. Parent folders must exist.
    example_input : array-like or torch.Tensor, optional
        A batch shaped as the module's input (see :func:`to_torch`); only its shape
        matters. Default: two random samples of the shape seen in ``fit`` ((n, C, 1, 1)
        for a spatial detector or DFKDE fitted on 2-D data). The graph is specialised to
        its per-sample shape (the image size) and batch-size free. An ONNX graph has one
        input rank, the example's: pass 2-D (n, D) samples for a graph on (n, D) where
        the estimator takes both (n, D) and (n, D, 1, 1); onnxruntime rejects input of
        another rank ("Invalid rank for input"). A TorchScript file takes every rank
        the estimator takes, and rejects others with a ``ValueError`` naming the shapes.
    dtype : torch.float64, torch.float32 or "float16" (or their names), default=torch.float64
        The detector module's dtype (see :func:`to_torch`). onnxruntime's CPU kernels
        run the detectors' matrix products, reductions and top-k in float64; the
        backbone and the map post-processing stay float32. ``"float16"`` (``.onnx``
        only) stores every weight and statistic in float16, cast to float32 when the
        graph starts (float32 detector statistics): half the file of float32, the
        same float32 arithmetic (onnxruntime's CPU float16 kernels are not
        complete), at the cost of float16 rounding of the weights (measured in
        ``benchmarks/results/export-*.md``); tensors beyond float16's range stay
        float32.
    opset : int, default=17
        ONNX opset (``.onnx`` only).
    sigma : float, default=4.0
        Blur of the maps of a pipeline (see :func:`to_torch`).

    Returns
    -------
    metadata : dict
        The metadata written (``module.metadata`` with ``format``, ``opset`` and the
        example's ``input_shape``).

    Raises
    ------
    ValueError
        If the suffix of ``path`` is neither ``.onnx`` nor ``.pt``, or ``example_input``
        does not fit the estimator; as :func:`to_torch` otherwise.
    TypeError, sklearn.exceptions.NotFittedError
        As :func:`to_torch`.
    ImportError
        If ``.onnx`` is asked for and the ``onnx`` package is not installed.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np, onnxruntime
    >>> from skanomaly import GaussianDetector
    >>> from skanomaly.export import export, read_metadata
    >>> X = np.random.default_rng(0).normal(size=(100, 3))
    >>> det = GaussianDetector(device="cpu").fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "gaussian.onnx")
    >>> meta = export(det, path, X[:4])
    >>> session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    >>> (scores,) = session.run(None, {"input": X[:7].astype(np.float32)})
    >>> np.allclose(scores, -det.score_samples(X[:7].astype(np.float32)), rtol=1e-5)
    True
    >>> read_metadata(path)["threshold"] == -det.offset_
    True
    >>> session.get_modelmeta().custom_metadata_map["threshold"] == repr(-det.offset_)
    True
    """
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot tell the format of {os.fspath(path)!r}: the file name must "
                         f"end in .onnx (ONNX) or .pt (TorchScript)")
    if kind == "onnx":
        try:
            import onnx
        except ImportError as exc:  # pragma: no cover - onnx is a dependency
            raise ImportError("exporting to ONNX needs the onnx package (pip install onnx)"
                              ) from exc
    half = isinstance(dtype, str) and dtype == "float16" or dtype == torch.float16
    if half and kind != "onnx":
        raise ValueError("dtype='float16' (float16 storage of the weights) is for .onnx "
                         "files; TorchScript files take float64 or float32")
    module = to_torch(estimator, device="cpu", dtype=torch.float32 if half else dtype,
                      sigma=sigma)
    x = _example(example_input, module)
    meta = dict(module.metadata, format=kind)
    if half:
        meta["storage_dtype"] = "float16"
    meta["input_shape"] = list(x.shape[1:])
    if meta["input"] == "images":  # the detector's grid is fixed: so is the image size
        with torch.no_grad():
            try:
                shape = list(module.features(x if module.tiling is None else
                                             module._tiles(x[:1])[:1]).shape[1:])
            except RuntimeError as exc:
                raise ValueError(f"the backbone failed on example_input of shape "
                                 f"{tuple(x.shape)}: {exc}") from exc
        if shape != meta["feature_shape"]:
            raise ValueError(
                f"example_input of shape {tuple(x.shape)} gives features of shape "
                f"{tuple(shape)}, but the detector was fitted on {tuple(meta['feature_shape'])}"
                f"; pass images of the size fitted on, {tuple(meta['image_size'] or ())}")
    module.image_size = (int(x.shape[-2]), int(x.shape[-1]))
    try:
        with torch.no_grad():
            module(x)  # a clear error before tracing
    except RuntimeError as exc:
        raise ValueError(f"the model failed on example_input of shape {tuple(x.shape)}: "
                         f"{exc}") from exc
    if kind == "onnx":
        meta["opset"] = int(opset)
        _export_onnx(module, x, path, opset, meta, onnx)
    else:
        both = x.ndim == 2 and 4 in module.ranks  # traced on maps, (n, D) read as maps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings; torch >= 2.9 deprecates jit
            traced = torch.jit.trace(module, (x[:, :, None, None] if both else x,),
                                     check_trace=False)
            checked = torch.jit.script(_ScriptedInput(traced, module))
            torch.jit.save(checked, os.fspath(path),
                           _extra_files={_EXTRA_FILE: json.dumps(meta)})
    return meta


class _ScriptedInput(torch.nn.Module):
    """A traced :class:`_Exported` behind a scripted check of its input's rank (and, for
    features, per-sample shape), so that a TorchScript file takes what the estimator
    takes: a trace is specialised to one rank, and (n, D) input of a detector on 1 x 1
    maps is reshaped here to the (n, D, 1, 1) the trace was made on."""

    def __init__(self, traced, module: _Exported):
        super().__init__()
        self.traced = traced
        self.ranks = list(module.ranks)
        # images: no per-sample check (a placeholder keeps the list typed for TorchScript)
        self.check_shape = module.sample_shape is not None
        self.sample_shape = list(module.sample_shape or (0,))
        self.expects = module.expects()

    def forward(self, x: torch.Tensor):
        if x.dim() not in self.ranks:
            raise ValueError("expected " + self.expects + ", got a " + str(x.dim())
                             + "-D input of shape " + str(x.shape))
        if self.check_shape:
            want = self.sample_shape if x.dim() == len(self.sample_shape) + 1 \
                else self.sample_shape[:1]
            if x.shape[1:] != want:
                raise ValueError("expected " + self.expects + ", got shape " + str(x.shape))
        if x.dim() == 2 and 4 in self.ranks:
            x = x[:, :, None, None]
        return self.traced(x)


def _export_onnx(module, x, path: Path, opset: int, meta: dict, onnx) -> None:
    outputs = list(meta["outputs"])
    axes = {"input": {0: "batch"}}
    if meta["input"] == "images" and meta.get("normalize"):
        axes["input"][1] = "channels"  # 1 (grayscale, replicated) or 3
    axes.update({name: {0: "batch"} for name in outputs})
    kwargs = dict(input_names=["input"], output_names=outputs, dynamic_axes=axes,
                  opset_version=int(opset), do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript-based exporter (no onnxscript)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings, the exporter's deprecation
        # the exporter may leave the module in training mode: it is a private copy
        torch.onnx.export(module, (x,), os.fspath(path), **kwargs)
    model = onnx.load(os.fspath(path))
    if meta.get("storage_dtype") == "float16":
        _store_float16(model, onnx)
    for key, value in ((METADATA_KEY, json.dumps(meta)), ("threshold", repr(meta["threshold"]))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, os.fspath(path))


def _store_float16(model, onnx) -> None:
    """Store the graph's float32/float64 initializers as float16, each followed by a Cast
    back to its type at the start of the graph: half the file, same arithmetic.

    Tensors of fewer than 16 numbers and tensors with values beyond float16's range
    (which would become infinity) keep their type.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    wide = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    casts = []
    for init in list(graph.initializer):
        if init.data_type not in wide or math.prod(init.dims) < 16:
            continue
        values = numpy_helper.to_array(init)
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        if not np.isfinite(half).all():
            continue
        stored = numpy_helper.from_array(half, f"{init.name}__float16")
        casts.append(helper.make_node("Cast", [stored.name], [init.name], to=init.data_type,
                                      name=f"{init.name}__cast"))
        graph.initializer.remove(init)
        graph.initializer.append(stored)
    for node in reversed(casts):
        graph.node.insert(0, node)


def read_metadata(path) -> dict:
    """The metadata that :func:`export` wrote beside the graph of ``path``.

    Parameters
    ----------
    path : str or path-like
        An ``.onnx`` or ``.pt`` file written by :func:`export`.

    Returns
    -------
    metadata : dict
        ``threshold`` (outlier where ``scores > threshold``), ``contamination``,
        ``calibration``, ``detector``, ``detector_params``, ``skanomaly_version``,
        ``torch_version``, ``input_shape``, ``outputs``, ``format`` (and ``opset``) and,
        for pipelines, ``backbone``, ``weights``, ``layers``, ``image_size``.

    Raises
    ------
    ValueError
        If the suffix is neither ``.onnx`` nor ``.pt``, or the file holds no skanomaly
        metadata.
    FileNotFoundError
        If ``path`` does not exist.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from skanomaly import GaussianDetector
    >>> from skanomaly.export import export, read_metadata
    >>> det = GaussianDetector(device="cpu").fit(np.random.default_rng(0).normal(size=(50, 2)))
    >>> path = os.path.join(tempfile.mkdtemp(), "gaussian.pt")
    >>> _ = export(det, path)
    >>> meta = read_metadata(path)
    >>> meta["detector"], meta["format"], meta["threshold"] == -det.offset_
    ('GaussianDetector', 'torchscript', True)
    """
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot tell the format of {os.fspath(path)!r}: expected a .onnx "
                         "or .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)!r} does not exist")
    text = None
    if kind == "onnx":
        import onnx

        model = onnx.load(os.fspath(path), load_external_data=False)
        text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    else:
        try:  # a TorchScript archive is a zip: read the extra file without loading
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist()
                             if n.endswith(f"/extra/{_EXTRA_FILE}")), None)
                text = None if name is None else archive.read(name).decode()
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a TorchScript archive") from exc
    if text is None:
        raise ValueError(f"{os.fspath(path)!r} holds no skanomaly metadata (was it "
                         "written by skanomaly.export.export?)")
    return json.loads(text)
