"""Small defects on real texture: tiling at native resolution against resizing the image.

scikit-image's 512 x 512 brick, grass and gravel (grey, replicated to RGB): normal
crops of ``--image-size`` pixels (default 192) from the top half of the texture for
training, test crops from the bottom half, half of them with ONE small defect whose
extent is 4 to 12 pixels, with its exact mask:

- ``scratch``: a straight dark or bright line 6 to 12 px long, 1 or 2 px wide;
- ``blotch``: a saturated colour blended (opacity 0.5-0.8) into an ellipse whose axes
  are 4 to 12 px;
- ``patch``: a rectangle of 4 to 12 px a side cut from one of the two other textures.

Each detector (PaDiM, PatchCore: the command line's EfficientNet-Lite0 with its packaged
ImageNet weights and its default layers per detector) runs two ways:

- ``tiled``: ``make_anomaly_pipeline(..., tile_size=T, tile_stride=S)`` on the images at
  their native resolution (tiles of ``--tile-size`` at ``--tile-stride``, maps stitched
  by ``--merge``: mean or max of the overlaps); with ``--tile-resize R`` each tile is
  enlarged to R pixels before the backbone (``tile_resize``: a zoom of R / T, so that
  the backbone's stride-8 features fall every 8 T / R image pixels);
- ``resized``: the whole image resized (bilinear, antialiased) to ``--resize`` pixels,
  as a pipeline that takes one fixed input size does, the maps upsampled back to the
  native size (``anomaly_map(output_size=...)``);
- ``whole``: the whole image at its native size, untiled (what tiling approximates
  when the image is small enough to go through the backbone at once; ``--no-whole``
  leaves it out).

Maps are blurred with a Gaussian of ``--map-sigmas`` pixels of the native image (default:
the command line's tiled ``--map-sigma``, 2 px), one row per sigma from one fit.
Reported per texture, way and sigma: pixel AUROC, image AUROC and PRO (FPR <= 0.3) at the
native resolution (:mod:`skanomaly.metrics`), fit and score time (one run each: timings
on shared 2-core machines move with other load, which is recorded), and the peak host
memory of fit and of score (resident set above its level before the call, sampled every
2 ms: the allocator reuses freed memory between runs, so a later run can read lower).
Results go to ``benchmarks/results/small_defects-<date>-<host-kind>[-<tag>].{md,json}``.

``--ways`` picks the ways run (all three by default); ``--padim-layers`` and
``--patchcore-layers`` replace the command line's layers of a detector.

Usage::

    python benchmarks/small_defects.py                  # all three textures, both merges
    python benchmarks/small_defects.py --quick          # tiny sizes (the smoke test's run)
    python benchmarks/small_defects.py --tile-size 64 --tile-stride 48 --tile-resize 128 \
        --merges mean --ways tiled                      # tiles zoomed 2x
"""

from __future__ import annotations

import argparse
import colorsys
import datetime
import gc
import os
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skanomaly.cli._common import TILED_MAP_SIGMA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TEXTURES = ("brick", "grass", "gravel")
DETECTORS = ("padim", "patchcore")
DEFECTS = ("scratch", "blotch", "patch")
SEED = 0


# --------------------------------------------------------------------------- data
def _scratch(image, rng, donors):
    size = image.shape[0]
    length, width = rng.uniform(6, 12), int(rng.integers(1, 3))
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(8, size - 8, size=2)
    t = np.linspace(-length / 2, length / 2, 64)
    rows = np.rint(centre[0] + t * np.sin(angle)).astype(int)
    cols = np.rint(centre[1] + t * np.cos(angle)).astype(int)
    mask = np.zeros(image.shape[:2], bool)
    for dr in range(width):
        mask[np.clip(rows + dr, 0, size - 1), np.clip(cols, 0, size - 1)] = True
    image[mask] = rng.uniform(0.0, 0.12) if rng.random() < 0.5 else rng.uniform(0.88, 1.0)
    return mask


def _blotch(image, rng, donors):
    from skimage import draw

    size = image.shape[0]
    centre = rng.uniform(8, size - 8, size=2)
    radii = rng.uniform(2.0, 6.0, size=2)
    mask = np.zeros(image.shape[:2], bool)
    mask[draw.ellipse(*centre, *radii, shape=mask.shape,
                      rotation=rng.uniform(-np.pi, np.pi))] = True
    colour = np.array(colorsys.hsv_to_rgb(rng.random(), 0.9, 0.9), np.float32)
    alpha = np.float32(rng.uniform(0.5, 0.8))
    image[mask] = (1 - alpha) * image[mask] + alpha * colour
    return mask


def _patch(image, rng, donors):
    size = image.shape[0]
    height, width = rng.integers(4, 13, size=2)
    top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    donor = donors[rng.integers(len(donors))]
    d_top = rng.integers(0, donor.shape[0] - height + 1)
    d_left = rng.integers(0, donor.shape[1] - width + 1)
    image[top:top + height, left:left + width] = donor[d_top:d_top + height,
                                                       d_left:d_left + width, None]
    mask = np.zeros(image.shape[:2], bool)
    mask[top:top + height, left:left + width] = True
    return mask


_MAKERS = {"scratch": _scratch, "blotch": _blotch, "patch": _patch}


def make_data(texture: str, n_train: int, n_test: int, image_size: int, seed: int = SEED):
    """Normal training crops (top half), test crops (bottom half), half with one small
    defect: (X_train, X_test, y_test, masks, defect types); images float32 (n, 3, S, S)
    in [0, 1], y +1 good / -1 defective, masks bool (n, S, S) exact."""
    import skimage.data

    rng = np.random.default_rng(seed)
    grey = {name: getattr(skimage.data, name)().astype(np.float32) / 255 for name in TEXTURES}
    source, donors = grey[texture], [grey[n] for n in TEXTURES if n != texture]
    half, width = source.shape[0] // 2, source.shape[1]
    if image_size > half:
        raise ValueError(f"image_size {image_size} exceeds half the texture ({half} px)")

    def crops(n, first_row):
        rows = rng.integers(first_row, first_row + half - image_size + 1, size=n)
        cols = rng.integers(0, width - image_size + 1, size=n)
        return np.stack([np.repeat(source[r:r + image_size, c:c + image_size, None], 3, 2)
                         for r, c in zip(rows, cols)]).astype(np.float32)

    X_train, X_test = crops(n_train, 0), crops(n_test, half)
    kinds = np.full(n_test, "good", dtype="<U7")
    defective = rng.choice(n_test, n_test // 2, replace=False)
    kinds[defective] = rng.permutation(np.resize(DEFECTS, len(defective)))
    masks = np.zeros((n_test, image_size, image_size), bool)
    for i in defective:
        masks[i] = _MAKERS[kinds[i]](X_test[i], rng, donors)
    y = np.where(kinds == "good", 1, -1).astype(np.int64)
    return (np.ascontiguousarray(X_train.transpose(0, 3, 1, 2)),
            np.ascontiguousarray(X_test.transpose(0, 3, 1, 2)), y, masks, kinds)


def resize(X: np.ndarray, size: int) -> np.ndarray:
    """Images resized to ``size`` x ``size`` (bilinear, antialiased)."""
    t = F.interpolate(torch.from_numpy(X), size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)
    return t.clamp_(0, 1).numpy()


# --------------------------------------------------------------------------- runs
def peak_rss(fn):
    """(result, peak host RSS above the level before the call in MiB), sampled every
    2 ms by a thread (psutil; None without it)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency of the bench extra
        return fn(), None
    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return result, (peak[0] - base) / 2**20


@dataclass
class Row:
    texture: str
    detector: str
    way: str  # "tiled (mean)", "tiled (max)", "resized 64"
    #: blur of the maps in pixels of the native image (``sigma`` of ``score_and_map``)
    map_sigma: float | None = None
    pixel_auroc: float | None = None
    image_auroc: float | None = None
    pro: float | None = None
    fit_s: float | None = None
    score_s: float | None = None
    fit_mib: float | None = None
    score_mib: float | None = None
    #: pixel AUROC over the good images and those of one defect type
    pixel_auroc_by_type: dict | None = None
    error: str | None = None


def make_model(detector: str, args, tiled: bool, merge: str = "mean"):
    from skanomaly import PaDiMDetector, PatchCoreDetector, make_anomaly_pipeline
    from skanomaly.cli import DEFAULT_BACKBONE, default_layers, resolve_weights
    from skanomaly.features import FeatureExtractor

    if args.weights == "random":
        backbone, layers, weights = "resnet18", ["layer1", "layer2"], None
    else:
        backbone = DEFAULT_BACKBONE
        layers, weights = default_layers(backbone, detector), resolve_weights(backbone, None)
    layers = getattr(args, f"{detector}_layers", None) or layers
    extractor = FeatureExtractor(backbone, list(layers), weights=weights, random_state=SEED,
                                 device=args.device, batch_size=16)
    if detector == "padim":
        det = PaDiMDetector(n_features=args.padim_features, random_state=SEED,
                            device=args.device)
    else:
        det = PatchCoreDetector(coreset_sampling_ratio=args.coreset_ratio,
                                random_state=SEED, device=args.device)
    tiling = dict(tile_size=args.tile_size, tile_stride=args.tile_stride,
                  tile_merge=merge, tile_resize=args.tile_resize) if tiled else {}
    return make_anomaly_pipeline(extractor, det, **tiling)


def evaluate(row: Row, model, X_train, X_test, y, masks, kinds, size: int,
             sigmas=(TILED_MAP_SIGMA,)) -> list[Row]:
    """Fit ``model`` and score ``X_test``: one row per map blur of ``sigmas`` (pixels at
    the native size), copies of ``row`` from one fit; times and memory are those of the
    fit and of the first sigma's ``score_and_map`` (a blur changes the maps only)."""
    from skanomaly.metrics import image_auroc, pixel_auroc, pro_score

    rows = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CalibrationWarnings: thresholds not measured
            start = time.perf_counter()
            _, row.fit_mib = peak_rss(lambda: model.fit(X_train))
            row.fit_s = time.perf_counter() - start
            for sigma in sigmas:
                row = replace(row, map_sigma=float(sigma))
                rows.append(row)
                if len(rows) == 1:
                    start = time.perf_counter()
                    (scores, maps), row.score_mib = peak_rss(
                        lambda: model.score_and_map(X_test, output_size=size, sigma=sigma))
                    row.score_s = time.perf_counter() - start
                else:
                    maps = model.anomaly_map(X_test, output_size=size, sigma=sigma)
                row.pixel_auroc = pixel_auroc(masks, maps)
                row.image_auroc = image_auroc(y, -scores)
                row.pro = pro_score(masks, maps)
                row.pixel_auroc_by_type = {
                    kind: pixel_auroc(masks[(kinds == kind) | (kinds == "good")],
                                      maps[(kinds == kind) | (kinds == "good")])
                    for kind in DEFECTS if (kinds == kind).any()}
    except Exception as exc:  # one failure must not lose the other results
        row.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        if not rows:
            rows.append(row)
    return rows


def _fmt(v, digits=3):
    return "" if v is None else f"{v:.{digits}f}"


def markdown(rows, info, settings) -> str:
    lines = [
        f"# Small defects (4-12 px) at native resolution: tiled vs resized ({info['date']})",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} logical cores, "
        f"{info['memory_gib']:.0f} GiB, {info['threads']} torch threads, device "
        f"{info['device']}; torch {info['versions']['torch']}, Python {info['python']}. "
        f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in info['load_start'])}"
        f", at end {tuple(round(x, 2) for x in info['load_end'])} (shared machine: "
        "times move with other load).",
        "",
        f"Data: {settings['n_train']} normal training crops and {settings['n_test']} test "
        f"crops ({settings['n_test'] // 2} with one defect: scratch, blotch or pasted patch,"
        f" 4-12 px) of {settings['image_size']} x {settings['image_size']} px from each "
        "scikit-image texture (train: top half, test: bottom half). Backbone: "
        f"{settings['backbone']}; layers: {settings['layers']}. Tiled: tiles of "
        f"{settings['tile_size']} px at stride {settings['tile_stride']}, "
        + ("at native resolution" if settings["tile_resize"] in (None, settings["tile_size"])
           else f"each enlarged to {settings['tile_resize']} px before the backbone (zoom "
           f"{settings['tile_resize'] / settings['tile_size']:g})")
        + f". Resized: the whole image to "
        f"{settings['resize']} px, maps upsampled back. Whole: the image at its native size, "
        f"untiled. PaDiM n_features={settings['padim_features']}; PatchCore "
        f"coreset_sampling_ratio={settings['coreset_ratio']}. Metrics at native resolution;"
        " PRO integrated to FPR 0.3. Memory: peak host RSS above the level before the "
        "call (MiB).",
        "",
        "| texture | detector | way | map sigma | pixel AUROC | image AUROC | PRO | pixel "
        "AUROC scratch / blotch / patch | fit s | score s | fit MiB | score MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sigma = "" if r.map_sigma is None else f"{r.map_sigma:g}"
        if r.error:
            lines.append(f"| {r.texture} | {r.detector} | {r.way} | {sigma} | failed: "
                         f"{r.error} | | | | | | | |")
            continue
        by_type = " / ".join(_fmt((r.pixel_auroc_by_type or {}).get(k)) for k in DEFECTS)
        lines.append(
            f"| {r.texture} | {r.detector} | {r.way} | {sigma} | {_fmt(r.pixel_auroc)} | "
            f"{_fmt(r.image_auroc)} | {_fmt(r.pro)} | {by_type} | {_fmt(r.fit_s, 1)} | "
            f"{_fmt(r.score_s, 1)} | {_fmt(r.fit_mib, 0)} | {_fmt(r.score_mib, 0)} |")
    return "\n".join(lines) + "\n"


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--textures", nargs="+", choices=TEXTURES, default=list(TEXTURES))
    p.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    p.add_argument("--merges", nargs="+", choices=("mean", "max"), default=["mean", "max"],
                   help="how tiled maps combine in overlaps (each one a row)")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--tile-size", type=int, default=96)
    p.add_argument("--tile-stride", type=int, default=64)
    p.add_argument("--tile-resize", type=int, default=None,
                   help="tiles resized to this many pixels before the backbone "
                        "(tile_resize; default: native resolution)")
    p.add_argument("--ways", nargs="+", choices=("tiled", "resized", "whole"),
                   default=["tiled", "resized", "whole"], help="the ways to run")
    p.add_argument("--padim-layers", type=lambda text: text.split(","), default=None,
                   help="comma-separated backbone layers of PaDiM (default: the CLI's)")
    p.add_argument("--padim-features", type=int, default=100,
                   help="PaDiM's n_features: random channels kept (at most the layers')")
    p.add_argument("--patchcore-layers", type=lambda text: text.split(","), default=None,
                   help="comma-separated backbone layers of PatchCore (default: the CLI's)")
    p.add_argument("--map-sigmas", nargs="+", type=float, default=[TILED_MAP_SIGMA],
                   metavar="PIXELS", help="blurs of the maps in native pixels, one row each "
                   "from one fit (default: the command line's tiled --map-sigma, "
                   f"{TILED_MAP_SIGMA:g})")
    p.add_argument("--resize", type=int, default=64)
    p.add_argument("--coreset-ratio", type=float, default=0.02)
    p.add_argument("--no-whole", action="store_true",
                   help="leave out the untiled run on whole images at native size")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                   help="pretrained: EfficientNet-Lite0 (packaged ImageNet weights); "
                        "random: a random resnet18 (no weights package needed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: 6 train / 6 test crops of 64 px, tiles of 32, one "
                        "texture and a random resnet18 (a smoke run)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="suffix of the result files' names (after a "
                   "dash), e.g. zoom2")
    return p


def main(argv=None) -> list[Row]:
    """Run, print and write the table; returns the rows."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.image_size = 6, 6, 64
        args.tile_size, args.tile_stride, args.resize = 32, 24, 32
        args.textures, args.weights = args.textures[:1], "random"
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device(args.device), torch.get_num_threads())
    info["date"] = datetime.date.today().isoformat()
    info["load_start"] = os.getloadavg()
    rows = []
    for texture in args.textures:
        X_train, X_test, y, masks, kinds = make_data(texture, args.n_train, args.n_test,
                                                     args.image_size)
        for detector in args.detectors:
            for merge in (args.merges if "tiled" in args.ways else ()):
                for row in evaluate(Row(texture, detector, f"tiled ({merge})"),
                                    make_model(detector, args, True, merge), X_train, X_test,
                                    y, masks, kinds, args.image_size, args.map_sigmas):
                    rows.append(row)
                    print(row, flush=True)
            if "resized" in args.ways:
                for row in evaluate(Row(texture, detector, f"resized {args.resize}"),
                                    make_model(detector, args, False),
                                    resize(X_train, args.resize), resize(X_test, args.resize),
                                    y, masks, kinds, args.image_size, args.map_sigmas):
                    rows.append(row)
                    print(row, flush=True)
            if "whole" in args.ways and not args.no_whole:
                for row in evaluate(Row(texture, detector, f"whole {args.image_size}, untiled"),
                                    make_model(detector, args, False), X_train, X_test, y,
                                    masks, kinds, args.image_size, args.map_sigmas):
                    rows.append(row)
                    print(row, flush=True)
    info["load_end"] = os.getloadavg()
    settings = dict(vars(args), output=str(args.output), backbone=(
        "resnet18 (random)" if args.weights == "random"
        else "EfficientNet-Lite0, packaged ImageNet weights"), layers="; ".join(
        f"{d} {'+'.join(make_model(d, args, False)[0].layers)}" for d in args.detectors))
    table = markdown(rows, info, settings)
    stem = (f"small_defects-{info['date']}-{host_kind(info)}" + ("-quick" if args.quick else "")
            + (f"-{args.tag}" if args.tag else ""))
    write_report(args.output, stem, table,
                 {"machine": info, "settings": settings, "rows": [asdict(r) for r in rows]})
    print("\n" + table)
    print(f"written: {args.output / stem}.md and .json")
    return rows


if __name__ == "__main__":
    main()
