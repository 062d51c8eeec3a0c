"""Dask speedup: PaDiM and PatchCore ``fit`` on 2 local worker processes vs one process.

The same feature maps (drawn by ``dask.array.random`` with a seed, then persisted on the
workers so that drawing them is not timed) are fitted

- by ``fit(dask_array)`` on a :class:`distributed.LocalCluster` of 2 worker processes
  with one thread each (torch limited to 1 thread per worker), and
- by ``fit(numpy_array)`` in this process, with torch limited to 1 thread (the same
  compute as one worker) and with 2 threads (the whole machine in one process).

Times are the best of ``--repeat`` runs; a speedup is a one-process time over the
2-worker time. Each case also checks what the fits compute: PaDiM's covariances against
the one-process fit (largest relative difference), PatchCore's bank size and its covering
radius (the largest distance of a training patch to its nearest bank entry, over a
random subset of the patches) against the one-shot bank's.

Results go to ``benchmarks/results/dask-<date>-<host-kind>.{md,json}`` with the machine
they ran on. Usage::

    python benchmarks/dask_scaling.py            # a few minutes on 2 cores
    python benchmarks/dask_scaling.py --quick    # tiny sizes (smoke run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0

#: (detector, n_samples, (C, H, W), chunk rows, parameters); --quick divides the sizes
CASES = [
    ("padim", 800, (100, 24, 24), 100, dict(n_features=80)),
    ("patchcore", 240, (64, 16, 16), 30, dict()),
]


def _set_threads(n):
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _data(n, shape, chunk, dask_array):
    rng = dask_array.random.default_rng(SEED)
    mix = np.random.default_rng(SEED).normal(size=(shape[0], shape[0])) / np.sqrt(shape[0])
    x = rng.standard_normal((n, *shape), chunks=(chunk, *shape), dtype=np.float32)
    return dask_array.einsum("nchw,cd->ndhw", x, mix.astype(np.float32)) + 1.0


def _best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def _covering_radius(patches, bank, rows):
    from skanomaly.functional import KNNIndex

    dist, _ = KNNIndex(torch.as_tensor(bank)).search(torch.as_tensor(patches[rows]), 1)
    return float(dist.max())


def run_case(name, n, shape, chunk, params, client, repeat):
    import dask.array as da

    from skanomaly import PaDiMDetector, PatchCoreDetector

    cls = {"padim": PaDiMDetector, "patchcore": PatchCoreDetector}[name]

    def make():
        return cls(random_state=SEED, device="cpu", **params)

    X = client.persist(_data(n, shape, chunk, da))
    X_np = X.compute()
    row = {"detector": name, "n_samples": n, "sample_shape": list(shape), "chunk": chunk,
           "n_blocks": len(X.chunks[0]), "params": params,
           "data_mb": round(X_np.nbytes / 1e6, 1)}
    make().fit(X[: 2 * chunk])  # warm-up: the workers import skanomaly, first kernels
    make().fit(X_np[: 2 * chunk])
    row["dask_s"], on_dask = _best(lambda: make().fit(X), repeat)
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            row[f"one_process_{threads}t_s"], one = _best(lambda: make().fit(X_np), repeat)
        finally:
            torch.set_num_threads(previous)
        row[f"speedup_vs_{threads}t"] = row[f"one_process_{threads}t_s"] / row["dask_s"]
    row["calibration"] = on_dask.calibration_
    if name == "padim":
        diff = np.abs(on_dask.covariance_ - one.covariance_).max()
        row["max_rel_diff_covariance"] = float(diff / np.abs(one.covariance_).max())
    else:
        patches = one._patches(torch.as_tensor(X_np)).numpy()
        rows = np.random.default_rng(SEED).choice(len(patches), min(len(patches), 20000),
                                                  replace=False)
        row["bank_dask"], row["bank_one_process"] = (len(on_dask.memory_bank_),
                                                     len(one.memory_bank_))
        r_dask = _covering_radius(patches, on_dask.memory_bank_, rows)
        r_one = _covering_radius(patches, one.memory_bank_, rows)
        row["covering_radius_ratio"] = r_dask / r_one
    return row


def markdown(rows, info) -> str:
    lines = [
        "# Dask speedup: fit on 2 local worker processes vs one process",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} logical cores "
        f"({info.get('note', '')}), torch {info['versions']['torch']}, dask "
        f"{info['dask']}, {info['date']}.",
        "",
        "Same data (persisted on the workers; the one-process fits get the numpy array). "
        "2 workers x 1 thread (torch 1 thread each) against one process with torch at 1 "
        "and at 2 threads; best of the repeats. PaDiM: largest relative difference of "
        "the covariances to the one-process fit. PatchCore: bank sizes and the covering "
        "radius of the dask bank over that of the one-shot bank (20,000 training patches).",
        "",
        "| detector | N | sample shape | blocks | data (MB) | dask 2 workers (s) | "
        "1 process, 1 thread (s) | 1 process, 2 threads (s) | speedup vs 1 thread | "
        "speedup vs 2 threads | calibration | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["detector"] == "padim":
            check = f"covariance rel. diff {r['max_rel_diff_covariance']:.1e}"
        else:
            check = (f"bank {r['bank_dask']} vs {r['bank_one_process']}, covering radius "
                     f"x{r['covering_radius_ratio']:.3f}")
        lines.append(
            f"| {r['detector']} | {r['n_samples']} | {tuple(r['sample_shape'])} | "
            f"{r['n_blocks']} | {r['data_mb']} | {r['dask_s']:.2f} | "
            f"{r['one_process_1t_s']:.2f} | {r['one_process_2t_s']:.2f} | "
            f"{r['speedup_vs_1t']:.2f} | {r['speedup_vs_2t']:.2f} | {r['calibration']} | "
            f"{check} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--note", default="", help="e.g. the machine's load")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    parser.add_argument("--detectors", nargs="+", choices=[c[0] for c in CASES],
                        default=[c[0] for c in CASES],
                        help="run these cases; the other rows of today's file are kept")
    args = parser.parse_args(argv)

    import dask
    import distributed

    info = machine_info(torch.device("cpu"), torch.get_num_threads())
    info["date"] = datetime.date.today().isoformat()
    info["dask"] = dask.__version__
    info["note"] = args.note
    rows = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        client.run(_set_threads, 1)
        for name, n, shape, chunk, params in CASES:
            if name not in args.detectors:
                continue
            if args.quick:
                n, chunk, shape = n // 8, chunk // 4, (shape[0] // 4, *shape[1:])
                params = {k: min(v, shape[0]) for k, v in params.items()}
            row = run_case(name, n, shape, chunk, params, client,
                           1 if args.quick else args.repeat)
            rows.append(row)
            print(json.dumps(row), flush=True)
    stem = f"dask-{info['date']}-{host_kind(info)}" + ("-quick" if args.quick else "")
    args.output.mkdir(parents=True, exist_ok=True)
    earlier = args.output / f"{stem}.json"
    if earlier.exists():  # rows of the cases not run this time
        kept = [r for r in json.loads(earlier.read_text())["rows"]
                if r["detector"] not in args.detectors]
        order = [c[0] for c in CASES]
        rows = sorted(kept + rows, key=lambda r: order.index(r["detector"]))
    table = markdown(rows, info)
    write_report(args.output, stem, table, {"machine": info, "rows": rows})
    print("\n" + table + f"\nwritten: {args.output / stem}.md and .json")
    return rows


if __name__ == "__main__":
    main()
