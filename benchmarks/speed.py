"""Speed of skanomaly's kernels and detectors, timed side by side with named peers.

Every case times skanomaly and its peer in the same run (best of ``--repeat`` runs
after a warm-up), prints the ratio peer time / skanomaly time and the fraction of
the machine's peak (GEMM GFLOP/s or read bandwidth, measured at the start and the
end of the same run, the better kept), checks that both compute the same thing,
and writes a JSON file and a Markdown table to
``benchmarks/results/<date>-<host-kind>-<device>.{json,md}``.

A peer that is not installed gets "not installed" in its column; skanomaly is still
timed. Peers: numpy, scipy, scikit-learn, faiss-cpu and anomalib 2.x (the ``bench``
extra). See benchmarks/README.md for the cases, the targets and how to run them.

Usage::

    python benchmarks/speed.py                 # the full table (about 27 min on 2 cores)
    python benchmarks/speed.py --quick         # sizes 10-100x smaller
    python benchmarks/speed.py --only kde --only knn --repeat 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os

if __name__ == "__main__":  # tqdm reads this when first imported: anomalib's progress bars
    os.environ.setdefault("TQDM_DISABLE", "1")

import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import (  # noqa: E402
    best_time,
    errors_section,
    format_seconds,
    host_kind,
    machine_info,
    measure_peaks,
    write_report,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one preset (``full`` follows DESIGN.md's anchors table)."""

    cov: tuple[int, int]  # observations, variables (float64)
    padim_n: int  # training images
    padim_hw: int  # side of the feature map
    padim_c: tuple[int, int]  # channels: full covariance path, Woodbury path (> padim_n)
    padim_score_n: int  # images scored
    stream_n: tuple[int, int]  # images streamed through partial_fit
    stream_batch: int
    kcenter: tuple[int, int]  # patches, channels (float32)
    kcenter_ratios: tuple[float, float]
    kcenter_budget: float  # seconds allowed for one skanomaly k-center run
    kde: tuple[int, int, int]  # training points, features, queries
    kde_tail: int  # far-tail queries
    knn: tuple[int, int, int]  # queries, bank, channels (float32)
    gemm: int  # side of the peak-GEMM matrices
    bandwidth_bytes: int  # array summed for the read bandwidth


PRESETS = {
    "full": Sizes(
        cov=(40_000, 512), padim_n=200, padim_hw=56, padim_c=(100, 550), padim_score_n=32,
        stream_n=(100, 400), stream_batch=20, kcenter=(219_520, 1536),
        kcenter_ratios=(0.01, 0.1), kcenter_budget=900.0, kde=(40_000, 16, 3_136),
        kde_tail=256, knn=(3_136, 21_952, 1536), gemm=4096, bandwidth_bytes=2**30,
    ),
    "quick": Sizes(
        cov=(10_000, 256), padim_n=120, padim_hw=28, padim_c=(100, 200), padim_score_n=16,
        stream_n=(40, 160), stream_batch=20, kcenter=(21_952, 1536),
        kcenter_ratios=(0.01, 0.1), kcenter_budget=120.0, kde=(10_000, 16, 784),
        kde_tail=64, knn=(784, 5_488, 1536), gemm=2048, bandwidth_bytes=2**28,
    ),
    "smoke": Sizes(
        cov=(300, 16), padim_n=6, padim_hw=4, padim_c=(5, 12), padim_score_n=3,
        stream_n=(4, 8), stream_batch=2, kcenter=(600, 24), kcenter_ratios=(0.02, 0.1),
        kcenter_budget=10.0, kde=(300, 3, 40), kde_tail=8, knn=(40, 300, 24), gemm=128,
        bandwidth_bytes=2**20,
    ),
}


def _import(name: str):
    """The module ``name``, or None when it (or something it needs) is not installed."""
    try:
        with warnings.catch_warnings():  # anomalib warns about its deprecated modules
            warnings.simplefilter("ignore")
            return __import__(name, fromlist=["_"])
    except ImportError:
        return None


@dataclass
class Context:
    """What every case needs: device, sizes, repeat count, seed, threads and budgets."""

    device: torch.device
    sizes: Sizes
    repeat: int
    seed: int
    threads: int
    peer_budget: float
    memory: bool

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator: every case draws reproducible data of its own."""
        return torch.Generator().manual_seed(self.seed + offset)

    def time(self, fn: Callable[[], object], device: torch.device | None = None):
        """Best time of ``fn`` after a warm-up (see ``_machine.best_time``)."""
        return best_time(fn, self.repeat, device or self.device)


@dataclass
class Row:
    """One line of the table."""

    case: str
    size: str
    skanomaly_s: float | None
    peer: str
    peer_s: float | None = None
    peer_status: str = "ok"  # "ok", "not installed", "not run: <why>" or "error: <why>"
    target: str = ""
    met: bool | None = None
    peak: str = ""  # the resource "fraction_of_peak" refers to
    peak_key: str | None = None  # its key in the measured peaks
    work: float | None = None  # flops (GEMM) or bytes (bandwidth) done in work_s
    work_s: float | None = None  # seconds of that work; skanomaly_s when None
    fraction_of_peak: float | None = None  # set by set_fraction once peaks are final
    checks: dict | None = None

    def set_fraction(self, peaks: dict) -> None:
        """Share of the measured peak that skanomaly's ``work`` reached."""
        seconds = self.work_s or self.skanomaly_s
        if self.peak_key and self.work and seconds:
            self.fraction_of_peak = self.work / seconds / 1e9 / peaks[self.peak_key]

    @property
    def ratio(self) -> float | None:
        """Peer time / skanomaly time (> 1: skanomaly is faster)."""
        if self.peer_s is None or not self.skanomaly_s:
            return None
        return self.peer_s / self.skanomaly_s


def low_rank_features(n: int, d: int, gen: torch.Generator, rank: int = 32,
                      noise: float = 0.3, chunk: int = 16_384) -> torch.Tensor:
    """(n, d) float32 features with a few dominant directions, like CNN patch features."""
    basis = torch.randn(rank, d, generator=gen) / math.sqrt(rank)
    out = torch.empty(n, d)
    for start in range(0, n, chunk):
        block = out[start:start + chunk]
        torch.randn(block.shape, generator=gen, out=block).mul_(noise)
        block.addmm_(torch.randn(block.shape[0], rank, generator=gen), basis)
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest relative difference of ``a`` from the reference ``b``."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), np.finfo(b.dtype).tiny)))


# --------------------------------------------------------------------------- covariance

def case_covariance(ctx: Context) -> list[Row]:
    """skanomaly.functional.cov vs numpy.cov on float64 data, rowvar=False."""
    from skanomaly.functional import cov

    n, d = ctx.sizes.cov
    x = torch.randn(n, d, generator=ctx.generator(1), dtype=torch.float64).add_(3.0)
    xd = x.to(ctx.device)
    sk_s, c_sk = ctx.time(lambda: cov(xd, rowvar=False))
    xn = x.numpy()
    np_s, c_np = ctx.time(lambda: np.cov(xn, rowvar=False), torch.device("cpu"))
    c_sk = c_sk.cpu().numpy()
    ratio = np_s / sk_s
    return [Row(
        "covariance", f"{n:,} x {d} fp64", sk_s, "numpy.cov", np_s,
        target="peer/sk >= 1 (not slower)", met=ratio >= 1.0, peak="fp64 GEMM (n d^2 flops)",
        peak_key="gemm_fp64_gflops", work=n * d * d,
        checks={"max_abs_diff": float(np.abs(c_sk - c_np).max()),
                "allclose": bool(np.allclose(c_sk, c_np, rtol=1e-10, atol=1e-12))},
    )]


# --------------------------------------------------------------------------- PaDiM

def _padim_flops(n: int, c: int, positions: int) -> float:
    """Minimal fit flops: scatter (n c^2) or Woodbury Gram (n^2 c), plus a Cholesky."""
    if n > c:
        return positions * (n * c * c + c**3 / 3)
    return positions * (n * n * c + n**3 / 3)


def case_padim(ctx: Context) -> list[Row]:
    """PaDiM fit, scoring and streaming vs anomalib's MultiVariateGaussian."""
    from skanomaly.detectors import PaDiMDetector

    s = ctx.sizes
    n, hw = s.padim_n, s.padim_hw
    components = _import("anomalib.models.components")
    padim_map = _import("anomalib.models.image.padim.anomaly_map")
    rows = []
    for c in s.padim_c:
        gen = ctx.generator(2)
        x = torch.randn(n, c, hw, hw, generator=gen).to(ctx.device)
        x_test = torch.randn(s.padim_score_n, c, hw, hw, generator=gen).to(ctx.device)

        def fit():
            return PaDiMDetector(n_features=None, reg=0.01, random_state=0,
                                 device=ctx.device).fit(x)

        sk_s, det = ctx.time(fit)
        woodbury = n <= c
        size = f"N={n}, C={c}, {hw}x{hw} fp32" + (" (Woodbury)" if woodbury else "")
        row = Row("PaDiM fit", size, sk_s, "anomalib MultiVariateGaussian",
                  peak="fp64 GEMM (minimal flops)",
                  peak_key="gemm_fp64_gflops", work=_padim_flops(n, c, hw * hw))
        score_s, _ = ctx.time(lambda: det.score_samples(x_test))
        map_s, sk_map = ctx.time(lambda: det.anomaly_map(x_test))
        # fit scores its own training images to set offset_; anomalib's fit does not
        train_score_s, _ = ctx.time(lambda: det.score_samples(x))
        checks = {"score_images_per_s": s.padim_score_n / score_s,
                  "anomaly_map_images_per_s": s.padim_score_n / map_s,
                  "fit_minus_training_scores_s": sk_s - train_score_s}
        if components is None or padim_map is None:
            row.peer_status = "not installed"
        elif woodbury:
            row.peer_status = ("not run: anomalib inverts C x C float32 matrices (no Woodbury"
                               " path; batched inv faults on this CPU build for d > 150)")
        else:
            mvg = components.MultiVariateGaussian
            row.peer_s, stats = ctx.time(lambda: mvg().fit(x))
            row.target, row.met = "peer/sk >= 5", row.ratio >= 5.0
            distance = padim_map.AnomalyMapGenerator.compute_distance
            peer_map_s, peer_map = ctx.time(lambda: distance(x_test, stats))
            checks["anomalib_map_images_per_s"] = s.padim_score_n / peer_map_s
            ref = peer_map[:, 0].double().cpu().numpy()
            checks["anomaly_map_max_rel_diff_vs_anomalib"] = _rel(
                np.asarray(sk_map, dtype=np.float64), ref)
        row.checks = checks
        rows.append(row)
        if woodbury and ctx.memory:
            mem = run_child({"kind": "padim_fit", "n": n, "c": c, "hw": hw,
                             "device": str(ctx.device), "threads": ctx.threads,
                             "seed": ctx.seed})
            checks.update({
                "fresh_process_fit_s": mem["seconds"],
                "peak_rss_mib": mem["peak_rss_mib"],
                "input_mib": mem["input_mib"],
                "fit_peak_above_input_mib": mem["peak_rss_mib"] - mem["rss_before_fit_mib"],
                # what the full solver would hold: moments, covariance and factor
                "full_solver_state_mib": 3 * hw * hw * c * c * 8 / 2**20,
            })
        del x, x_test, det
    if ctx.memory:
        rows.append(_padim_stream(ctx))
    return rows


def _padim_stream(ctx: Context) -> Row:
    """Peak RSS of partial_fit over batches at two training-set sizes (fresh processes)."""
    s = ctx.sizes
    c = s.padim_c[0]
    runs = [run_child({"kind": "padim_stream", "n": n, "c": c, "hw": s.padim_hw,
                       "batch": s.stream_batch, "device": str(ctx.device),
                       "threads": ctx.threads, "seed": ctx.seed}) for n in s.stream_n]
    above = [r["peak_rss_mib"] - r["rss_after_import_mib"] for r in runs]
    growth = above[1] / above[0]
    checks = {"peak_above_import_growth": growth}
    for n, run, extra in zip(s.stream_n, runs, above):
        checks.update({f"N={n} peak_rss_mib": run["peak_rss_mib"],
                       f"N={n} peak_above_import_mib": extra,
                       f"N={n} images_per_s": n / run["seconds"]})
    return Row(
        "PaDiM partial_fit stream",
        f"N={s.stream_n[0]} vs {s.stream_n[1]}, batches of {s.stream_batch}, C={c}, "
        f"{s.padim_hw}x{s.padim_hw}",
        runs[1]["seconds"], "(peak RSS, fresh process)", peer_status="not run: no peer",
        target="peak RSS above imports grows <= 1.1x", met=growth <= 1.1, checks=checks,
    )


# --------------------------------------------------------------------------- child processes

def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _child_main(spec: dict) -> dict:
    """Body of a child process: build the data, run the work, report times and RSS."""
    from skanomaly.detectors import PaDiMDetector

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    gen = torch.Generator().manual_seed(spec["seed"])
    n, c, hw = spec["n"], spec["c"], spec["hw"]
    det = PaDiMDetector(n_features=None, reg=0.01, random_state=0, device=device)
    out = {"rss_after_import_mib": _status_mib("VmRSS")}
    if spec["kind"] == "padim_fit":
        x = torch.randn(n, c, hw, hw, generator=gen).to(device)
        out["input_mib"] = x.numel() * 4 / 2**20
        out["rss_before_fit_mib"] = _status_mib("VmRSS")
        t0 = time.perf_counter()
        det.fit(x)
    elif spec["kind"] == "padim_stream":
        batch = spec["batch"]
        out["batch_mib"] = batch * c * hw * hw * 4 / 2**20
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            m = min(batch, n - start)
            det.partial_fit(torch.randn(m, c, hw, hw, generator=gen).to(device))
    else:
        raise ValueError(f"unknown child kind {spec['kind']!r}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = _status_mib("VmHWM")
    return out


def run_child(spec: dict) -> dict:
    """Run ``spec`` in a fresh interpreter; return its times and peak RSS (MiB).

    The peak is the child's ``VmHWM`` (Linux), the high-water mark of its own address
    space. ``getrusage`` cannot give it: Linux carries the parent's peak RSS into the
    child's ``ru_maxrss`` at fork/exec, so ``RUSAGE_SELF`` in the child, ``wait4`` or
    ``RUSAGE_CHILDREN`` in the parent report at least the parent's peak.
    """
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- k-center greedy

def covering_radius(x: torch.Tensor, centers: torch.Tensor, chunk: int = 4096) -> float:
    """max_i min_j ||x_i - c_j||, by chunked matrix products (float64 accumulation of norms)."""
    c_sq = centers.double().square().sum(1)
    worst = 0.0
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        d2 = torch.addmm(c_sq.float(), rows, centers.T, alpha=-2.0)
        d2 = d2.double().amin(1) + rows.double().square().sum(1)
        worst = max(worst, float(d2.clamp_min(0).max()))
    return math.sqrt(worst)


def _kcenter_skanomaly(x: torch.Tensor, n_centers: int, seed: int) -> torch.Tensor:
    """The pipeline of PatchCoreDetector: JL projection (eps=0.9), then greedy k-center."""
    from skanomaly.functional import (
        johnson_lindenstrauss_min_dim,
        k_center_greedy,
        sparse_random_projection_matrix,
    )

    gen = torch.Generator(device=x.device).manual_seed(seed)
    dim = johnson_lindenstrauss_min_dim(x.shape[0], eps=0.9)
    projection = None
    if dim < x.shape[1]:
        projection = sparse_random_projection_matrix(dim, x.shape[1], generator=gen,
                                                     dtype=x.dtype, device=x.device)
    return k_center_greedy(x, n_centers, generator=gen, projection=projection)


def _kcenter_anomalib(sampling, x: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """anomalib's KCenterGreedy; its global-RNG draws are seeded inside fork_rng.

    fork_rng restores the caller's global RNG state afterwards, so the run is
    reproducible without leaving the global state changed.
    """
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        idx = sampling.KCenterGreedy(embedding=x, sampling_ratio=ratio).select_coreset_idxs()
    return torch.as_tensor(idx, device=x.device)


def _ratio_for(n_centers: int, n: int) -> float:
    """A sampling ratio r with int(n * r) == n_centers (anomalib's rounding)."""
    return (n_centers + 0.5) / n


def _largest_n(per_iter_full: float, fixed_full: float, n_full: int, ratio: float,
               budget: float) -> int:
    """Largest n whose predicted run time fits ``budget``.

    Both the fixed cost (projection) and the cost of one iteration grow linearly in
    n, and there are ``ratio * n`` iterations: t(n) = a n^2 + b n.
    """
    a = per_iter_full * ratio / n_full
    b = fixed_full / n_full
    n = (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
    return int(min(n_full, n) // 100 * 100)


def case_kcenter(ctx: Context) -> list[Row]:
    """Greedy k-center coreset (PatchCore) vs anomalib's KCenterGreedy."""
    n_full, d = ctx.sizes.kcenter
    r_small, r_large = ctx.sizes.kcenter_ratios
    x = low_rank_features(n_full, d, ctx.generator(3)).to(ctx.device)
    sampling = _import("anomalib.models.components.sampling")

    def timing(label, fn, repeat=0 if ctx.sizes is PRESETS["full"] else 1):
        """Time ``fn`` (runs of minutes once, without a warm-up) and report progress."""
        seconds, result = best_time(fn, repeat, ctx.device)
        print(f"  .. {label}: {seconds:.3g} s", flush=True)
        return seconds, result

    # skanomaly at full n; 10 % at a smaller n if the 1 % run predicts too long a run.
    sk = {}
    k_small = int(n_full * r_small)
    sk[(n_full, r_small)] = timing(f"skanomaly n={n_full} k={k_small}",
                                   lambda: _kcenter_skanomaly(x, k_small, ctx.seed))
    n_large = n_full
    if sk[(n_full, r_small)][0] * r_large / r_small > ctx.sizes.kcenter_budget:
        per_iter = sk[(n_full, r_small)][0] / k_small
        n_large = _largest_n(per_iter, 0.0, n_full, r_large, ctx.sizes.kcenter_budget)
    k_large = int(n_large * r_large)
    sk[(n_large, r_large)] = timing(f"skanomaly n={n_large} k={k_large}",
                                    lambda: _kcenter_skanomaly(x[:n_large], k_large, ctx.seed))

    # The iteration cost from the difference of the two runs (cancels the projection).
    dim_proj = None
    per_iter_s = None
    if n_large == n_full:
        from skanomaly.functional import johnson_lindenstrauss_min_dim

        dim_proj = min(d, johnson_lindenstrauss_min_dim(n_full, eps=0.9))
        per_iter_s = ((sk[(n_full, r_large)][0] - sk[(n_full, r_small)][0])
                      / (k_large - k_small))

    # anomalib: calibrate its iteration cost at full n, then run each ratio at the
    # largest n that fits the peer budget.
    plan = {}
    if sampling is not None:
        t10, _ = timing("anomalib calibration k=10", lambda: _kcenter_anomalib(
            sampling, x, _ratio_for(10, n_full), ctx.seed), 0)
        t40, _ = timing("anomalib calibration k=40", lambda: _kcenter_anomalib(
            sampling, x, _ratio_for(40, n_full), ctx.seed), 0)
        peer_iter = max((t40 - t10) / 30, 1e-9)
        peer_fixed = max(t10 - 10 * peer_iter, 0.0)
        for r in (r_small, r_large):
            n = _largest_n(peer_iter, peer_fixed, n_full, r, ctx.peer_budget)
            plan[r] = n_full if n >= 0.8 * n_full else n  # the budget is not that strict

    rows = []
    for r in (r_small, r_large):
        n_sk = n_full if r == r_small else n_large
        n_peer = plan.get(r, n_sk)
        sizes = sorted({n_sk, n_peer}, reverse=True)
        for n in sizes:
            k = int(n * r)
            if (n, r) not in sk:
                sk[(n, r)] = timing(f"skanomaly n={n} k={k}",
                                    lambda: _kcenter_skanomaly(x[:n], k, ctx.seed))
            sk_s, sk_idx = sk[(n, r)]
            row = Row("k-center greedy", f"n={n:,} x {d} fp32, {r:.0%} (k={k:,})", sk_s,
                      "anomalib KCenterGreedy", target="radius <= 1.02 x peer's")
            checks = {}
            if n == n_full and r == r_large and per_iter_s is not None and per_iter_s > 0:
                checks.update({"projected_dim": dim_proj, "per_iteration_s": per_iter_s})
                row.peak = "read bandwidth (n x k_proj fp32 per iteration)"
                row.peak_key, row.work = "read_gbps", n_full * dim_proj * 4
                row.work_s = per_iter_s
            if sampling is None:
                row.peer_status = "not installed"
            elif n != n_peer:
                row.peer_status = f"not run: over the {ctx.peer_budget:.0f} s peer budget"
            else:
                peer_s, peer_idx = timing(f"anomalib n={n} k={k}", lambda: _kcenter_anomalib(
                    sampling, x[:n], r, ctx.seed))
                row.peer_s = peer_s
                r_sk = covering_radius(x[:n], x[sk_idx])
                r_peer = covering_radius(x[:n], x[peer_idx])
                rel = (r_sk - r_peer) / r_peer
                row.met = rel <= 0.02
                checks.update({"radius_skanomaly": r_sk, "radius_anomalib": r_peer,
                               "radius_rel_diff": rel,
                               "n_selected": [int(sk_idx.numel()), int(peer_idx.numel())]})
            if sampling is not None and plan:
                checks["anomalib_predicted_full_n_s"] = (
                    peer_fixed + peer_iter * int(n_full * r))
            row.checks = checks
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- KDE

def case_kde(ctx: Context) -> list[Row]:
    """gaussian_kde_logpdf vs scipy.stats.gaussian_kde.logpdf (and sklearn's tails)."""
    from skanomaly.functional import gaussian_kde_logpdf

    n, d, q = ctx.sizes.kde
    gen = ctx.generator(4)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    mix += torch.eye(d, dtype=torch.float64)
    data = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix
    queries = torch.randn(q, d, generator=gen, dtype=torch.float64) @ mix * 1.2
    # Far tail: in whitened coordinates (unit data covariance), 20 to 80 kernel bandwidths
    # beyond the farthest training point, in random directions.
    data_np = data.numpy()
    mean = data_np.mean(0)
    chol = np.linalg.cholesky(np.cov(data_np, rowvar=False))
    white = np.linalg.solve(chol, (data_np - mean).T).T
    factor = n ** (-1.0 / (d + 4))  # Scott's rule, scipy's default
    radius = np.linalg.norm(white, axis=1).max()
    dirs = torch.randn(ctx.sizes.kde_tail, d, generator=gen, dtype=torch.float64).numpy()
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    reach = radius + factor * np.linspace(20, 80, ctx.sizes.kde_tail)
    tail_white = dirs * reach[:, None]
    tail = mean + tail_white @ chol.T

    data_d, queries_d = data.to(ctx.device), queries.to(ctx.device)
    sk_s, sk_q = ctx.time(lambda: gaussian_kde_logpdf(queries_d, data_d))
    sk_tail = gaussian_kde_logpdf(torch.from_numpy(tail).to(ctx.device), data_d)
    sk_q, sk_tail = sk_q.cpu().numpy(), sk_tail.cpu().numpy()
    # Minimal work: one (q x n x d) matrix product, 2 q n d flops.
    row = Row("Gaussian KDE", f"{n:,} x {d} fp64, {q:,} queries", sk_s,
              "scipy.stats.gaussian_kde", target="peer/sk >= 2, rel. diff <= 1e-6",
              peak="fp64 GEMM (2 q n d flops)",
              peak_key="gemm_fp64_gflops", work=2 * q * n * d)
    checks = {"tail_bandwidths_beyond_data": [20, 80]}
    stats = _import("scipy.stats")
    if stats is None:
        row.peer_status = "not installed"
    else:
        cpu = torch.device("cpu")
        row.peer_s, sp_q = ctx.time(lambda: stats.gaussian_kde(data_np.T).logpdf(queries.numpy().T),
                                    cpu)
        sp_tail = stats.gaussian_kde(data_np.T).logpdf(tail.T)
        checks.update({"max_rel_diff_queries": _rel(sk_q, sp_q),
                       "max_rel_diff_tail": _rel(sk_tail, sp_tail),
                       "max_abs_diff_tail_nats": float(np.abs(sk_tail - sp_tail).max())})
        row.met = (row.ratio >= 2.0 and checks["max_rel_diff_queries"] <= 1e-6
                   and checks["max_rel_diff_tail"] <= 1e-6)
        neighbors = _import("sklearn.neighbors")
        if neighbors is not None:
            # sklearn's bandwidth is isotropic: on whitened data the scipy kernel is
            # factor^2 I, and the density maps back with the Jacobian 1 / det(chol).
            log_det = np.log(np.diag(chol)).sum()
            kde = neighbors.KernelDensity(bandwidth=factor).fit(white)
            q_white = np.linalg.solve(chol, (queries.numpy() - mean).T).T
            t0 = time.perf_counter()
            skl_q = kde.score_samples(q_white) - log_det
            checks["sklearn_seconds"] = time.perf_counter() - t0
            skl_tail = kde.score_samples(tail_white) - log_det
            finite = np.isfinite(skl_tail)
            checks.update({
                "sklearn_max_abs_err_queries_nats": float(np.abs(skl_q - sp_q).max()),
                "sklearn_median_abs_err_queries_nats": float(np.median(np.abs(skl_q - sp_q))),
                "sklearn_tail_nonfinite": int((~finite).sum()),
                "sklearn_max_abs_err_tail_nats": (
                    float(np.abs(skl_tail - sp_tail)[finite].max()) if finite.any() else None),
                "skanomaly_max_abs_err_tail_nats": checks.pop("max_abs_diff_tail_nats"),
            })
    row.checks = checks
    return [row]


# --------------------------------------------------------------------------- kNN

def case_knn(ctx: Context) -> list[Row]:
    """KNNIndex.search(k=1) vs faiss IndexFlatL2.search (PatchCore scoring).

    Both indexes are built outside the timing (faiss' ``add``, skanomaly's centring
    and norms), as PatchCoreDetector builds its index once after ``fit``; the
    one-shot ``knn_distances`` (build + search) is reported beside it.
    """
    from skanomaly.functional import KNNIndex, knn_distances

    q, b, d = ctx.sizes.knn
    gen = ctx.generator(5)
    feats = low_rank_features(q + b, d, gen)
    queries, bank = feats[:q], feats[q:]
    qd, bd = queries.to(ctx.device), bank.to(ctx.device)
    build_s, index = ctx.time(lambda: KNNIndex(bd))
    sk_s, (dist, idx) = ctx.time(lambda: index.search(qd, 1))
    one_shot_s, _ = ctx.time(lambda: knn_distances(qd, bd, 1))
    dist, idx = dist.reshape(-1).double().cpu().numpy(), idx.reshape(-1).cpu().numpy()
    row = Row("PatchCore NN scoring", f"{q:,} queries x {b:,} bank x {d} fp32", sk_s,
              "faiss IndexFlatL2", target="peer/sk >= 1/1.2",
              peak="fp32 GEMM (2 q b d flops)",
              peak_key="gemm_fp32_gflops", work=2 * q * b * d)
    faiss = _import("faiss")
    if faiss is None:
        row.peer_status = "not installed"
    else:
        faiss.omp_set_num_threads(ctx.threads)
        index = faiss.IndexFlatL2(d)
        index.add(bank.numpy())
        qn = queries.numpy()
        row.peer_s, (sq, fidx) = ctx.time(lambda: index.search(qn, 1), torch.device("cpu"))
        row.met = row.ratio >= 1 / 1.2
        ref = np.sqrt(np.maximum(sq[:, 0].astype(np.float64), 0))
        row.checks = {"same_neighbour_fraction": float((fidx[:, 0] == idx).mean()),
                      "max_rel_diff_distance": _rel(dist, ref)}
    row.checks = {**(row.checks or {}), "index_build_s": build_s,
                  "knn_distances_one_shot_s": one_shot_s}
    return [row]


CASES = {"covariance": case_covariance, "padim": case_padim, "kcenter": case_kcenter,
         "kde": case_kde, "knn": case_knn}


# --------------------------------------------------------------------------- report

def _fmt_check(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(_fmt_check(v) for v in value)
    return str(value)


def markdown(rows: list[Row], info: dict, peaks: dict, preset: str) -> str:
    """The result table with the machine it ran on."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    lines = [
        f"# skanomaly speed, {info['date']} ({preset} sizes, device {info['device']})",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores, "
        f"{info['memory_gib']:.1f} GiB, {info['threads']} threads"
        + (f", GPU {info['gpu_name']}" if "gpu_name" in info else "") + f". {versions}.",
        "",
        "Peaks measured in this run (best of start and end): "
        f"fp32 GEMM {peaks['gemm_fp32_gflops']:.3g} GFLOP/s, "
        f"fp64 GEMM {peaks['gemm_fp64_gflops']:.3g} GFLOP/s, "
        f"read bandwidth {peaks['read_gbps']:.3g} GB/s.",
        "",
        "| case | size | skanomaly | peer | peer time | peer / sk | target | met | "
        "% of peak | checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer_time = format_seconds(r.peer_s) if r.peer_status == "ok" else r.peer_status
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        frac = (f"{100 * r.fraction_of_peak:.0f} % {r.peak}"
                if r.fraction_of_peak is not None else "-")
        checks = "; ".join(f"{k}={_fmt_check(v)}" for k, v in (r.checks or {}).items())
        lines.append(f"| {r.case} | {r.size} | {format_seconds(r.skanomaly_s)} | {r.peer} | "
                     f"{peer_time} | {ratio} | {r.target} | {met} | {frac} | {checks} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", dest="sizes", action="store_const", const="quick",
                   help="sizes 10-100x smaller (same as --sizes quick)")
    p.add_argument("--sizes", choices=sorted(PRESETS), help="size preset (default: full)")
    p.add_argument("--only", action="append", choices=sorted(CASES), metavar="NAME",
                   help=f"run only this case (repeatable): {', '.join(CASES)}")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for torch and the peers (default: all cores)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR, help="directory of results")
    p.add_argument("--peer-budget", type=float, default=300.0,
                   help="seconds one anomalib k-center run may take; larger runs use a "
                        "smaller n (default 300)")
    p.add_argument("--skip-memory", action="store_true",
                   help="skip the peak-memory measurements (each needs a fresh process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.set_defaults(sizes="full")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 1 when a case raised an error."""
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child_main(json.loads(args.child))))
        return 0
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    threadpoolctl = _import("threadpoolctl")  # numpy's and scipy's BLAS threads
    with (threadpoolctl.threadpool_limits(args.threads) if threadpoolctl
          else contextlib.nullcontext()):
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    """Measure the peaks and the cases, write the results; 1 when a case raised."""
    sizes = PRESETS[args.sizes]
    info = machine_info(device, args.threads)
    info["date"] = datetime.date.today().isoformat()
    info["load_average_start"] = os.getloadavg()
    peaks = measure_peaks(device, sizes.gemm, sizes.bandwidth_bytes)
    print(f"peaks: fp32 {peaks['gemm_fp32_gflops']:.3g} GFLOP/s, fp64 "
          f"{peaks['gemm_fp64_gflops']:.3g} GFLOP/s, read {peaks['read_gbps']:.3g} GB/s",
          flush=True)
    ctx = Context(device, sizes, args.repeat, args.seed, args.threads,
                  args.peer_budget, not args.skip_memory)

    rows, errors = [], {}
    for name in args.only or CASES:
        t0 = time.perf_counter()
        try:
            new = CASES[name](ctx)
        except Exception as exc:  # one broken case must not lose the others' results
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        rows.extend(new)
        for r in new:
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else r.peer_status
            print(f"{r.case:26s} {r.size:48s} sk {format_seconds(r.skanomaly_s):>9s}  "
                  f"peer {format_seconds(r.peer_s):>9s}  {ratio}", flush=True)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    info["load_average_end"] = os.getloadavg()
    # Load from other processes lowers the peaks: keep the better of start and end.
    end = measure_peaks(device, sizes.gemm, sizes.bandwidth_bytes)
    peaks.update({k: max(v, end[k]) for k, v in peaks.items()})
    for r in rows:
        r.set_fraction(peaks)

    stem = f"{info['date']}-{host_kind(info)}-{device.type}"
    if args.sizes != "full":
        stem += f"-{args.sizes}"
    if args.only:
        stem += "-" + "-".join(args.only)
    table = markdown(rows, info, peaks, args.sizes)
    if errors:
        table += errors_section(errors)
    payload = {"machine": info, "peaks": peaks, "sizes": asdict(sizes), "preset": args.sizes,
               "repeat": args.repeat, "errors": errors,
               "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}
    write_report(args.output, stem, table, payload)
    print("\n" + table)
    print(f"written: {args.output / stem}.md and .json")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
