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
    elif test.masks.all() or not test.masks.any():
        notes.append("no pixel metrics: the masks need both defective and normal pixels")
    else:
        metrics["pixel_auroc"] = pixel_auroc(test.masks, maps)
        metrics["pro"] = pro_score(test.masks, maps)
    return metrics, notes


def pixel_confusion(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Pixel precision, recall and F1 of predicted masks against ground truth."""
    tp = int(np.sum(truth & predicted))
    n_predicted, n_true = int(predicted.sum()), int(truth.sum())
    precision = tp / n_predicted if n_predicted else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * tp / (n_predicted + n_true) if tp else 0.0
    return {"pixel_precision": precision, "pixel_recall": recall, "pixel_f1": f1}


def resized_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Predicted masks at ``size`` x ``size`` (nearest neighbour when the detector's pixel
    threshold was set at another map size)."""
    if masks.shape[1:] == (size, size):
        return masks
    rows = (np.arange(size) * masks.shape[1]) // size
    cols = (np.arange(size) * masks.shape[2]) // size
    return masks[:, rows][:, :, cols]


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
    for i in progress(range(len(names)), quiet, desc="writing heatmaps", unit="image"):
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


def write_masks(folder: Path, names: list[str], masks: np.ndarray) -> None:
    """Predicted masks as black/white PNGs, named as the heatmaps."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in zip(_heatmap_names(names), masks):
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
            write_masks(out / "masks", test.names, masks)
        write_scores(out / "scores.csv", test, scores, predictions, heatmaps, digits=digits,
                     pvalues=pvalues)
        if metrics_json:
            with open(out / "metrics.json", "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    except OSError as exc:
        raise CLIError(f"cannot write to --output-dir {out}: {exc}") from exc
    return heatmaps
