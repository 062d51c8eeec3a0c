"""The model file: a fitted pipeline and its metadata in one file.

:func:`save_model` writes a fitted :class:`~sklearn.pipeline.Pipeline` ending in a
skanomaly detector (e.g. a :class:`~skanomaly.features.FeatureExtractor`, then a detector)
with one line of JSON metadata in front of it (versions, backbone, weights, layers, image
size, threshold, how the threshold was set); :func:`read_model_metadata` reads that line
alone, and :func:`load_model` checks it before it unpickles anything. The ``skanomaly``
command (``skanomaly fit``, ``predict`` and ``export``) is built on these functions; they
need no command line.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "MODEL_MAGIC",
    "MODEL_FORMAT_VERSION",
    "ModelFileError",
    "ModelVersionWarning",
    "save_model",
    "load_model",
    "read_model_metadata",
    "weights_source",
]

#: First bytes of a model file written by :func:`save_model`.
MODEL_MAGIC = b"skanomaly-model\n"
#: Layout version of the model files this version writes and reads.
MODEL_FORMAT_VERSION = 1
_MAX_HEADER_BYTES = 1 << 20


class ModelFileError(ValueError):
    """A file that is not a skanomaly model file, or one that this version cannot read."""


class ModelVersionWarning(UserWarning):
    """A model file saved by another skanomaly version: it loads, but check its scores."""


def _jsonable(value):
    """``value`` with numpy scalars, paths, tuples and other objects made JSON-able."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.nn.Module):
        return f"<{type(value).__name__} module>"
    return str(value)


def _final_detector(pipeline):
    """The fitted skanomaly detector ending ``pipeline``; TypeError/NotFittedError else."""
    from sklearn.pipeline import Pipeline
    from sklearn.utils.validation import check_is_fitted

    from .base import BaseDetector

    if not isinstance(pipeline, Pipeline) or not isinstance(pipeline[-1], BaseDetector):
        raise TypeError("a model is a sklearn Pipeline ending in a skanomaly detector, got "
                        f"{type(pipeline).__name__}")
    check_is_fitted(pipeline[-1])
    return pipeline[-1]


def _versions() -> dict:
    import platform

    import sklearn
    import torch

    from ._version import __version__

    return {"skanomaly_version": __version__, "torch_version": torch.__version__,
            "sklearn_version": sklearn.__version__, "numpy_version": np.__version__,
            "python_version": platform.python_version()}


def save_model(pipeline, path, *, image_size: int, extra: dict | None = None,
               keep_streaming_state: bool = False) -> dict:
    """Save a fitted pipeline and its metadata to one model file.

    The file starts with the line ``skanomaly-model``, then one line of JSON
    metadata, then the pipeline pickled by :func:`joblib.dump`; :func:`load_model`
    checks the header before it unpickles anything. The file is written to a temporary
    name beside ``path`` and renamed, so a failed save leaves no partial file.

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Fitted, ending in a skanomaly detector (e.g. a
        :class:`~skanomaly.features.FeatureExtractor` then a detector).
    path : str or os.PathLike
        The model file (``skanomaly fit`` names it ``model.skanomaly``); replaced if
        it exists.
    image_size : int
        Side in pixels of the square images the pipeline was fitted on: images are
        resized to it before scoring (``skanomaly predict``, ``skanomaly export``).
    extra : dict or None, default=None
        More JSON-able metadata (e.g. the training folder); it cannot replace the keys
        below.
    keep_streaming_state : bool, default=False
        Whether the file keeps the state that only further ``partial_fit`` needs (PaDiM's
        and the Gaussian detector's moments, DFM's and DFKDE's factorised moments and
        reservoir, the score records of streamed thresholds): without it the file holds
        what scoring needs and nothing more (PaDiM's file is about a third of the
        size), scores are the same bits, and ``partial_fit`` on the loaded detector
        raises a ``ValueError``; with it, the loaded pipeline goes on learning where it
        stopped. ``pipeline`` itself is not changed either way.

    Returns
    -------
    metadata : dict
        What the header holds: ``format`` (``"skanomaly-model"``), ``format_version``
        (:data:`MODEL_FORMAT_VERSION`), the skanomaly, torch, scikit-learn, numpy and
        Python versions, ``created`` (UTC, ISO 8601), the ``steps`` names, ``detector``
        (class name) and ``detector_params``, ``backbone``, ``weights``,
        ``weights_source``, ``layers``, ``feature_shape`` (``None`` without a
        FeatureExtractor), ``image_size``, ``threshold`` (on the anomaly score,
        ``-offset_``), ``offset``, ``calibration`` (the detector's ``calibration_``:
        how the threshold was set), ``contamination``, ``n_samples_seen`` and
        ``streaming_state`` (``keep_streaming_state``).

    Raises
    ------
    TypeError
        If ``pipeline`` is not a Pipeline ending in a skanomaly detector.
    sklearn.exceptions.NotFittedError
        If its detector is not fitted.
    OSError
        If the file cannot be written.

    Examples
    --------
    >>> import tempfile, warnings
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from skanomaly import PaDiMDetector
    >>> from skanomaly.persistence import load_model, save_model
    >>> from skanomaly.features import FeatureExtractor
    >>> X = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)
    >>> model = make_pipeline(FeatureExtractor("resnet18", ["layer1"], random_state=0,
    ...                                        device="cpu"),
    ...                       PaDiMDetector(n_features=10, device="cpu")).fit(X)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     meta = save_model(model, Path(tmp) / "model.skanomaly", image_size=32)
    ...     loaded, meta = load_model(Path(tmp) / "model.skanomaly")
    >>> meta["detector"], meta["layers"], meta["image_size"], meta["calibration"]
    ('PaDiMDetector', ['layer1'], 32, 'leave-one-out')
    >>> bool(np.array_equal(loaded.score_samples(X), model.score_samples(X)))
    True
    """
    import copy
    import datetime

    import joblib

    from .features import FeatureExtractor

    detector = _final_detector(pipeline)
    features = next((step for _, step in pipeline.steps
                     if isinstance(step, FeatureExtractor)), None)
    weights = None if features is None or features.weights is None else features.weights
    metadata = {
        "format": "skanomaly-model",
        "format_version": MODEL_FORMAT_VERSION,
        **_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "steps": [name for name, _ in pipeline.steps],
        "detector": type(detector).__name__,
        "detector_params": _jsonable(detector.get_params(deep=False)),
        "backbone": None if features is None else _jsonable(features.backbone),
        "weights": _jsonable(weights),
        "weights_source": None if not isinstance(weights, (str, os.PathLike))
        else _jsonable(weights_source(weights)),
        "layers": None if features is None else list(features.layers_),
        "feature_shape": None if features is None else list(features.feature_shape_),
        "image_size": int(image_size),
        "threshold": -float(detector.offset_),
        "offset": float(detector.offset_),
        "calibration": detector.calibration_,
        "contamination": float(detector.contamination),
        "n_samples_seen": _jsonable(getattr(detector, "n_samples_seen_", None)),
        "streaming_state": bool(keep_streaming_state),
    }
    metadata.update({k: v for k, v in _jsonable(extra or {}).items() if k not in metadata})
    header = json.dumps(metadata).encode()
    if not keep_streaming_state:  # a shallow copy of the pipeline ending in a compact copy
        compact = detector._without_streaming_state()
        if compact is not detector:
            pipeline = copy.copy(pipeline)
            pipeline.steps = [*pipeline.steps[:-1], (pipeline.steps[-1][0], compact)]
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(MODEL_MAGIC)
            f.write(header + b"\n")
            joblib.dump(pipeline, f)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return metadata


def _read_header(f, path) -> dict:
    """The metadata of the open model file ``f``; ModelFileError unless readable."""
    from ._version import __version__

    not_model = (f"{path} is not a skanomaly model file (model files start with the "
                 "line 'skanomaly-model'; `skanomaly fit` and skanomaly.persistence.save_model "
                 "write them)")
    if f.read(len(MODEL_MAGIC)) != MODEL_MAGIC:
        raise ModelFileError(not_model)
    try:
        metadata = json.loads(f.readline(_MAX_HEADER_BYTES))
    except ValueError:
        raise ModelFileError(f"{not_model}: its metadata line is not JSON") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "skanomaly-model":
        raise ModelFileError(f"{not_model}: its metadata is not a model's")
    version = metadata.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"{path} is a model file of format version {version!r} (saved by skanomaly "
            f"{metadata.get('skanomaly_version')}), but skanomaly {__version__} reads "
            f"format version {MODEL_FORMAT_VERSION}: load it with the skanomaly version "
            "that saved it, or fit the model again"
        )
    return metadata


def read_model_metadata(path) -> dict:
    """The metadata of a model file, without loading its model.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save_model` (``skanomaly fit``).

    Returns
    -------
    metadata : dict
        See :func:`save_model`.

    Raises
    ------
    ModelFileError
        A :class:`ValueError`: the file is not a skanomaly model file, or has another
        format version.
    OSError
        If it cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from skanomaly.persistence import read_model_metadata
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "notes.txt").write_text("hello")
    ...     read_model_metadata(Path(tmp) / "notes.txt")
    Traceback (most recent call last):
    ...
    skanomaly.persistence.ModelFileError: ...notes.txt is not a skanomaly model file ...
    """
    with open(path, "rb") as f:
        return _read_header(f, path)


def load_model(path):
    """Load a model file written by :func:`save_model` (``skanomaly fit``).

    The header is checked before anything is unpickled. A file saved by another
    skanomaly version loads with a :class:`ModelVersionWarning` (scikit-learn adds its
    own ``InconsistentVersionWarning`` for another scikit-learn); another format
    version, a file that is not a model, or a pickle that does not load is a
    :class:`ModelFileError`, never a silently different model. As any pickle, load
    only files you trust.

    Parameters
    ----------
    path : str or os.PathLike
        The model file.

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        The fitted pipeline, as saved.
    metadata : dict
        Its metadata (see :func:`save_model`).

    Raises
    ------
    ModelFileError
        A :class:`ValueError`: not a skanomaly model file, another format version, a
        model that cannot be unpickled here (naming the versions that saved it), or a
        model whose threshold differs from its metadata (a damaged file).
    FileNotFoundError, IsADirectoryError
        If ``path`` is not a file.

    Warns
    -----
    ModelVersionWarning
        If another skanomaly version saved the file.

    Examples
    --------
    See :func:`save_model`.
    """
    import joblib

    from ._version import __version__

    path = Path(path)
    with open(path, "rb") as f:
        metadata = _read_header(f, path)
        saved = metadata.get("skanomaly_version")
        versions = (f"skanomaly {saved}, torch {metadata.get('torch_version')}, "
                    f"scikit-learn {metadata.get('sklearn_version')}")
        if saved != __version__:
            warnings.warn(ModelVersionWarning(
                f"{path} was saved by {versions}; this is skanomaly {__version__}: it "
                "loads, but check its scores against the original before relying on them"
            ), stacklevel=2)
        try:
            pipeline = joblib.load(f)
        except Exception as exc:  # any unpickling failure: name the file and versions
            raise ModelFileError(f"cannot load the model in {path} (saved by {versions}): "
                                 f"{type(exc).__name__}: {exc}") from exc
    try:
        detector = _final_detector(pipeline)
    except Exception as exc:
        raise ModelFileError(f"{path} does not hold a fitted skanomaly pipeline: "
                             f"{exc}") from exc
    if -float(detector.offset_) != metadata.get("threshold"):
        raise ModelFileError(f"{path} is damaged: its model's threshold "
                             f"{-float(detector.offset_)!r} differs from its metadata's "
                             f"{metadata.get('threshold')!r}")
    return pipeline, metadata


def weights_source(weights) -> dict | None:
    """Where a feature extractor's weights came from, as the model file records it.

    Parameters
    ----------
    weights : str, os.PathLike or None
        A :class:`~skanomaly.features.FeatureExtractor`'s ``weights``: the name of
        packaged weights, a state_dict file, a torchvision weight name, or None.

    Returns
    -------
    source : dict or None
        None for a random initialisation (``weights=None``); for packaged weights
        their record (name, backbone, package and version, file, SHA-256, source,
        licence); ``{"file": absolute path}`` for a file; else ``{"name", "source"}``
        of torchvision weights.

    Examples
    --------
    >>> from skanomaly.persistence import weights_source
    >>> weights_source(None) is None
    True
    >>> source = weights_source("efficientnet-lite0-imagenet")
    >>> source["backbone"], source["licence"]
    ('timm/tf_efficientnet_lite0', 'Apache-2.0')
    >>> weights_source("IMAGENET1K_V1")
    {'name': 'IMAGENET1K_V1', 'source': 'torchvision (downloaded on first use)'}
    """
    from .features import PACKAGED_WEIGHTS

    if weights is None:
        return None
    if weights in PACKAGED_WEIGHTS:
        return PACKAGED_WEIGHTS[weights].record()
    if Path(weights).is_file():
        return {"file": str(Path(weights).resolve())}
    return {"name": weights, "source": "torchvision (downloaded on first use)"}
