"""Backbone x detector x working image size on the bundled textures: the CLI's defaults.

Every configuration is the pipeline that ``skanomaly fit`` and the main job build
(:func:`skanomaly.cli.default_layers` for the layers, the CLI's detector settings:
PaDiM with 100 random channels, PatchCore and DFM with their defaults, seed 0), fitted
on normal crops of one bundled texture and scoring its test crops. Results go to
``benchmarks/results/backbones-<date>-<host-kind>[-quick].{md,json}`` with the machine
and the load average.

Protocol:

* Data: :func:`skanomaly.datasets.load_textures` with ``image_size=256`` (crops at the
  texture's own scale, defects drawn at 256 px: patches of 1/6 to 1/3 of the side,
  scratches about 5 px wide, blotches), 100 training and 60 test crops (30 defective),
  seed 0: the main job's numbers of images.
* Working size: every image is resized to ``s`` x ``s`` (bilinear, antialiased, as
  ``skanomaly fit`` resizes a folder's images) before the backbone; the anomaly maps
  come back at 256 px and are compared with the 256-px masks, so that pixel AUROC and
  PRO are on the same pixels for every ``s``.
* Maps: blurred with a Gaussian of ``--map-sigmas`` pixels (at the native size; default:
  the command line's untiled ``--map-sigma``, :data:`skanomaly.cli._common.DEFAULT_MAP_SIGMA`),
  one row per sigma from one fit (the blur changes the maps only, not the scores).
* Metrics: image AUROC and pixel AUROC (:mod:`skanomaly.metrics`, anomaly scores), PRO
  up to a false-positive rate of 0.3 (:func:`skanomaly.metrics.pro_score`); the wall
  seconds of ``fit`` (features included) plus ``score_and_map`` of the test crops,
  the CPU seconds of the process over the same span (less sensitive to other load
  than wall time), and the size of the model file :func:`skanomaly.persistence.save_model`
  writes.

Usage::

    python benchmarks/backbones.py                      # the full grid (~1 h on 2 cores)
    python benchmarks/backbones.py --quick              # tiny sizes, for the test suite
    python benchmarks/backbones.py --backbones lite0 --detectors patchcore --sizes 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from skanomaly import datasets
from skanomaly.metrics import image_auroc, pixel_auroc, pro_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0
BACKBONES = {
    "lite0": ("timm/tf_efficientnet_lite0", "efficientnet-lite0-imagenet"),
    "lite1": ("timm/tf_efficientnet_lite1", "efficientnet-lite1-imagenet"),
    "lite2": ("timm/tf_efficientnet_lite2", "efficientnet-lite2-imagenet"),
}
DETECTORS = ("padim", "patchcore", "dfm")
TEXTURES = ("brick", "grass", "gravel")
SIZES = (128, 192, 256)


def resize(X: np.ndarray, size: int) -> np.ndarray:
    """(N, 3, H, W) float32 images resized to ``size`` x ``size`` (bilinear, antialiased)."""
    if X.shape[-1] == size:
        return X
    out = torch.nn.functional.interpolate(torch.from_numpy(X), size=(size, size),
                                          mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.clamp_(0, 1).numpy()


def _cli_args(detector: str):
    from types import SimpleNamespace

    return SimpleNamespace(contamination=0.1, device="cpu", random_state=SEED,
                           detector=detector)


def run_one(backbone: str, detector: str, size: int, data, layers=None,
            detector_params=None, sigmas=None) -> list[dict]:
    """Fit the CLI's pipeline for (backbone, detector) at ``size`` on ``data``; metrics,
    one row per map blur of ``sigmas`` (pixels at the native size; default: the command
    line's untiled ``--map-sigma``).

    ``layers`` (a tuple of names) replaces :func:`skanomaly.cli.default_layers`;
    ``detector_params`` (a dict) are set on the CLI's detector (``set_params``). Times
    are those of the fit and of the first sigma's ``score_and_map``."""
    from skanomaly.cli._common import DEFAULT_MAP_SIGMA

    from skanomaly import cli
    from skanomaly.cli._common import make_detector, make_model
    from skanomaly.features import FeatureExtractor
    from skanomaly.persistence import save_model

    name, weights = BACKBONES[backbone]
    layers = cli.default_layers(name, detector) if layers is None else tuple(layers)
    native = data.X_train.shape[-1]
    X_train, X_test = resize(data.X_train, size), resize(data.X_test, size)
    load_before = os.getloadavg()[0]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    extractor = FeatureExtractor(name, layers, weights=weights, device="cpu",
                                 random_state=SEED)
    n_channels = extractor.fit(X_train[:1]).transform(X_train[:1]).shape[1]
    estimator = make_detector(detector, n_channels, len(X_train), _cli_args(detector))
    estimator.set_params(**(detector_params or {}))
    model = make_model(extractor, estimator, detector)
    model.fit(X_train)
    fit_s = time.perf_counter() - wall0
    sigmas = [DEFAULT_MAP_SIGMA] if sigmas is None else list(sigmas)
    normality, maps = model.score_and_map(X_test, output_size=native, sigma=sigmas[0])
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    load_after = os.getloadavg()[0]
    scores = -np.asarray(normality, dtype=np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.skanomaly"
        save_model(model, path, image_size=size)
        model_mb = path.stat().st_size / 1e6
    rows = []
    for sigma in sigmas:
        if sigma != sigmas[0]:
            maps = model.anomaly_map(X_test, output_size=native, sigma=sigma)
        maps = np.asarray(maps, dtype=np.float64)
        rows.append({
            "backbone": backbone, "detector": detector, "size": size,
            "layers": list(layers), "channels": int(n_channels),
            "detector_params": dict(detector_params or {}), "map_sigma": float(sigma),
            "image_auroc": image_auroc(data.y_test, scores),
            "pixel_auroc": pixel_auroc(data.masks_test, maps),
            "pro": pro_score(data.masks_test, maps),
            "fit_s": fit_s, "wall_s": wall, "cpu_s": cpu, "model_mb": model_mb,
            "load": [load_before, load_after],
        })
    return rows


def markdown(rows: list[dict], info: dict, settings: dict) -> str:
    textures = settings["textures"]
    lines = [
        f"# Backbones, detectors and working sizes on the bundled textures ({info['date']})",
        "",
        f"Machine: {info['machine']}. torch {info['torch']}, {info['threads']} threads. "
        f"Load average (1 min) during the run: {info['load_min']:.1f} to "
        f"{info['load_max']:.1f} (other sessions share the cores: compare times within "
        "this table, CPU seconds beside wall seconds).",
        "",
        f"Data: `load_textures(texture, n_train={settings['n_train']}, "
        f"n_test={settings['n_test']}, image_size={settings['native']}, random_state=0)`; "
        f"images resized to the working size, maps compared with the masks at "
        f"{settings['native']} px. Pipeline as `skanomaly fit` builds it "
        "(`cli.default_layers`, PaDiM 100 channels, seed 0). Time: fit (features "
        "included) + `score_and_map` of the test crops, per texture. Model: size of the "
        "saved model file.",
        "",
        "| backbone | detector | layers | size | map sigma | " + " | ".join(
            f"{t} pixel / image / PRO" for t in textures)
        + " | min pixel AUROC | wall s (mean) | CPU s (mean) | model MB |",
        "| --- | --- | --- | ---: | ---: | " + " | ".join("---" for _ in textures)
        + " | ---: | ---: | ---: | ---: |",
    ]

    def key(r):
        params = ", ".join(f"{k}={v}" for k, v in sorted(r.get("detector_params", {}).items()))
        name = r["detector"] + (f" ({params})" if params else "")
        # rows of files from before map_sigma: anomalib's 4 px
        return r["backbone"], name, "+".join(r["layers"]), r["size"], r.get("map_sigma", 4.0)

    for k in sorted({key(r) for r in rows}, key=lambda k: (k[1], k[2], k[0], k[3], k[4])):
        cells = {r["texture"]: r for r in rows if key(r) == k}
        values = []
        for t in textures:
            r = cells.get(t)
            values.append("n/a" if r is None else
                          f"{r['pixel_auroc']:.3f} / {r['image_auroc']:.3f} / {r['pro']:.3f}")
        present = list(cells.values())
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]:g} | " + " | ".join(values)
            + (f" | {min(r['pixel_auroc'] for r in present):.3f}"
               if len(present) == len(textures) else " | n/a")
            + f" | {np.mean([r['wall_s'] for r in present]):.1f}"
            + f" | {np.mean([r['cpu_s'] for r in present]):.1f}"
            + f" | {np.mean([r['model_mb'] for r in present]):.1f} |"
        )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 training and 6 test crops of 64 px (for the test suite)")
    parser.add_argument("--backbones", nargs="+", choices=tuple(BACKBONES),
                        default=list(BACKBONES))
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--textures", nargs="+", choices=TEXTURES, default=list(TEXTURES))
    parser.add_argument("--layers", type=lambda text: tuple(text.split(",")), default=None,
                        help="comma-separated layers for every detector instead of the "
                        "CLI's defaults")
    parser.add_argument("--coreset-ratio", type=float, default=None,
                        help="PatchCore's coreset_sampling_ratio instead of its default")
    parser.add_argument("--n-neighbors", type=int, default=None,
                        help="PatchCore's n_neighbors instead of its default")
    parser.add_argument("--map-sigmas", nargs="+", type=float, default=None,
                        metavar="PIXELS", help="blurs of the maps, one row each from one "
                        "fit (default: the command line's untiled --map-sigma)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    settings = dict(n_train=8, n_test=6, native=64) if args.quick else dict(
        n_train=100, n_test=60, native=256)
    settings["textures"] = args.textures
    threads = torch.get_num_threads()
    rows = []
    cache = {}
    args.output.mkdir(parents=True, exist_ok=True)
    partial = args.output / f"backbones-partial{args.tag}.jsonl"
    partial.write_text("")
    # size and detector outermost: a run cut short has every texture and backbone of
    # the first (size, detector) pairs
    for size in args.sizes:
        for detector in args.detectors:
            for texture in args.textures:
                if texture not in cache:
                    cache[texture] = datasets.load_textures(
                        texture, n_train=settings["n_train"], n_test=settings["n_test"],
                        image_size=settings["native"], random_state=SEED)
                params = {k: v for k, v in (("coreset_sampling_ratio", args.coreset_ratio),
                                            ("n_neighbors", args.n_neighbors))
                          if v is not None and detector == "patchcore"}
                for backbone in args.backbones:
                    for row in run_one(backbone, detector, size, cache[texture],
                                       args.layers, params, args.map_sigmas):
                        row = {"texture": texture, **row}
                        rows.append(row)
                        with partial.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{texture:6s} {backbone} {detector:9s} {size:4d} sigma "
                              f"{row['map_sigma']:g}  pixel {row['pixel_auroc']:.3f} image "
                              f"{row['image_auroc']:.3f} PRO {row['pro']:.3f}  "
                              f"{row['wall_s']:.1f} s wall {row['cpu_s']:.1f} s CPU  "
                              f"{row['model_mb']:.1f} MB  load {row['load'][1]:.1f}",
                              flush=True)
    loads = [v for r in rows for v in r["load"]]
    info = machine_info(torch.device("cpu"), threads)
    info.update(date=datetime.date.today().isoformat(), threads=threads,
                load_min=min(loads), load_max=max(loads))
    info.update(machine=f"{info['cpu_model']}, {info['cpu_cores']} cores, "
                f"{info['memory_gib']:.0f} GiB", torch=torch.__version__)
    partial.unlink()
    stem = f"backbones-{info['date']}-{host_kind(info)}{'-quick' if args.quick else ''}{args.tag}"
    (args.output / f"{stem}.json").write_text(json.dumps(
        {"info": info, "settings": settings, "rows": rows}, indent=1, default=str))
    (args.output / f"{stem}.md").write_text(markdown(rows, info, settings))
    print(f"wrote {args.output / stem}.md")
    return rows


if __name__ == "__main__":
    main()
