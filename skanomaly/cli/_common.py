"""What the parts of the ``skanomaly`` command share: its settings and their defaults,
its one error (:class:`CLIError`), the checks of options, and the pipeline it builds,
loads and scores.

Private to :mod:`skanomaly.cli`; the names here are public to the command's modules.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..persistence import ModelFileError, ModelVersionWarning, load_model
from ..streaming import ImageReadError


#: smallest --image-size (that of the bundled textures' crops)
MIN_IMAGE_SIZE = 16
SPATIAL_DETECTORS = ("padim", "patchcore", "dfm")
#: share of the training images held out for the threshold (--calibration-fraction)
CALIBRATION_FRACTION = 0.2
#: normal crops of the bundled data that set the threshold (--n-calibration): they are
#: drawn beside the test crops; 60, so that the contamination quantile is not set by two
#: or three images' scores
N_CALIBRATION = 60
DETECTORS = ("padim", "patchcore", "dfm", "dfkde", "gaussian")
#: Detector and working image size of the main job and of ``fit`` when not given,
#: chosen by measurement (benchmarks/backbones.py; see the command line guide):
#: PatchCore localised best on all three bundled textures at every size and backbone
#: tried, and 256 px gave the best lowest pixel AUROC of the three (0.978, against 0.972
#: at 192 px) among the sizes that keep the main job within about a minute on 2 cores
#: (about twice the CPU time of 192 px; 288 and 320 px were not better).
DEFAULT_DETECTOR = "patchcore"
DEFAULT_IMAGE_SIZE = 256
#: Standard deviation in pixels of the Gaussian blur of the anomaly maps (``sigma`` of
#: ``score_and_map``, ``calibrate_pixels`` and the export) when ``--map-sigma`` is not
#: given, chosen by measurement (benchmarks/backbones.py and benchmarks/small_defects.py;
#: see the command line guide): untiled, the bundled textures' defects (tens of pixels
#: at 256 px) localise best with a blur of one stride-8 feature cell (8 px: PatchCore's
#: pixel AUROC 0.981 / 0.984 / 0.997 on grass / gravel / brick, against 0.978 / 0.981 /
#: 0.996 with anomalib's 4); tiled, for defects of a few pixels at native resolution, a
#: blur of 2 px (4 px spreads a 1-px scratch over its neighbours).
DEFAULT_MAP_SIGMA = 8.0
TILED_MAP_SIGMA = 2.0
#: Backbone of the main job: EfficientNet-Lite0 with ImageNet weights that ship in an
#: installed package (no download).
DEFAULT_BACKBONE = "timm/tf_efficientnet_lite0"
#: ``--weights`` value for a randomly initialised backbone.
RANDOM_WEIGHTS = "random"
#: Backbone layers of each detector when ``--layers`` is not given: for EfficientNet-Lite0,
#: chosen by measurement on the bundled textures (see the command line guide), and the
#: same stages of Lite1 and Lite2 (same seven stages, strides and layer names); for any
#: other backbone, anomalib's choices for a ResNet (the Gaussian
#: detector pools layer4 as DFKDE does).
_EFFICIENTNET_LITE_LAYERS = {
    "padim": ("blocks.1", "blocks.2", "blocks.3"),
    "patchcore": ("blocks.2", "blocks.3"),
    "dfm": ("blocks.2", "blocks.3", "blocks.4"),
    "dfkde": ("blocks.6",),
    "gaussian": ("blocks.6",),
}
DEFAULT_LAYERS = {
    **{f"timm/tf_efficientnet_lite{k}": _EFFICIENTNET_LITE_LAYERS for k in (0, 1, 2)},
    "resnet": {
        "padim": ("layer1", "layer2", "layer3"),
        "patchcore": ("layer2", "layer3"),
        "dfm": ("layer3",),
        "dfkde": ("layer4",),
        "gaussian": ("layer4",),
    },
}
RANDOM_BACKBONE_NOTE = (
    "randomly initialised backbone: no pretrained weights were given, so the features are "
    f"those of an untrained network; for real use keep the default backbone "
    f"{DEFAULT_BACKBONE} with its packaged ImageNet weights (no download), or pass "
    "--weights IMAGENET1K_V1 (torchvision; needs network access once) or the path of a "
    "state_dict file"
)


def default_layers(backbone: str, detector: str) -> tuple[str, ...]:
    """Backbone layers the command uses for ``detector`` when ``--layers`` is not given.

    Parameters
    ----------
    backbone : str
        The ``--backbone`` value.
    detector : str
        One of ``"padim"``, ``"patchcore"``, ``"dfm"``, ``"dfkde"``, ``"gaussian"``.

    Returns
    -------
    layers : tuple of str
        The measured choice for EfficientNet-Lite0, Lite1 and Lite2; ResNet layer names
        (``layer1``...``layer4``) for any other backbone.

    Examples
    --------
    >>> from skanomaly.cli import default_layers
    >>> default_layers("timm/tf_efficientnet_lite0", "padim")
    ('blocks.1', 'blocks.2', 'blocks.3')
    >>> default_layers("timm/tf_efficientnet_lite2", "patchcore")
    ('blocks.2', 'blocks.3')
    >>> default_layers("resnet18", "patchcore")
    ('layer2', 'layer3')
    """
    return DEFAULT_LAYERS.get(backbone, DEFAULT_LAYERS["resnet"])[detector]


def resolve_weights(backbone: str, weights: str | None) -> str | None:
    """The ``weights`` the feature extractor gets from ``--backbone`` and ``--weights``.

    Parameters
    ----------
    backbone : str
        The ``--backbone`` value.
    weights : str or None
        The ``--weights`` value: None when not given, ``"random"`` for a randomly
        initialised backbone, else a weight name or a state_dict path.

    Returns
    -------
    weights : str or None
        Without ``--weights``, the backbone's packaged weights if it has any
        (``"efficientnet-lite0-imagenet"`` for ``timm/tf_efficientnet_lite0``), else
        None (random initialisation); None for ``"random"``; otherwise ``weights``.

    Examples
    --------
    >>> from skanomaly.cli import resolve_weights
    >>> resolve_weights("timm/tf_efficientnet_lite0", None)
    'efficientnet-lite0-imagenet'
    >>> resolve_weights("resnet18", None) is None, resolve_weights("resnet18", "random")
    (True, None)
    """
    if weights == RANDOM_WEIGHTS:
        return None
    if weights is not None:
        return weights
    from ..features import PACKAGED_WEIGHTS

    packaged = [name for name, w in PACKAGED_WEIGHTS.items() if w.backbone == backbone]
    return packaged[0] if packaged else None


class CLIError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def progress(iterable, quiet: bool, **kwargs):
    """``iterable`` wrapped in a tqdm bar on stderr, unless ``quiet``."""
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, **kwargs)


@contextmanager
def user_errors(step: str):
    """Turn errors that report bad user input during ``step`` into :class:`CLIError`."""
    try:
        yield
    except ImageReadError as exc:  # names the file already
        raise CLIError(str(exc)) from exc
    except (ValueError, TypeError, OSError, ImportError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise CLIError(f"{step}: {message}") from exc


def check_output_dir(path: Path, option: str = "--output-dir") -> None:
    """CLIError unless ``path`` is a writable directory or can be created as one."""
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{option} {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CLIError(f"{option} {path} is not writable")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"{option} {path} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path} cannot be created: {ancestor} is not writable")


def check_dir(option: str, folder: Path | None) -> None:
    if folder is not None and not folder.is_dir():
        problem = "is not a directory" if folder.exists() else "does not exist"
        raise CLIError(f"{option} {folder} {problem}")


def check_model_file(path: Path) -> None:
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise CLIError(f"model file {path} {problem}")


def check_model_path(path: Path) -> None:
    if path.is_dir():
        raise CLIError(f"--model {path} is a directory; give a file name such as "
                       "model.skanomaly")
    check_output_dir(path.parent, "the folder of --model")


def make_detector(name: str, n_channels: int, n_train: int, args):
    """The detector ``name`` with the CLI's settings."""
    from .. import (
        DFKDEDetector,
        DFMDetector,
        GaussianDetector,
        PaDiMDetector,
        PatchCoreDetector,
    )

    common = {"contamination": args.contamination, "device": args.device}
    n_features = getattr(args, "n_features", None)
    if name == "padim":  # anomalib keeps 100 of resnet18's 448 channels
        if n_features is not None and n_features > n_channels:
            raise CLIError(f"--n-features {n_features} exceeds the {n_channels} channels of "
                           "the backbone's layers")
        return PaDiMDetector(
            n_features=min(100, n_channels) if n_features is None else n_features,
            random_state=args.random_state, **common
        )
    if name == "patchcore":
        return PatchCoreDetector(random_state=args.random_state, **common)
    if name == "dfm":
        return DFMDetector(**common)
    if name == "dfkde":  # n_components_ resolves to what the training set allows
        return DFKDEDetector(random_state=args.random_state, **common)
    return GaussianDetector(**common)


def make_model(extractor, detector, name: str, args=None):
    """The pipeline (an :class:`~skanomaly.AnomalyPipeline`, so a saved one has
    ``anomaly_map``): feature maps, global average pooling for the Gaussian, the detector;
    tiled by ``args.tile_size``, ``args.tile_stride`` and ``args.tile_resize`` when given."""
    from sklearn.preprocessing import FunctionTransformer

    from ..pipeline import AnomalyPipeline as Pipeline

    steps = [("features", extractor)]
    if name == "gaussian":  # DFKDE pools its input maps itself; the Gaussian takes vectors
        steps.append(("pool", FunctionTransformer(np.mean, kw_args={"axis": (2, 3)})))
    steps.append(("detector", detector))
    tile_size = getattr(args, "tile_size", None)
    if tile_size is None:
        return Pipeline(steps)
    return Pipeline(steps, tile_size=tile_size, tile_stride=args.tile_stride,
                    tile_resize=getattr(args, "tile_resize", None))


def size_text(image_size: int, input_size=None) -> str:
    """"192 px" for square images; "256x192 px (short side 192)" for others (width x
    height of the images as the model reads them, ``input_size`` (height, width))."""
    height, width = input_size or (image_size, image_size)
    if height == width:
        return f"{image_size} px"
    return f"{width}x{height} px (short side {image_size})"


def tiles_text(tile_size, tile_stride, tile_resize=None) -> str:
    """The tiling, for the summaries.

    Parameters
    ----------
    tile_size : int or None
        ``--tile-size``; None: no tiling.
    tile_stride : int
        The stride of the tiles (``--tile-stride``, or ``tile_size`` when not given).
    tile_resize : int or None, default=None
        ``--tile-resize``; None (or ``tile_size``): the tiles keep their size.

    Returns
    -------
    text : str
        ``""`` without tiling, else the tiling, starting with a space.

    Examples
    --------
    >>> from skanomaly.cli._common import tiles_text
    >>> tiles_text(None, None)
    ''
    >>> tiles_text(64, 48)
    ' in tiles of 64 px at stride 48'
    >>> tiles_text(64, 48, 128)
    ' in tiles of 64 px at stride 48, each resized to 128 px'
    """
    if tile_size is None:
        return ""
    text = f" in tiles of {tile_size} px at stride {tile_stride}"
    if tile_resize is not None and tile_resize != tile_size:
        text += f", each resized to {tile_resize} px"
    return text


def check_model_options(args) -> None:
    """CLIError for tiling and detector options that cannot work, before any image is
    read."""
    if getattr(args, "n_features", None) is not None and args.detector != "padim":
        raise CLIError(f"--n-features applies to --detector padim, not {args.detector}")
    if args.tile_size is None:
        for option in ("tile_stride", "tile_resize"):
            if getattr(args, option, None) is not None:
                raise CLIError(f"--{option.replace('_', '-')} needs --tile-size")
        return
    if args.tile_size > args.image_size:
        raise CLIError(f"--tile-size {args.tile_size} is larger than the images "
                       f"(--image-size {args.image_size})")
    if args.tile_stride is not None and args.tile_stride > args.tile_size:
        raise CLIError(f"--tile-stride {args.tile_stride} is larger than --tile-size "
                       f"{args.tile_size}: the tiles would leave pixels uncovered")
    if args.detector == "gaussian":
        raise CLIError("--tile-size needs a detector over feature maps (padim, patchcore, "
                       "dfm or dfkde), not gaussian")


def map_sigma(args) -> float:
    """The blur of the anomaly maps in pixels: ``--map-sigma``, else
    :data:`TILED_MAP_SIGMA` with ``--tile-size`` and :data:`DEFAULT_MAP_SIGMA` without."""
    if getattr(args, "map_sigma", None) is not None:
        return float(args.map_sigma)
    return TILED_MAP_SIGMA if getattr(args, "tile_size", None) else DEFAULT_MAP_SIGMA


def map_sigma_of(metadata: dict) -> float:
    """The map blur a model file was fitted with: its ``map_sigma``, or anomalib's 4 px
    for files from before ``--map-sigma``."""
    sigma = metadata.get("map_sigma")
    return 4.0 if sigma is None else float(sigma)


def score_batch(model, images, spatial: bool, size, sigma: float):
    """Anomaly scores, predictions and (spatial detectors) maps at ``size`` (an int or
    (height, width): the images' own size as the command reads them), blurred with a
    Gaussian of ``sigma`` pixels, of one batch from ONE pass of the pipeline:
    ``score_and_map`` (fused: features stay tensors, only the channels the detector
    reads), the predictions from the scores and ``offset_``, as ``predict`` labels
    them."""
    if spatial:
        normality, maps = model.score_and_map(images, output_size=size, sigma=sigma)
    else:
        normality, maps = model.score_samples(images), None
    predictions = np.where(normality - model[-1].offset_ < 0, -1, 1)
    return -normality, predictions, maps


def set_device(pipeline, device: str) -> None:
    """Run every step of ``pipeline`` that has a ``device`` parameter on ``device``."""
    for _, step in pipeline.steps:
        if hasattr(step, "get_params") and "device" in step.get_params(deep=False):
            step.set_params(device=device)


def load_for_cli(path: Path):
    """load_model, with problems as CLIError and version warnings on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelVersionWarning)
        try:
            pipeline, metadata = load_model(path)
        except (ModelFileError, OSError) as exc:
            raise CLIError(str(exc)) from exc
    for w in caught:  # ours as one line; others (scikit-learn's versions...) as they are
        if issubclass(w.category, ModelVersionWarning):
            print(f"skanomaly: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pipeline, metadata
