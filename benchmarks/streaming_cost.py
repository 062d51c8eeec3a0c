"""Time of a streamed fit (``partial_fit`` over batches) against a one-shot ``fit``.

For every detector, the same feature arrays are fitted once with ``fit(X)`` and once
with ``partial_fit`` over consecutive batches of ``X``; each side then scores one sample
(``score_samples(X[:1])``), so that work a detector defers to its first scoring
(factors, threshold) is counted. The ratio streamed / one-shot is the figure of merit
(target: at most 1.5x); both sides run in the same process, one after the other, so the
ratio holds under other load even when the seconds do not.

Data: seeded standard normal features shaped as the pipeline gives them (float32 maps
for the spatial detectors, float64 vectors for the others); shapes and batch sizes per
case below (``--quick`` for a smoke run at small sizes, ``--large`` adds PatchCore on
100 maps of 448 x 32 x 32 in batches of 25, the case of issue 16).

Results go to ``benchmarks/results/streaming_cost-<date>-<host-kind>[-quick].{md,json}``.

Usage::

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/streaming_cost.py
    python benchmarks/streaming_cost.py --quick --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402

from skanomaly import (  # noqa: E402
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: name -> (detector factory, data shape, dtype, batch size)
CASES = {
    "Gaussian": (lambda: GaussianDetector(device="cpu"), (8192, 128), np.float64, 512),
    "PaDiM": (lambda: PaDiMDetector(n_features=100, random_state=0, device="cpu"),
              (256, 100, 16, 16), np.float32, 32),
    "DFM": (lambda: DFMDetector(device="cpu"), (256, 448, 16, 16), np.float32, 32),
    "DFKDE": (lambda: DFKDEDetector(random_state=0, device="cpu"), (4096, 256), np.float64,
              256),
    "PatchCore": (lambda: PatchCoreDetector(random_state=0, device="cpu"),
                  (256, 384, 8, 8), np.float32, 32),
    "PatchCore (max_bank_size=1024)": (
        lambda: PatchCoreDetector(max_bank_size=1024, random_state=0, device="cpu"),
        (256, 384, 8, 8), np.float32, 32),
}
QUICK = {
    "Gaussian": (1024, 32), "PaDiM": (64, 100, 8, 8), "DFM": (64, 64, 8, 8),
    "DFKDE": (512, 32), "PatchCore": (64, 64, 8, 8), "PatchCore (max_bank_size=1024)":
    (64, 64, 8, 8),
}
LARGE = {"PatchCore, 100 x 448 x 32 x 32": (
    lambda: PatchCoreDetector(random_state=0, device="cpu"), (100, 448, 32, 32),
    np.float32, 25)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_case(make, X: np.ndarray, batch: int) -> dict:
    """Seconds of ``fit`` and of streaming (both followed by one scoring), and the scores."""
    query = X[:1]

    def one_shot():
        det = make().fit(X)
        return det, det.score_samples(query)

    def streamed():
        det = make()
        for start in range(0, X.shape[0], batch):
            det.partial_fit(X[start:start + batch])
        return det, det.score_samples(query)

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        one_shot()
        out["one_shot_s"] = time.perf_counter() - start
        start = time.perf_counter()
        streamed()
        out["streamed_s"] = time.perf_counter() - start
    out["ratio"] = out["streamed_s"] / out["one_shot_s"]
    return out


def run(cases: dict, report=lambda rows: None) -> list[dict]:
    rows = []
    for name, (make, shape, dtype, batch) in cases.items():
        X = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        row = {"detector": name, "shape": list(shape), "dtype": np.dtype(dtype).name,
               "batch": batch, "n_batches": -(-shape[0] // batch), **time_case(make, X, batch)}
        rows.append(row)
        print(row, flush=True)
        report(rows)
    return rows


def markdown(rows, info) -> str:
    lines = [
        "# Streamed fit (`partial_fit` over batches) against a one-shot `fit`",
        "",
        f"Machine: {info['cpu_model']}, {info['threads']} thread(s), torch "
        f"{info['versions'].get('torch')}, {info['date']}, commit {info.get('commit')}.",
        "",
        "Each side ends with one `score_samples` of one sample (deferred work counted). "
        "Seeded standard normal features.",
        "",
        "| detector | data (N, ...) | dtype | batch | batches | one-shot (s) | streamed (s) "
        "| ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['detector']} | {' x '.join(map(str, r['shape']))} | {r['dtype']} "
                     f"| {r['batch']} | {r['n_batches']} | {r['one_shot_s']:.2f} | "
                     f"{r['streamed_s']:.2f} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--large", action="store_true",
                        help="add PatchCore on 100 maps of 448 x 32 x 32 (minutes)")
    parser.add_argument("--only", nargs="*", help="detectors to run (names as in the table)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: as torch starts)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default="", help="suffix of the results file stem")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = dict(CASES)
    if args.quick:
        cases = {k: (m, QUICK[k], d, min(b, QUICK[k][0] // 4)) for k, (m, _, d, b)
                 in cases.items()}
    if args.large:
        cases.update(LARGE)
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    info = machine_info(torch.device("cpu"), threads=torch.get_num_threads())
    info["date"] = datetime.date.today().isoformat()
    info["load_average"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        import subprocess
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # pragma: no cover - no git
        info["commit"] = None
    stem = (f"streaming_cost-{info['date']}-{host_kind(info)}{'-quick' if args.quick else ''}"
            f"{args.tag}")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def report(rows):
        write_report(args.output_dir, stem, markdown(rows, info),
                     {"machine": info, "rows": rows}, indent=2)

    run(cases, report)
    print(f"wrote {args.output_dir / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
