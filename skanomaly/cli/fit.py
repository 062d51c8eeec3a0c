"""``skanomaly fit``: stream a folder of normal images into the pipeline, set its
threshold, save it as one model file (:func:`skanomaly.persistence.save_model`)."""

from __future__ import annotations

import time
import warnings

import numpy as np

from ..persistence import save_model
from ._common import (
    RANDOM_BACKBONE_NOTE,
    SPATIAL_DETECTORS,
    CLIError,
    check_dir,
    check_model_options,
    check_model_path,
    default_layers,
    make_detector,
    make_model,
    map_sigma,
    resolve_weights,
    size_text,
    tiles_text,
    user_errors,
)
from ._images import (
    LONG_SIDE_STEP,
    Resize,
    find_images_in,
    find_mask,
    one_size,
    px,
    read_mask,
    read_stack,
    test_label,
)


def fit_command(args) -> dict:
    """``skanomaly fit``: stream the training folder into the pipeline, save it."""
    from .. import calibrate
    from ..base import CalibrationWarning, conformal_min_samples, resolve_device
    from ..features import FeatureExtractor
    from ..streaming import partial_fit_images

    check_dir("TRAIN_DIR", args.train_dir)
    check_dir("--calibration-dir", args.calibration_dir)
    check_dir("--validation-dir", args.validation_dir)
    check_dir("--validation-mask-dir", args.validation_mask_dir)
    if args.calibration_dir is not None and args.validation_dir is not None:
        raise CLIError("give --calibration-dir (held-out normal images: a conformal "
                       "threshold) or --validation-dir (labelled images: an F1-maximising "
                       "one), not both")
    if args.validation_mask_dir is not None and args.validation_dir is None:
        raise CLIError("--validation-mask-dir needs --validation-dir")
    check_model_options(args)
    check_model_path(args.model)
    with user_errors("--device"):
        resolve_device(args.device)
    timings = {}
    start = time.perf_counter()
    layers = args.layers or default_layers(args.backbone, args.detector)
    weights = resolve_weights(args.backbone, args.weights)
    extractor = FeatureExtractor(
        args.backbone, layers, weights=weights, random_state=args.random_state,
        batch_size=args.batch_size, device=args.device,
    )
    with user_errors("feature extractor"):  # backbone, weights and layers, on a blank image
        extractor.fit(np.zeros((1, 3, args.image_size, args.image_size), dtype=np.float32))
    paths = find_images_in(args.train_dir, "TRAIN_DIR")
    resize = Resize(args.image_size)
    input_size = one_size(paths, resize, f"TRAIN_DIR {args.train_dir}", args.train_dir)
    calibration_paths = (None if args.calibration_dir is None
                         else find_images_in(args.calibration_dir, "--calibration-dir"))
    if calibration_paths is not None:
        _same_size(calibration_paths, resize, input_size,
                   f"--calibration-dir {args.calibration_dir}", args.calibration_dir)
    if calibration_paths is not None and len(calibration_paths) < conformal_min_samples(
            args.contamination):
        raise CLIError(f"--calibration-dir {args.calibration_dir} has {len(calibration_paths)} "
                       "images, too few for a conformal threshold at --contamination "
                       f"{args.contamination:g}: it needs at least "
                       f"{conformal_min_samples(args.contamination)}")
    validation = (None if args.validation_dir is None
                  else _read_validation(args, resize, input_size))
    detector = make_detector(args.detector, extractor.feature_shape_[0], len(paths), args)
    if args.detector == "patchcore":
        detector.set_params(max_bank_size=args.max_bank_size)
    model = make_model(extractor, detector, args.detector, args)
    note = None
    with user_errors(f"{args.detector} detector"), warnings.catch_warnings(record=True) as caught:
        partial_fit_images(model, paths, batch_size=args.batch_size,
                           image_size=args.image_size, keep_aspect=True,
                           long_side_step=LONG_SIDE_STEP, verbose=not args.quiet)
        timings["fit_s"] = time.perf_counter() - start
        spatial = args.detector in SPATIAL_DETECTORS
        if calibration_paths is not None:
            start = time.perf_counter()
            X_cal = read_stack(calibration_paths, resize, True, "", input_size)[0]
            calibrate(model, X_cal)
            if spatial:  # predicted masks: the conformal quantile of their pixels
                model.calibrate_pixels(X_cal, sigma=map_sigma(args))
            timings["calibrate_s"] = time.perf_counter() - start
        if validation is not None:
            start = time.perf_counter()
            X_val, y_val, masks_val = validation
            calibrate(model, X_val, y_val)
            if spatial and masks_val is not None:
                model.calibrate_pixels(X_val, masks_val, sigma=map_sigma(args))
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
        # (height, width) of the training images as the model reads them: the short
        # side image_size, the aspect ratio kept (predict reads images so)
        "input_size": list(input_size),
        "tile_size": args.tile_size,
        "tile_stride": (args.tile_stride or args.tile_size) if args.tile_size else None,
        "tile_resize": args.tile_resize if args.tile_size else None,
        # blur of the maps in pixels: predict and export use it
        "map_sigma": map_sigma(args) if spatial else None,
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
        tiling = tiles_text(args.tile_size, args.tile_stride or args.tile_size,
                            args.tile_resize)
        source = (f"{metadata['n_calibration']} held-out images of --calibration-dir"
                  if calibration_paths is not None
                  else f"F1 on {metadata['n_validation']} labelled images of --validation-dir"
                  if validation is not None
                  else f"the {args.detector} detector's streamed {metadata['calibration']} "
                  "scores")
        lines = [
            f"skanomaly fit: {args.detector} on {args.backbone} features "
            f"({weights or 'random weights'}) at {size_text(args.image_size, input_size)}"
            f"{tiling}: streamed "
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


def _same_size(paths, resize, input_size, what: str, root) -> None:
    """CLIError unless the images at ``paths`` have the training images' size (after
    resizing): held-out images are scored by the model as it was fitted."""
    size = one_size(paths, resize, what, root)
    if size != input_size:
        raise CLIError(
            f"the images of {what} come out at {px(size)} after resizing to a short side "
            f"of {resize.image_size} px, but the training images at {px(input_size)}: the "
            "images that set the threshold must have the training images' shape"
        )


def _read_validation(args, resize, input_size):
    """Images, +1/-1 labels and (with --validation-mask-dir) masks of --validation-dir."""
    paths = find_images_in(args.validation_dir, "--validation-dir")
    relative = [p.relative_to(args.validation_dir) for p in paths]
    labels = np.array([test_label(r)[0] for r in relative], dtype=np.int64)
    if not (labels == -1).any() or (labels == 0).any():
        raise CLIError(f"--validation-dir {args.validation_dir} must be laid out as MVTec AD, "
                       "good/ and at least one defect subfolder, with no image directly in "
                       "it: the F1-maximising threshold needs labelled defects")
    _same_size(paths, resize, input_size, f"--validation-dir {args.validation_dir}",
               args.validation_dir)
    images, originals = read_stack(paths, resize, True, "", input_size)
    masks = None if args.validation_mask_dir is None else np.zeros(
        (len(paths), *input_size), dtype=bool)
    for i, path in enumerate(paths):
        if masks is not None:
            mask_path = find_mask(args.validation_mask_dir, relative[i])
            if mask_path is not None:
                masks[i] = read_mask(mask_path, path, originals[i], input_size)
            elif labels[i] == -1:
                raise CLIError(f"no mask for defective image {path} in "
                               f"{args.validation_mask_dir}")
    return images, labels, masks
