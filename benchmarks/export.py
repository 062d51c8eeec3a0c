"""Exported models: parity, file sizes and peak memory of export and inference.

Every skanomaly detector is fitted on the bundled brick textures
(:func:`skanomaly.datasets.load_textures`, seed 0) behind a randomly initialised
resnet18 (layers 1-3, the features of ``benchmarks/quality.py``'s random column), as a
:class:`skanomaly.AnomalyPipeline` of images -> scores (and maps); GaussianDetector,
whose input is one vector per image, is fitted on the features averaged over positions
and exported alone. Each model is then

- turned into a torch module by :func:`skanomaly.export.to_torch` (float64 and float32
  detector statistics) and exported to ONNX (opset 17) and TorchScript, float64;
- run: the module, the ONNX file under onnxruntime (CPUExecutionProvider) and the
  TorchScript file under ``torch.jit.load``, on the test images at a batch size other
  than the export example's, against the estimator's ``-score_samples`` and
  ``anomaly_map`` at the image size: the largest error relative to the largest
  magnitude of the reference;
- measured, each step in a fresh subprocess: the peak resident memory above the
  process's memory just before the step (psutil, sampled every 5 ms), for the export
  (both files) and for loading and running each file on the test batch.

Results go to ``benchmarks/results/export-<date>-<host-kind>[-quick].{md,json}``.

Usage::

    python benchmarks/export.py           # 128 px images (~3 min on 2 cores)
    python benchmarks/export.py --quick   # 64 px, fewer images
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DETECTORS = ("gaussian", "padim", "patchcore", "dfm", "dfkde")
SPATIAL = ("padim", "patchcore", "dfm")
SEED = 0


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident memory above the start, sampled every ``interval`` s in a thread."""

    def __init__(self, interval=0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.start = _rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def make_models(image_size: int, n_train: int, n_test: int):
    """Fitted models per detector name, the test input of each and the references."""
    import skanomaly
    from skanomaly.datasets import load_textures
    from skanomaly.features import FeatureExtractor

    data = load_textures("brick", n_train=n_train, n_test=n_test, image_size=image_size,
                         random_state=SEED)
    fe = FeatureExtractor("resnet18", ("layer1", "layer2", "layer3"), random_state=SEED,
                          device="cpu").fit(data.X_train)
    Z = fe.transform(data.X_train)
    detectors = {
        "padim": skanomaly.PaDiMDetector(n_features=100, random_state=SEED, device="cpu"),
        "patchcore": skanomaly.PatchCoreDetector(random_state=SEED, device="cpu"),
        "dfm": skanomaly.DFMDetector(device="cpu"),
        "dfkde": skanomaly.DFKDEDetector(random_state=SEED, device="cpu"),
    }
    models, inputs = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, det in detectors.items():
            models[name] = skanomaly.make_anomaly_pipeline(fe, det.fit(Z))
            inputs[name] = data.X_test
        gauss = skanomaly.GaussianDetector(device="cpu").fit(Z.mean(axis=(2, 3)))
    models["gaussian"] = gauss
    inputs["gaussian"] = fe.transform(data.X_test).mean(axis=(2, 3)).astype(np.float32)
    return models, inputs


def reference(name, model, X):
    scores = -model.score_samples(X)
    return (scores, model.anomaly_map(X)) if name in SPATIAL else (scores, None)


def _outputs(result):
    if not isinstance(result, (tuple, list)):
        result = [result]
    return [np.asarray(r.numpy() if isinstance(r, torch.Tensor) else r, np.float64)
            for r in result]


def _errors(result, ref):
    got = _outputs(result)
    rel = [float(np.abs(got[0] - ref[0]).max() / np.abs(ref[0]).max())]
    if ref[1] is not None:
        rel.append(float(np.abs(got[1] - ref[1]).max() / np.abs(ref[1]).max()))
    return max(rel)


# ----------------------------------------------------------------- child processes
def _child(phase: str, model_path: str, input_path: str, out_dir: str) -> dict:
    """One measured step in this (fresh) process; the result as a dict."""
    model = joblib.load(model_path) if phase == "export" else None
    X = np.load(input_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if phase == "export":
            from skanomaly.export import export

            with PeakRSS() as peak:
                start = time.perf_counter()
                export(model, os.path.join(out_dir, "model.onnx"), X[:2])
                export(model, os.path.join(out_dir, "model.pt"), X[:2])
                seconds = time.perf_counter() - start
            return {"export_peak_mib": peak.delta_mib, "export_s": seconds}
        if phase == "onnx":
            import onnxruntime as ort

            with PeakRSS() as peak:
                session = ort.InferenceSession(os.path.join(out_dir, "model.onnx"),
                                               providers=["CPUExecutionProvider"])
                result = session.run(None, {"input": X})
        else:
            with PeakRSS() as peak:
                module = torch.jit.load(os.path.join(out_dir, "model.pt"))
                with torch.no_grad():
                    result = module(torch.from_numpy(X))
        out = os.path.join(out_dir, f"{phase}-outputs.npz")
        np.savez(out, *_outputs(result))
        return {f"{phase}_peak_mib": peak.delta_mib, "outputs": out}


def _run_child(phase, model_path, input_path, out_dir) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, model_path, input_path, out_dir]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name, model, X, work: Path) -> dict:
    from skanomaly.export import to_torch

    ref = reference(name, model, X)
    row = {"detector": name, "n_test": int(len(X)), "input_shape": list(X.shape[1:])}
    final = model[-1] if hasattr(model, "steps") else model
    if name == "patchcore":
        row["bank"] = list(final.memory_bank_.shape)
        row["bank_dtype"] = str(final.memory_bank_.dtype)
        row["bank_mib"] = final.memory_bank_.nbytes / 2**20
    for dtype in ("float64", "float32"):
        with torch.no_grad():
            result = to_torch(model, dtype=dtype)(torch.from_numpy(X))
        row[f"to_torch_{dtype}_rel_error"] = _errors(result, ref)
    folder = work / name
    folder.mkdir()
    model_path, input_path = str(folder / "model.joblib"), str(folder / "input.npy")
    joblib.dump(model, model_path)
    np.save(input_path, X)
    row.update(_run_child("export", model_path, input_path, str(folder)))
    for phase in ("onnx", "torchscript"):
        info = _run_child(phase, model_path, input_path, str(folder))
        with np.load(info.pop("outputs")) as saved:
            result = [saved[k] for k in sorted(saved.files)]
        row[f"{phase}_rel_error"] = _errors(result, ref)
        row.update(info)
    row["onnx_mib"] = (folder / "model.onnx").stat().st_size / 2**20
    row["torchscript_mib"] = (folder / "model.pt").stat().st_size / 2**20
    # float16 storage (weights cast back to float32 in the graph), measured here
    import onnxruntime as ort

    from skanomaly.export import export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, folder / "half.onnx", X[:2], dtype="float16")
    session = ort.InferenceSession(str(folder / "half.onnx"),
                                   providers=["CPUExecutionProvider"])
    row["onnx_float16_rel_error"] = _errors(session.run(None, {"input": X}), ref)
    row["onnx_float16_mib"] = (folder / "half.onnx").stat().st_size / 2**20
    return row


def bank_scaling(work: Path, sizes, dim=64, grid=8, n_query=16) -> list[dict]:
    """PatchCore alone (features in) with banks of ``sizes`` rows (every training patch
    kept): file size and onnxruntime / TorchScript run peak memory on ``n_query`` images
    of ``grid`` x ``grid`` positions, against the bank's size."""
    import skanomaly

    rng = np.random.default_rng(SEED)
    rows = []
    for n_bank in sizes:
        train = rng.normal(size=(n_bank // grid**2, dim, grid, grid)).astype(np.float32)
        query = rng.normal(size=(n_query, dim, grid, grid)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det = skanomaly.PatchCoreDetector(coreset_sampling_ratio=1.0, random_state=SEED,
                                              device="cpu").fit(train)
        folder = work / f"bank-{n_bank}"
        folder.mkdir()
        model_path, input_path = str(folder / "model.joblib"), str(folder / "input.npy")
        joblib.dump(det, model_path)
        np.save(input_path, query)
        row = {"bank_rows": int(det.memory_bank_.shape[0]), "dim": dim,
               "queries": n_query * grid**2,
               "bank_mib": det.memory_bank_.nbytes / 2**20}
        row.update(_run_child("export", model_path, input_path, str(folder)))
        ref = (-det.score_samples(query), det.anomaly_map(query))
        for phase in ("onnx", "torchscript"):
            info = _run_child(phase, model_path, input_path, str(folder))
            with np.load(info.pop("outputs")) as saved:
                row[f"{phase}_rel_error"] = _errors([saved[k] for k in sorted(saved.files)],
                                                    ref)
            row.update(info)
        row["onnx_mib"] = (folder / "model.onnx").stat().st_size / 2**20
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows, info, settings, bank_rows=()) -> str:
    lines = [
        "# Exported models: parity, file sizes, peak memory",
        "",
        f"Machine: {info['cpu_model']}, {info.get('threads')} threads, torch "
        f"{info['versions'].get('torch')}, onnxruntime {settings['onnxruntime']}, "
        f"{info['date']}.",
        "",
        f"Brick textures, {settings['image_size']} px, {settings['n_train']} training and "
        f"{settings['n_test']} test images; random resnet18, layers 1-3 "
        f"({settings['feature_shape']} features). GaussianDetector: on the features "
        "averaged over positions (the others: the whole pipeline, images in). Errors: "
        "largest |exported - estimator| over the largest |estimator| of scores and "
        "maps (at the image size), on the test batch (export example: 2 images). "
        "Files in float64 detector statistics; float32 backbone and map blur; f16: "
        "`dtype=\"float16\"` (weights and float32 statistics stored in float16). Peak "
        "memory: resident memory above the fresh process's just before the step "
        "(export: both files; onnx/torchscript: load and run the test batch).",
        "",
        "| detector | to_torch f64 | to_torch f32 | ONNX | TorchScript | ONNX f16 | ONNX MiB "
        "| .pt MiB | ONNX f16 MiB | export s | export peak MiB | ORT run peak MiB | "
        "TorchScript run peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['detector']} | {r['to_torch_float64_rel_error']:.1e} | "
            f"{r['to_torch_float32_rel_error']:.1e} | {r['onnx_rel_error']:.1e} | "
            f"{r['torchscript_rel_error']:.1e} | {r['onnx_float16_rel_error']:.1e} | "
            f"{r['onnx_mib']:.2f} | {r['torchscript_mib']:.2f} | {r['onnx_float16_mib']:.2f} | "
            f"{r['export_s']:.1f} | {r['export_peak_mib']:.0f} | "
            f"{r['onnx_peak_mib']:.0f} | {r['torchscript_peak_mib']:.0f} |")
    pc = next((r for r in rows if r["detector"] == "patchcore"), None)
    if pc is not None:
        lines += ["", f"PatchCore's memory bank: {pc['bank'][0]} x {pc['bank'][1]} "
                      f"{pc['bank_dtype']} ({pc['bank_mib']:.2f} MiB as fitted). Its graph "
                      "scans the bank in chunks (KNNIndex.forward): run memory grows with "
                      "the queries (batch x positions) times the chunk, not with the bank."]
    if bank_rows:
        lines += [
            "", "## PatchCore: file and run memory against the bank", "",
            "PatchCore alone (features in: random normal features, every training patch "
            "in the bank, `coreset_sampling_ratio=1.0`), float64 statistics; run on "
            f"{bank_rows[0]['queries']} query patches ({settings['bank_query_images']} "
            "images). Queries x bank distances in float64 would be "
            "`queries * bank_rows * 8` bytes.", "",
            "| bank rows x dim | bank MiB (float32) | queries x bank f64 MiB | ONNX MiB | "
            "ONNX error | TorchScript error | export peak MiB | ORT run peak MiB | "
            "TorchScript run peak MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
        for r in bank_rows:
            full = r["queries"] * r["bank_rows"] * 8 / 2**20
            lines.append(
                f"| {r['bank_rows']} x {r['dim']} | {r['bank_mib']:.1f} | {full:.0f} | "
                f"{r['onnx_mib']:.1f} | {r['onnx_rel_error']:.1e} | "
                f"{r['torchscript_rel_error']:.1e} | {r['export_peak_mib']:.0f} | "
                f"{r['onnx_peak_mib']:.0f} | {r['torchscript_peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 px, fewer images")
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    parser.add_argument("--bank-sizes", nargs="*", type=int, default=None,
                        help="PatchCore bank rows of the bank-scaling table (none: skip); "
                             "default 4096 16384 65536 (--quick: 4096 16384)")
    args = parser.parse_args(argv)
    import onnxruntime

    settings = dict(image_size=64 if args.quick else 128, n_train=20 if args.quick else 60,
                    n_test=6 if args.quick else 20, onnxruntime=onnxruntime.__version__)
    info = machine_info(torch.device("cpu"), torch.get_num_threads())
    info["date"] = datetime.date.today().isoformat()
    models, inputs = make_models(settings["image_size"], settings["n_train"],
                                 settings["n_test"])
    settings["feature_shape"] = " x ".join(map(str, models["padim"][-1].input_shape_))
    rows = []
    sizes = args.bank_sizes
    if sizes is None:
        sizes = [4096, 16384] if args.quick else [4096, 16384, 65536]
    settings["bank_query_images"] = 16
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.detectors:
            row = measure(name, models[name], inputs[name], Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
        bank_rows = bank_scaling(Path(tmp), sizes) if sizes else []
    stem = f"export-{info['date']}-{host_kind(info)}" + ("-quick" if args.quick else "")
    table = markdown(rows, info, settings, bank_rows)
    write_report(args.output, stem, table, {"machine": info, "settings": settings,
                                            "rows": rows, "bank_scaling": bank_rows})
    print("\n" + table + f"\nwritten: {args.output / stem}.md and .json")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:6])))
    else:
        main()
