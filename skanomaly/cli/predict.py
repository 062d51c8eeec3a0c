"""``skanomaly predict``: score and map a folder of images with a saved model; write
``scores.csv``, heatmaps, predicted masks and, with labels or masks, ``metrics.json``."""

from __future__ import annotations

import time

import numpy as np

from ._common import (
    CLIError,
    check_dir,
    check_model_file,
    check_output_dir,
    load_for_cli,
    map_sigma_of,
    progress,
    score_batch,
    set_device,
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
    read_mask,
    size_runs,
    test_label,
)
from .report import (
    at_threshold,
    evaluate,
    pixel_confusion,
    pvalues_of,
    resized_masks,
    write_outputs,
)


def predict_command(args) -> dict:
    """``skanomaly predict``: scores, predictions, heatmaps (and metrics) of a folder."""
    from ..base import BaseSpatialDetector, resolve_device

    check_model_file(args.model)
    check_dir("IMAGE_DIR", args.image_dir)
    check_dir("--mask-dir", args.mask_dir)
    with user_errors("--device"):
        resolve_device(args.device)
    check_output_dir(args.output_dir)
    pipeline, metadata = load_for_cli(args.model)
    set_device(pipeline, args.device)
    for _, step in pipeline.steps:
        if "verbose" in getattr(step, "get_params", dict)(deep=False):
            step.set_params(verbose=False)
    # model files from before images kept their aspect ratio resized them to a square
    resize = Resize(metadata["image_size"], keep_aspect=metadata.get("input_size") is not None)
    fitted = tuple(metadata["input_size"]) if resize.keep_aspect else None
    tiled = getattr(pipeline, "tile_size", None) is not None
    paths = find_images_in(args.image_dir, "IMAGE_DIR")
    relative = [p.relative_to(args.image_dir) for p in paths]
    labels, defect_types = zip(*map(test_label, relative))
    originals = [file_size(p) for p in paths]
    sizes = [resize.size(o) for o in originals]
    if fitted is not None and not tiled:
        for path, original, size_ in zip(paths, originals, sizes):
            check_size(path, original, size_, fitted, resize,
                       "fit the model with --tile-size to score images of any shape, or "
                       "crop them to the training images' aspect ratio")
    detector = pipeline[-1]
    spatial = isinstance(detector, BaseSpatialDetector)
    # the map blur of fit (model files from before --map-sigma: anomalib's 4 px)
    sigma = map_sigma_of(metadata)
    n = len(paths)
    scores = np.empty(n)
    predictions = np.empty(n, dtype=np.int64)
    maps = [None] * n if spatial else None  # each at the size its image was scored at
    masks = None if args.mask_dir is None else [None] * n
    # predicted masks where the model has a pixel threshold (spatial detectors)
    predicted = [None] * n if "pixel_threshold_" in vars(detector) else None
    start = time.perf_counter()
    for first, stop in progress(size_runs(sizes, args.batch_size), args.quiet,
                                desc="scoring", unit="batch"):
        size = sizes[first]
        images = np.empty((stop - first, 3, *size), dtype=np.float32)
        for i in range(first, stop):
            images[i - first], original = resize.read(paths[i])
            if masks is not None:
                mask_path = find_mask(args.mask_dir, relative[i])
                if mask_path is not None:
                    masks[i] = read_mask(mask_path, paths[i], original, size)
                elif labels[i] == -1:
                    raise CLIError(
                        f"no mask for defective image {paths[i]} in {args.mask_dir} "
                        f"(looked for {relative[i].parent / (relative[i].stem + '_mask.png')})")
                else:
                    masks[i] = np.zeros(size, dtype=bool)
        with user_errors("model"):  # one pass of the pipeline: scores and maps
            scores[first:stop], predictions[first:stop], batch_maps = score_batch(
                pipeline, images, spatial, size, sigma)
            if spatial:
                maps[first:stop] = list(batch_maps)
            if predicted is not None:  # the pixel threshold's own map size and blur
                predicted[first:stop] = list(resized_masks(pipeline.predict_mask(images), size))
    timings = {"score_s": time.perf_counter() - start}
    test = ImageSet(LazyImages(paths), [r.as_posix() for r in relative],
                    np.array(labels, dtype=np.int64), list(defect_types), masks, originals)
    labelled = bool(np.any(test.labels != 0)) or masks is not None
    metrics, notes = evaluate(test, scores, maps, predictions) if labelled else ({}, [])
    if predicted is not None and masks is not None:  # the pixel confusion at the threshold
        metrics.update(pixel_confusion(np.concatenate([m.ravel() for m in masks]),
                                       np.concatenate([m.ravel() for m in predicted])))
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
    heatmaps = write_outputs(args, test, scores, predictions, maps, spatial, result,
                             pvalues_of(detector, scores), masks=predicted, digits=17,
                             metrics_json=labelled)
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
        lines += [f"  {at_threshold(metrics)}"] if at_threshold(metrics) else []
        lines += [f"  note: {note}" for note in notes]
        lines.append(f"  wrote {', '.join(wrote)} to {args.output_dir}")
        print("\n".join(lines))
    return result
