"""The main job (``skanomaly`` without a subcommand): fit on normal images, set the
threshold, score and map the test images, write the report.

The same steps as ``skanomaly fit`` then ``skanomaly predict``, on images in memory:
the bundled textures (:func:`skanomaly.datasets.load_textures`) or the user's folders.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

from ..persistence import weights_source
from ._common import (
    CALIBRATION_FRACTION,
    N_CALIBRATION,
    RANDOM_BACKBONE_NOTE,
    SPATIAL_DETECTORS,
    CLIError,
    check_model_options,
    check_output_dir,
    default_layers,
    make_detector,
    make_model,
    map_sigma,
    progress,
    resolve_weights,
    score_batch,
    size_text,
    tiles_text,
    user_errors,
)
from ._images import (
    ImageSet,
    LazyImages,
    Resize,
    check_size,
    file_size,
    find_images_in,
    find_mask,
    one_size,
    read_mask,
    read_stack,
    size_runs,
    test_label,
)
from .report import at_threshold, evaluate, pvalues_of, write_outputs


def _bundled_data(args) -> tuple[np.ndarray, list[str], ImageSet, dict, np.ndarray]:
    """Training and calibration images and their names, test set, a description and
    the indices of the calibration images, from the textures.

    The pipeline is fitted on the ``--n-train`` training crops (top half of the
    texture); the ``--n-calibration`` normal crops that set the threshold are drawn
    beside the test crops (bottom half: :func:`~skanomaly.datasets.load_textures`'
    calibration crops), so that they come from the distribution of the good test
    images, which differs somewhat from the training crops'.
    """
    from ..datasets import load_textures

    texture = args.texture or "brick"
    n_train = 100 if args.n_train is None else args.n_train
    n_test = 60 if args.n_test is None else args.n_test
    n_calibration = N_CALIBRATION if args.n_calibration is None else args.n_calibration
    with user_errors("bundled data"):
        data = load_textures(
            texture, n_train=n_train, n_test=n_test, image_size=args.image_size,
            n_calibration=n_calibration, random_state=args.random_state,
        )
    test = ImageSet(
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


def _folder_data(args) -> tuple[np.ndarray, list[str], ImageSet, dict]:
    """Training images and their names, test set and a description, from the user's folders.

    Every image keeps its aspect ratio (:data:`~skanomaly.cli._images.SIZE_RULE`). The
    training images must come out at one size; test images too, unless the model is
    tiled (then each is kept at its own size, and its map comes back at it).
    """
    quiet = args.quiet
    resize = Resize(args.image_size)
    train_paths = find_images_in(args.train_dir, "training folder")
    test_paths = find_images_in(args.test_dir, "test folder")
    size = one_size(train_paths, resize, f"--train-dir {args.train_dir}", args.train_dir)
    originals = [file_size(p) for p in test_paths]
    sizes = [resize.size(o) for o in originals]
    if args.tile_size is None:
        for path, original, size_ in zip(test_paths, originals, sizes):
            check_size(path, original, size_, size, resize,
                       "give --tile-size to score images of any shape, or crop them to the "
                       "training images' aspect ratio")
    X_train, _ = read_stack(train_paths, resize, quiet, "reading training images", size)
    X_test = [resize.read(p)[0] for p in progress(test_paths, quiet,
                                                  desc="reading test images", unit="image")]
    if len(set(sizes)) == 1:
        X_test = np.stack(X_test)
    train_names = [p.relative_to(args.train_dir).as_posix() for p in train_paths]
    relative = [p.relative_to(args.test_dir) for p in test_paths]
    labels, defect_types = zip(*map(test_label, relative))
    masks = None
    if args.mask_dir is not None:
        masks = [np.zeros(size_, dtype=bool) for size_ in sizes]
        for i, (rel, label) in enumerate(zip(relative, labels)):
            mask_path = find_mask(args.mask_dir, rel)
            if mask_path is not None:
                masks[i] = read_mask(mask_path, test_paths[i], originals[i], sizes[i])
            elif label == -1:
                raise CLIError(
                    f"no mask for defective image {test_paths[i]} in {args.mask_dir} "
                    f"(looked for {rel.parent / (rel.stem + '_mask.png')})"
                )
    test = ImageSet(
        LazyImages(test_paths), [r.as_posix() for r in relative],
        np.array(labels, dtype=np.int64), list(defect_types), masks, originals, X_test,
    )
    info = {
        "source": "folders",
        "train_dir": str(args.train_dir),
        "test_dir": str(args.test_dir),
        "mask_dir": None if args.mask_dir is None else str(args.mask_dir),
        "input_size": list(size),
    }
    return X_train, train_names, test, info


def check_settings(args) -> None:
    """Problems found without reading an image or building a model, as CLIError."""
    from ..base import resolve_device

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
    check_model_options(args)
    with user_errors("--device"):
        resolve_device(args.device)
    check_output_dir(args.output_dir)


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
    from .. import calibrate
    from ..base import CalibrationWarning, conformal_min_samples

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
    detector = make_detector(args.detector, extractor.feature_shape_[0], fit.size, args)
    model = make_model(extractor, detector, args.detector, args)
    with user_errors(f"{args.detector} detector"):
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


def _score(model, images, spatial: bool, quiet: bool, sigma: float, batch_size: int = 16):
    """Anomaly scores (n,), predictions (n,) int and, for spatial detectors, maps (each
    at its image's size, as the command reads it, blurred with a Gaussian of ``sigma``
    pixels: (n, h, w) float32 when the images share a size, else a list; None for the
    others) of the fitted pipeline ``model``, by batches of consecutive images of one
    size.

    Each batch goes through the pipeline once (:func:`score_batch`).
    """
    n = len(images)
    shapes = [image.shape[-2:] for image in images]
    scores = np.empty(n)
    predictions = np.empty(n, dtype=np.int64)
    maps = [None] * n if spatial else None
    for start, stop in progress(size_runs(shapes, batch_size), quiet, desc="scoring",
                                unit="batch"):
        batch = images[start:stop] if isinstance(images, np.ndarray) else np.stack(
            images[start:stop])
        scores[start:stop], predictions[start:stop], batch_maps = score_batch(
            model, batch, spatial, tuple(shapes[start]), sigma)
        if spatial:
            maps[start:stop] = list(batch_maps)
    if spatial and len(set(shapes)) == 1:
        maps = np.stack(maps)
    return scores, predictions, maps


def _threshold_source(calibration: dict) -> str:
    """How the threshold was set, in words: "20 held-out images", "cross-fit scores"..."""
    if calibration["method"] == "held-out":
        return f"{calibration['n_images']} held-out images"
    return f"{calibration['method']} scores of the fitted images"


def _summary(result: dict, output_dir: Path, n_heatmaps: int) -> str:
    calibration = result["calibration"]
    labels = {"image_auroc": "image AUROC", "image_average_precision": "image AP",
              "pixel_auroc": "pixel AUROC", "pro": "PRO"}
    scores = "  ".join(f"{labels[k]} {result['metrics'][k]:.3f}" for k in labels
                       if k in result["metrics"])
    tiling = tiles_text(result.get("tile_size"), result.get("tile_stride"),
                        result.get("tile_resize"))
    lines = [
        f"skanomaly: {result['detector']} on {result['backbone']} features "
        f"({result['weights'] or 'random weights'}) at "
        f"{size_text(result['image_size'], result.get('input_size'))}"
        f"{tiling}: fitted on {result['n_fit']} normal images, threshold from "
        f"{_threshold_source(calibration)}; "
        f"{result['n_predicted_anomalous']} of {result['n_test']} test images predicted "
        "anomalous",
    ]
    if scores:
        lines.append(f"  {scores}")
    if at_threshold(result["metrics"]):
        lines.append(f"  {at_threshold(result['metrics'])}")
    lines += [f"  note: {note}" for note in result["notes"]]
    wrote = ["scores.csv", "metrics.json"] + ([f"heatmaps/ ({n_heatmaps} PNGs)"]
                                              if n_heatmaps else [])
    lines.append(f"  wrote {', '.join(wrote)} to {output_dir}")
    return "\n".join(lines)


def run_command(args) -> dict:
    from ..base import resolve_device
    from ..features import FeatureExtractor

    device = resolve_device(args.device)
    timings = {}
    start = time.perf_counter()
    layers = args.layers or default_layers(args.backbone, args.detector)
    weights = resolve_weights(args.backbone, args.weights)
    extractor = FeatureExtractor(
        args.backbone, layers, weights=weights, random_state=args.random_state,
        device=device, verbose=not args.quiet,
    )
    with user_errors("feature extractor"):  # backbone, weights and layers, on a blank image
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
    images = test.images if test.model_images is None else test.model_images
    sigma = map_sigma(args)
    scores, predictions, maps = _score(model, images, spatial, args.quiet, sigma)
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
    metrics, metric_notes = evaluate(test, scores, maps, predictions)
    detector, features = model[-1], model[0]
    result = {
        "metrics": metrics,
        "detector": args.detector,
        "detector_params": {k: v for k, v in detector.get_params().items() if k != "device"},
        "backbone": args.backbone,
        "layers": list(features.layers_),
        "weights": None if weights is None else os.fspath(weights),
        "weights_source": weights_source(weights),
        "feature_shape": list(features.feature_shape_),
        "image_size": args.image_size,
        # (height, width) of the training images as the model reads them
        "input_size": data_info.pop("input_size", [args.image_size] * 2),
        "tile_size": args.tile_size,
        "tile_stride": (args.tile_stride or args.tile_size) if args.tile_size else None,
        "tile_resize": args.tile_resize if args.tile_size else None,
        "map_sigma": sigma if spatial else None,
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
    heatmaps = write_outputs(args, test, scores, predictions, maps, spatial, result,
                             pvalues=pvalues_of(detector, scores))
    if not args.quiet:
        print(_summary(result, args.output_dir, len(heatmaps)))
    return result
