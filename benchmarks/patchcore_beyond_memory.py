"""PatchCore fitted by streaming on more training images than a one-shot fit can hold.

A one-shot ``PatchCoreDetector.fit`` holds every training feature map at once, and its
peak memory is a multiple of that input (the patches, their projection, the greedy
selection's distances). This runner measures that multiple (``factor``: peak RSS
increase of a one-shot ``fit`` over the bytes of its input, on a subset of ``M`` images
that fits), picks ``N`` images whose one-shot peak extrapolated by that factor exceeds the
machine's memory, and fits ``PatchCoreDetector(max_bank_size=..., random_state=0)
.partial_fit`` batch by batch on them instead: every batch is drawn (random crops of
scikit-image's brick texture, :func:`skanomaly.datasets.load_textures`, seeded by its
number), passed through a :class:`~skanomaly.features.FeatureExtractor` (resnet18 with
random weights, seeded) and dropped after the update, so no more than one batch of
features is ever held. Peak RSS is sampled by a thread (psutil, every 20 ms).

Quality: on the subset of ``M`` images, the covering radius (largest distance of a
training patch to its nearest bank entry, :func:`skanomaly.functional.knn_distances`, in
the patch-feature space) of the bank streamed over those images in the same batches,
divided by that of one-shot greedy ``fit`` on them (same patches, same bank size).

Results go to ``benchmarks/results/patchcore-beyond-memory-<date>-<host-kind>[-quick]
.{md,json}`` with the machine they ran on.

Usage::

    python benchmarks/patchcore_beyond_memory.py              # N chosen to exceed RAM
    python benchmarks/patchcore_beyond_memory.py --n-images 20000
    python benchmarks/patchcore_beyond_memory.py --quick      # small smoke run
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_kind, machine_info, write_report  # noqa: E402

from skanomaly import PatchCoreDetector  # noqa: E402
from skanomaly.datasets import load_textures  # noqa: E402
from skanomaly.features import FeatureExtractor  # noqa: E402
from skanomaly.functional import knn_distances  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class PeakRSS:
    """Largest resident set size of this process seen by a sampling thread (bytes)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._process = psutil.Process()

    def __enter__(self):
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def batches(extractor, n_images: int, batch_size: int, image_size: int):
    """Feature maps of ``n_images`` brick crops, ``batch_size`` at a time (float32)."""
    for index, start in enumerate(range(0, n_images, batch_size)):
        k = min(batch_size, n_images - start)
        crops = load_textures("brick", n_train=k, n_test=1, image_size=image_size,
                              random_state=index).X_train
        yield np.ascontiguousarray(extractor.transform(crops), dtype=np.float32)


def covering_radius(det: PatchCoreDetector, X: np.ndarray) -> float:
    """Largest distance of a patch of ``X`` to its nearest entry of ``det``'s bank."""
    patches = det._patches(torch.as_tensor(X))
    distances, _ = knn_distances(patches, torch.as_tensor(det.memory_bank_))
    return float(distances.max())


def make_detector(args) -> PatchCoreDetector:
    return PatchCoreDetector(max_bank_size=args.max_bank_size,
                             coreset_sampling_ratio=args.coreset_sampling_ratio,
                             random_state=0, device="cpu")


def run(args, info: dict, report) -> dict:
    extractor = FeatureExtractor("resnet18", list(args.layers), weights=None, random_state=0,
                                 batch_size=args.batch_size, device="cpu")
    extractor.fit(np.zeros((1, 3, args.image_size, args.image_size), np.float32))
    result = {}

    # 1. subset of M images that fits: one-shot fit (peak factor), streamed bank, radii
    t0 = time.perf_counter()
    X_sub = np.concatenate(list(batches(extractor, args.subset, args.batch_size,
                                        args.image_size)))
    per_image = X_sub[0].nbytes
    result["feature_shape"] = list(X_sub.shape[1:])
    result["bytes_per_image"] = per_image
    result["subset_extract_seconds"] = time.perf_counter() - t0
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        one_shot = make_detector(args).fit(X_sub)
        result["subset_one_shot_seconds"] = time.perf_counter() - t0
    # the one-shot fit holds its input (already resident) plus what fit allocates
    baseline = mem.start - X_sub.nbytes
    factor = (mem.peak - baseline) / X_sub.nbytes
    result.update(subset_images=args.subset, subset_input_bytes=X_sub.nbytes,
                  subset_one_shot_rss_before=mem.start, subset_one_shot_peak_rss=mem.peak,
                  process_baseline_rss=baseline, one_shot_peak_factor=factor)
    streamed = make_detector(args)
    t0 = time.perf_counter()
    for start in range(0, args.subset, args.batch_size):
        streamed.partial_fit(X_sub[start:start + args.batch_size])
    result["subset_streamed_seconds"] = time.perf_counter() - t0
    r_one, r_stream = covering_radius(one_shot, X_sub), covering_radius(streamed, X_sub)
    result.update(subset_bank_size=int(one_shot.memory_bank_.shape[0]),
                  subset_streamed_bank_size=int(streamed.memory_bank_.shape[0]),
                  covering_radius_one_shot=r_one, covering_radius_streamed=r_stream,
                  covering_radius_ratio=r_stream / r_one)
    del X_sub, one_shot, streamed
    print({k: v for k, v in result.items()}, flush=True)

    # 2. N images whose one-shot peak (factor x input) exceeds the machine's memory
    ram = psutil.virtual_memory().total
    n = args.n_images
    if n is None:
        n = math.ceil((args.margin * ram - baseline) / (factor * per_image))
        n = math.ceil(n / args.batch_size) * args.batch_size
    result.update(n_images=n, machine_ram_bytes=ram, one_shot_input_bytes=n * per_image,
                  one_shot_peak_extrapolated_bytes=baseline + factor * n * per_image)
    report(result)
    det = make_detector(args)
    n_batches = math.ceil(n / args.batch_size)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for i, X in enumerate(batches(extractor, n, args.batch_size, args.image_size)):
            det.partial_fit(X)
            del X
            if (i + 1) % max(1, n_batches // 20) == 0:
                print(f"  {det.n_samples_seen_} images, {time.perf_counter() - t0:.0f} s, "
                      f"peak RSS {mem.peak / 2**20:.0f} MiB", flush=True)
        seconds = time.perf_counter() - t0
    result.update(stream_rss_before=mem.start, stream_peak_rss=mem.peak,
                  stream_seconds=seconds, stream_bank_size=int(det.memory_bank_.shape[0]),
                  n_samples_seen=int(det.n_samples_seen_),
                  ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    report(result)
    return result


def markdown(r: dict, info: dict, settings: dict) -> str:
    gib = 2**30
    lines = [
        "# PatchCore streamed beyond one-shot memory",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores, "
        f"{info['memory_gib']:.1f} GiB RAM, torch {info['versions'].get('torch')}, "
        f"{info['date']} (shared: other work ran beside it, load average "
        f"{info['load_average']} before, {info.get('load_average_after')} after).",
        "",
        f"Features: brick crops of {settings['image_size']} px "
        "(`skanomaly.datasets.load_textures`, one seed per batch) through "
        f"`FeatureExtractor('resnet18', {list(settings['layers'])}, weights=None, "
        f"random_state=0)`: maps of {' x '.join(map(str, r['feature_shape']))} float32, "
        f"{r['bytes_per_image'] / 2**10:.0f} KiB per image, drawn batch by batch "
        f"({settings['batch_size']} images) and never stored. Detector: "
        f"`PatchCoreDetector(max_bank_size={settings['max_bank_size']}, "
        f"coreset_sampling_ratio={settings['coreset_sampling_ratio']}, random_state=0)`.",
        "",
        "## One-shot peak factor and covering radius (subset that fits)",
        "",
        f"- subset: the first {r['subset_images']} images, "
        f"{r['subset_input_bytes'] / 2**20:.0f} MiB of features",
        f"- one-shot `fit`: peak RSS {r['subset_one_shot_peak_rss'] / 2**20:.0f} MiB from "
        f"{r['subset_one_shot_rss_before'] / 2**20:.0f} MiB before (input held); over "
        f"the process without the input ({r['process_baseline_rss'] / 2**20:.0f} MiB) "
        f"its peak is **{r['one_shot_peak_factor']:.2f}x its input** (input included); "
        f"{r['subset_one_shot_seconds']:.1f} s",
        "- (an RSS increase can miss memory the allocator reuses, so the factor is a "
        "lower bound: N is then larger than needed, not smaller)",
        f"- streamed over the same images in the same batches: "
        f"{r['subset_streamed_seconds']:.1f} s",
        f"- covering radius of the bank over the subset's patches: one-shot "
        f"{r['covering_radius_one_shot']:.4f} ({r['subset_bank_size']} entries), streamed "
        f"{r['covering_radius_streamed']:.4f} ({r['subset_streamed_bank_size']} entries): "
        f"**ratio {r['covering_radius_ratio']:.3f}**",
    ]
    if "n_images" in r:
        lines += [
            "",
            "## Streamed fit beyond one-shot memory",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| training images N | {r['n_images']} |",
            f"| input a one-shot fit would hold | {r['one_shot_input_bytes'] / gib:.2f} GiB |",
            f"| extrapolated one-shot peak (process + {r['one_shot_peak_factor']:.2f}x input)"
            " | "
            f"{r['one_shot_peak_extrapolated_bytes'] / gib:.2f} GiB |",
            f"| machine RAM | {r['machine_ram_bytes'] / gib:.2f} GiB |",
        ]
    if "stream_peak_rss" in r:
        lines += [
            f"| streamed: RSS before the stream | {r['stream_rss_before'] / 2**20:.0f} MiB |",
            f"| streamed: peak RSS (extraction included) | "
            f"{r['stream_peak_rss'] / 2**20:.0f} MiB |",
            f"| streamed: time (extraction included) | {r['stream_seconds']:.0f} s |",
            f"| streamed: images/s | {r['n_images'] / r['stream_seconds']:.1f} |",
            f"| bank size | {r['stream_bank_size']} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=None,
                        help="training images streamed (default: enough that the "
                             "extrapolated one-shot peak exceeds RAM by --margin)")
    parser.add_argument("--margin", type=float, default=1.05,
                        help="extrapolated one-shot peak over RAM when N is chosen")
    parser.add_argument("--subset", type=int, default=256,
                        help="images of the one-shot comparison (a multiple of the batch)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--layers", nargs="+", default=("layer1", "layer2", "layer3"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-bank-size", type=int, default=500)
    parser.add_argument("--coreset-sampling-ratio", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true",
                        help="64 images, subset 32, 32 px (smoke test)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.subset, args.batch_size, args.image_size = 64, 32, 16, 32
    torch.manual_seed(0)

    info = machine_info(torch.device("cpu"), threads=torch.get_num_threads())
    info["date"] = datetime.date.today().isoformat()
    info["load_average"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                if k != "output_dir"}
    stem = (f"patchcore-beyond-memory-{info['date']}-{host_kind(info)}"
            f"{'-quick' if args.quick else ''}")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def report(result):
        info["load_average_after"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        write_report(args.output_dir, stem, markdown(result, info, settings),
                     {"machine": info, "settings": settings, "result": result}, indent=2)

    report(run(args, info, report))
    print(f"wrote {args.output_dir / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
