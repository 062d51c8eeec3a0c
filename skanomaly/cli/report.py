"""The command's reports: metrics of the scores against labels and masks, and the files
of ``--output-dir``: ``scores.csv``, ``heatmaps/*.png``, ``masks/*.png`` and
``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path, PurePath

import numpy as np

from ._common import CLIError, progress
from ._images import ImageSet


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


def evaluate(test: ImageSet, scores, maps, predictions) -> tuple[dict, list[str]]:
    """Image and pixel metrics where the labels and masks allow; notes on what was skipped.

    Beside the threshold-free AUROCs, ``at_threshold``: the confusion of the labelled
    test images at the prediction threshold (:func:`_confusion`).
    """
    from ..metrics import average_precision_anomaly, image_auroc, pixel_auroc, pro_score

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
    elif all(m.all() for m in test.masks) or not any(m.any() for m in test.masks):
        notes.append("no pixel metrics: the masks need both defective and normal pixels")
    elif len({m.shape for m in maps}) > 1:  # tiled images of several shapes
        pooled = np.concatenate([m.ravel() for m in test.masks])[None, None]
        metrics["pixel_auroc"] = pixel_auroc(
            pooled, np.concatenate([m.ravel() for m in maps])[None, None])
        notes.append("no PRO: the test images have several shapes (pixel AUROC pools "
                     "their pixels, each at the size its map was computed at)")
    else:
        masks, maps = np.stack(test.masks), np.stack(maps)
        metrics["pixel_auroc"] = pixel_auroc(masks, maps)
        metrics["pro"] = pro_score(masks, maps)
    return metrics, notes


def pixel_confusion(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Pixel precision, recall and F1 of predicted masks against ground truth."""
    tp = int(np.sum(truth & predicted))
    n_predicted, n_true = int(predicted.sum()), int(truth.sum())
    precision = tp / n_predicted if n_predicted else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * tp / (n_predicted + n_true) if tp else 0.0
    return {"pixel_precision": precision, "pixel_recall": recall, "pixel_f1": f1}


def resized_masks(masks: np.ndarray, size) -> np.ndarray:
    """Masks (n, h, w) at ``size`` (height, width) by nearest neighbour (predicted masks
    when the detector's pixel threshold was set at another map size; masks written at
    their images' own size)."""
    height, width = size
    if masks.shape[1:] == (height, width):
        return masks
    from PIL import Image  # NEAREST as ground-truth masks are resized (read_mask)

    return np.stack([
        np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((width, height),
                                                                 Image.NEAREST)) > 0
        for mask in masks])


def map_at(anomaly_map: np.ndarray, size) -> np.ndarray:
    """An anomaly map (h, w) resized bilinearly to ``size`` (height, width): a map at the
    size its image was scored at, shown at the image's own size."""
    if anomaly_map.shape == tuple(size):
        return anomaly_map
    from PIL import Image

    image = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def _own_size(test: ImageSet, i: int, shape) -> tuple[int, int]:
    """(height, width) of test image ``i`` in its file, or ``shape`` when unknown."""
    if test.sizes is None:
        return tuple(shape)
    width, height = test.sizes[i]
    return height, width


def pvalues_of(detector, anomaly_scores):
    """The detector's conformal ``pvalues`` of images with these anomaly scores, or None.

    None unless the detector was calibrated on held-out images (``calibration_scores_``).
    ``-anomaly_scores`` are the images' ``score_samples`` exactly, so this is
    ``detector.pvalues(features)`` without scoring the features again.
    """
    if "calibration_scores_" not in vars(detector):
        return None
    return detector._pvalues_of(-np.asarray(anomaly_scores, dtype=np.float64))


def at_threshold(metrics: dict) -> str:
    """The confusion at the threshold in words: "3 of 30 good images flagged, ..."."""
    c = metrics.get("at_threshold")
    if c is None:
        return ""
    rates = "  ".join(f"{name} {c[name]:.3f}" for name in ("precision", "recall", "f1")
                      if c[name] is not None)
    return (f"at the threshold: {c['n_good_flagged']} of {c['n_good']} good images flagged, "
            f"{c['n_defective_found']} of {c['n_defective']} defective found"
            + (f"  {rates}" if rates else ""))


def write_scores(path: Path, test: ImageSet, scores, predictions, heatmaps,
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


def _heatmap_names(names: list[str]) -> list[str]:
    """File names of the heatmaps: index, then the image's path flattened."""
    flat = (PurePath(name).with_suffix("").as_posix().replace("/", "_") for name in names)
    return [f"{i:04d}_{stem}.png" for i, stem in enumerate(flat)]


def write_heatmaps(folder: Path, test: ImageSet, scores, maps, quiet: bool) -> list[str]:
    """One overlay PNG per test image on a colour scale shared by all, each image and its
    map at the image's own size (``test.sizes``); relative paths."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    names = _heatmap_names(test.names)
    vmin = min(float(m.min()) for m in maps)
    vmax = max(float(m.max()) for m in maps)
    fig = Figure(figsize=(4.2, 3.6), dpi=100)
    fig.subplots_adjust(left=0.02, right=0.86, bottom=0.02, top=0.88)
    ax = fig.add_subplot()
    ax.set_axis_off()
    shown = ax.imshow(test.images[0].transpose(1, 2, 0))
    overlay = ax.imshow(maps[0], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
    fig.colorbar(overlay, ax=ax, fraction=0.05, pad=0.03, label="anomaly score")
    for i in progress(range(len(names)), quiet, desc="writing heatmaps", unit="image"):
        image = test.images[i].transpose(1, 2, 0)
        height, width = image.shape[:2]
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        shown.set_data(image)
        overlay.set_data(map_at(maps[i], (height, width)))
        shown.set_extent(extent)
        overlay.set_extent(extent)
        contour = None
        if test.masks is not None and test.masks[i].any():
            truth = resized_masks(test.masks[i][None], (height, width))[0]
            contour = ax.contour(truth, levels=[0.5], colors="white", linewidths=1.2)
        label = {1: "good", -1: test.defect_types[i]}.get(int(test.labels[i]), "unlabelled")
        ax.set_title(f"{test.names[i]} ({label})\nscore {scores[i]:.4g}", fontsize=9)
        fig.savefig(folder / names[i])
        if contour is not None:
            contour.remove()
    return [f"heatmaps/{name}" for name in names]


def write_masks(folder: Path, test: ImageSet, masks) -> None:
    """Predicted masks as black/white PNGs at their images' own size (nearest
    neighbour), named as the heatmaps."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, mask) in enumerate(zip(_heatmap_names(test.names), masks)):
        mask = resized_masks(mask[None], _own_size(test, i, mask.shape))[0]
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name)


def write_outputs(args, test: ImageSet, scores, predictions, maps, spatial: bool, result,
                  pvalues=None, *, masks=None, digits: int = 9, metrics_json: bool = True):
    """scores.csv (with a p-value column when ``pvalues`` is given, scores to ``digits``
    significant digits), heatmaps/, masks/ (predicted ``masks``, when given) and, with
    ``metrics_json``, metrics.json in ``--output-dir``; the heatmaps' paths."""
    out = args.output_dir
    heatmaps = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        if spatial and not args.no_heatmaps:
            start = time.perf_counter()
            heatmaps = write_heatmaps(out / "heatmaps", test, scores, maps, args.quiet)
            result["timings"]["heatmaps_s"] = time.perf_counter() - start
        if masks is not None:
            write_masks(out / "masks", test, masks)
        write_scores(out / "scores.csv", test, scores, predictions, heatmaps, digits=digits,
                     pvalues=pvalues)
        if metrics_json:
            with open(out / "metrics.json", "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    except OSError as exc:
        raise CLIError(f"cannot write to --output-dir {out}: {exc}") from exc
    return heatmaps
