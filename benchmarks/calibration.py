"""Does ``predict`` hold on unseen data? Flag rates of skanomaly's fitted thresholds.

Every skanomaly detector is fitted on the normal training samples of the bundled data
sets (the same data, features and detector settings as ``benchmarks/quality.py``) with
``contamination`` 0.05, 0.1 and 0.2, and predicts the test set, which it never saw. The
table gives the share of the test set's NORMAL samples flagged -1 (which should be about
``contamination``), the share of its ANOMALIES flagged -1 (higher is better), and how
``offset_`` was set (``calibration_``). scikit-learn's convention, the ``contamination``
quantile of in-sample training scores, is shown beside it ("in-sample" columns) for the
same fitted model: what a threshold taken on the training scores would flag.

Results go to ``benchmarks/results/calibration-<date>-<host-kind>-<device>[-quick].{md,json}``
with the machine they ran on.

Usage::

    python benchmarks/calibration.py            # all data sets (~5 min on 2 cores)
    python benchmarks/calibration.py --quick    # reduced sizes
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402
from quality import RESULTS_DIR, SEED, load_data, make_detector  # noqa: E402

from skanomaly.base import resolve_device  # noqa: E402

DATASETS = ("shuttle", "breast_cancer", "digits", "textures_brick", "textures_grass")
DETECTORS = ("gaussian", "padim", "patchcore", "dfm", "dfkde")
CONTAMINATIONS = (0.05, 0.1, 0.2)


def evaluate(name, data, contamination, device):
    model = make_detector(name, data, device)
    final = model[-1] if hasattr(model, "steps") else model
    final.set_params(contamination=contamination)
    kind = "vectors" if name in ("gaussian", "dfkde") else "maps"
    X_train, X_test = data.train[kind], data.test[kind]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X_train)
    fit_s = time.perf_counter() - start
    flagged = model.predict(X_test) == -1
    normal = data.y_test == 1
    # scikit-learn's convention on the same model: the quantile of in-sample scores
    in_sample = np.percentile(model.score_samples(X_train), 100 * contamination)
    flagged_in_sample = model.score_samples(X_test) < in_sample
    return {
        "dataset": data.name, "detector": name, "contamination": contamination,
        "calibration": final.calibration_, "fit_s": fit_s,
        "normals_flagged": float(flagged[normal].mean()),
        "anomalies_flagged": float(flagged[~normal].mean()),
        "normals_flagged_in_sample_offset": float(flagged_in_sample[normal].mean()),
        "anomalies_flagged_in_sample_offset": float(flagged_in_sample[~normal].mean()),
        "n_test_normals": int(normal.sum()), "n_test_anomalies": int((~normal).sum()),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
    }


def markdown(rows, info) -> str:
    lines = [
        "# Flag rates of fitted thresholds on unseen data",
        "",
        f"Machine: {info['cpu_model']}, {info.get('threads')} threads, torch "
        f"{info['versions'].get('torch')}, {info['date']}.",
        "",
        "Share of the test set flagged -1 by `predict` after `fit` on the training "
        "normals; `normals` should be close to `contamination`. The in-sample columns use "
        "the same model with `offset_` at the contamination quantile of its training "
        "scores (scikit-learn's convention).",
        "",
        "| data | detector | contamination | calibration | normals | anomalies | "
        "normals (in-sample offset) | anomalies (in-sample offset) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['detector']} | {r['contamination']:.2f} | "
            f"{r['calibration']} | {r['normals_flagged']:.3f} | {r['anomalies_flagged']:.3f} "
            f"| {r['normals_flagged_in_sample_offset']:.3f} | "
            f"{r['anomalies_flagged_in_sample_offset']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    info = machine_info(device, torch.get_num_threads())
    info["date"] = datetime.date.today().isoformat()
    extractor_params = dict(weights=None, random_state=SEED, device=device)
    rows = []
    for name in args.datasets:
        data = load_data(name, args.quick, extractor_params)
        for det in args.detectors:
            for contamination in CONTAMINATIONS:
                row = evaluate(det, data, contamination, str(device))
                rows.append(row)
                print(f"{name:15s} {det:10s} {contamination:.2f} {row['calibration']:20s} "
                      f"normals {row['normals_flagged']:.3f} anomalies "
                      f"{row['anomalies_flagged']:.3f} (in-sample offset: "
                      f"{row['normals_flagged_in_sample_offset']:.3f})", flush=True)
    stem = f"calibration-{info['date']}-{host_kind(info)}-{device.type}" + (
        "-quick" if args.quick else "")
    table = markdown(rows, info)
    write_report(args.output, stem, table, {"machine": info, "rows": rows})
    print("\n" + table + f"\nwritten: {args.output / stem}.md and .json")
    return rows


if __name__ == "__main__":
    main()
