"""Peak memory of ``skanomaly fit`` (streamed) against the number of training images.

``skanomaly fit`` reads a folder, extracts features and updates the detector batch by
batch (:func:`skanomaly.streaming.partial_fit_images`), so its peak resident memory
should not grow with the number of images. This runner writes two folders of normal
images (crops of scikit-image's bundled brick texture, :func:`skanomaly.datasets.
load_textures`, as PNG files), runs ``python -m skanomaly fit`` on each in a fresh
process for PaDiM and PatchCore, and records the process's peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper that runs only it), the wall
time and the size of the model file. As the peer, the same pipeline is fitted one-shot
(every image read into memory, then ``Pipeline.fit``) in a fresh process: the way the
main job fits, whose memory grows with the images (``--no-one-shot`` skips it).

Results go to ``benchmarks/results/streaming-<date>-<host-kind>[-quick].{md,json}`` with
the machine they ran on.

Usage::

    python benchmarks/streaming.py                          # 500 and 2,000 images, 224 px
    python benchmarks/streaming.py --image-size 64          # the same at 64 px
    python benchmarks/streaming.py --quick                  # 40 and 120 images at 32 px
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402

from skanomaly.base import resolve_device  # noqa: E402
from skanomaly.datasets import load_textures  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DETECTORS = ("padim", "patchcore")
#: runs a command and prints its peak RSS (KiB on Linux), wall time and exit status
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"status": status, "seconds": time.perf_counter() - start,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""
#: the one-shot peer: every image in memory, then Pipeline.fit, with the CLI's settings
_ONE_SHOT = """
import sys
import numpy as np
from sklearn.pipeline import make_pipeline
from skanomaly import PaDiMDetector, PatchCoreDetector
from skanomaly.cli import default_layers, resolve_weights, DEFAULT_BACKBONE
from skanomaly.features import FeatureExtractor
from skanomaly.streaming import find_images, read_image
folder, detector, size, batch_size, bank = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
X = np.stack([read_image(p, size) for p in find_images(folder)])
features = FeatureExtractor(DEFAULT_BACKBONE, default_layers(DEFAULT_BACKBONE, detector),
                            weights=resolve_weights(DEFAULT_BACKBONE, None), random_state=0,
                            batch_size=batch_size, device="cpu")
if detector == "padim":
    det = PaDiMDetector(n_features=100, random_state=0, device="cpu")
else:
    det = PatchCoreDetector(max_bank_size=bank, random_state=0, device="cpu")
make_pipeline(features, det).fit(X)
"""


def write_images(folder: Path, n: int, size: int) -> None:
    """``n`` normal brick crops of ``size`` px as PNG files, drawn 100 at a time."""
    folder.mkdir(parents=True)
    for chunk, start in enumerate(range(0, n, 100)):
        k = min(100, n - start)
        crops = load_textures("brick", n_train=k, n_test=1, image_size=size,
                              random_state=chunk).X_train
        for i, crop in enumerate(crops):
            pixels = np.round(crop.transpose(1, 2, 0) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{start + i:05d}.png")


def measure(command: list[str]) -> dict:
    """Peak RSS (MiB), wall time and status of ``command`` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"status": result["status"], "seconds": result["seconds"],
            "peak_rss_mib": result["peak_rss_kib"] / 1024}


def run(sizes, image_size: int, batch_size: int, bank: int, one_shot: bool,
        workdir: Path, report=lambda rows: None) -> list[dict]:
    """Every measurement; ``report(rows)`` after each (results survive an interruption)."""
    rows = []
    for n in sizes:
        folder = workdir / f"images-{n}"
        write_images(folder, n, image_size)
        for detector in DETECTORS:
            model = workdir / f"{detector}-{n}.skanomaly"
            streamed = measure([sys.executable, "-m", "skanomaly", "fit", str(folder),
                                "--model", str(model), "--detector", detector,
                                "--image-size", str(image_size), "--batch-size",
                                str(batch_size), "--max-bank-size", str(bank),
                                "--device", "cpu", "--quiet"])
            rows.append({"detector": detector, "mode": "streamed (skanomaly fit)",
                         "n_images": n, **streamed,
                         "model_mib": model.stat().st_size / 2**20 if model.exists() else None})
            model.unlink(missing_ok=True)
            print(rows[-1], flush=True)
            report(rows)
            if one_shot:
                script = workdir / "one_shot.py"
                script.write_text(_ONE_SHOT)
                peer = measure([sys.executable, str(script), str(folder), detector,
                                str(image_size), str(batch_size), str(bank)])
                rows.append({"detector": detector, "mode": "one-shot (Pipeline.fit)",
                             "n_images": n, **peer, "model_mib": None})
                print(rows[-1], flush=True)
                report(rows)
    return rows


def markdown(rows, info, settings) -> str:
    lines = [
        "# Peak memory of `skanomaly fit` (streamed) against the number of images",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch "
        f"{info['versions'].get('torch')}, {info['date']} (shared: other work ran "
        f"beside it, load average {info['load_average']} before, "
        f"{info.get('load_average_after')} after).",
        "",
        f"Normal brick crops of {settings['image_size']} px as PNG files; backbone "
        "timm/tf_efficientnet_lite0 with its packaged ImageNet weights, the CLI's layers "
        f"per detector; batches of {settings['batch_size']} images; PatchCore with "
        f"--max-bank-size {settings['max_bank_size']}. Each run is a fresh process; peak "
        "RSS is its maximum resident set size. The one-shot rows fit the same pipeline on "
        "every image read into memory at once (`Pipeline.fit`), as the main job does.",
        "",
        "| detector | mode | images | peak RSS (MiB) | time (s) | images/s | model file (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = "" if r["model_mib"] is None else f"{r['model_mib']:.1f}"
        status = "" if r["status"] == 0 else f" (exit {r['status']})"
        lines.append(
            f"| {r['detector']} | {r['mode']}{status} | {r['n_images']} | "
            f"{r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | "
            f"{r['n_images'] / r['seconds']:.1f} | {model} |")
    by = {(r["detector"], r["mode"], r["n_images"]): r for r in rows}
    small, large = settings["sizes"]
    lines += ["", f"Peak RSS at {large} images over that at {small}:", ""]
    for detector in DETECTORS:
        for mode in ("streamed (skanomaly fit)", "one-shot (Pipeline.fit)"):
            a, b = by.get((detector, mode, small)), by.get((detector, mode, large))
            if a and b:
                lines.append(f"- {detector}, {mode}: {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x "
                             f"({a['peak_rss_mib']:.0f} -> {b['peak_rss_mib']:.0f} MiB)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=(500, 2000),
                        metavar=("SMALL", "LARGE"), help="numbers of images (default: 500 2000)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-bank-size", type=int, default=16384)
    parser.add_argument("--no-one-shot", action="store_true",
                        help="skip the one-shot peer")
    parser.add_argument("--quick", action="store_true",
                        help="40 and 120 images at 32 px (smoke test)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.image_size = (40, 120), 32
    import os

    info = machine_info(resolve_device("cpu"), threads=os.cpu_count())
    info["date"] = datetime.date.today().isoformat()
    info["load_average"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    settings = {"sizes": list(args.sizes), "image_size": args.image_size,
                "batch_size": args.batch_size, "max_bank_size": args.max_bank_size,
                "one_shot": not args.no_one_shot}
    stem = f"streaming-{info['date']}-{host_kind(info)}{'-quick' if args.quick else ''}"
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def report(rows):
        info["load_average_after"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        write_report(args.output_dir, stem, markdown(rows, info, settings),
                     {"machine": info, "settings": settings, "rows": rows}, indent=2)

    with tempfile.TemporaryDirectory() as tmp:
        run(args.sizes, args.image_size, args.batch_size, args.max_bank_size,
            not args.no_one_shot, Path(tmp), report)
    print(f"wrote {args.output_dir / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
