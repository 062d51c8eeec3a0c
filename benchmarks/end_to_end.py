"""The whole pipeline, backbone included, timed side by side with anomalib's torch models.

skanomaly's ``make_anomaly_pipeline(FeatureExtractor, <Detector>)`` (fused: the features
stay tensors on the device, one pass gives scores and maps) against anomalib 2.x's
``PadimModel``, ``PatchcoreModel`` (with ``subsample_embedding``) and ``DFMModel`` on the
same images (the bundled brick tiles of :func:`skanomaly.datasets.load_textures`), the
same backbone architecture with the SAME weights (resnet18, random initialisation seeded
on skanomaly's side and loaded into anomalib's timm extractor: the hooked maps agree
bitwise), the same layers, channel counts, coreset ratio and batch size. Fit and predict
(image scores plus anomaly maps at image size) are timed as a user runs them, from the
same float32 numpy images in [0, 1]; the raw backbone forward to the last layer is the
floor. Beside them: ``FeatureExtractor.transform`` against the raw forward at the same
batch size, and the PaDiM fit kernel against anomalib's ``MultiVariateGaussian`` with its
fraction of the float64 GEMM peak measured in the same run. Where a target is missed the
skanomaly side is profiled (torch.profiler operators and cProfile functions) and the top
entries go into the results.

Timings: threads fixed (``--threads``, default 2), one warm-up run, then the median of
``--repeat`` runs; a first run over 20 s is taken as the measurement. Results go to
``benchmarks/results/end_to_end-<date>-<host-kind>-<device>.{md,json}``.

anomalib is the peer and a benchmark-only dependency (the ``bench`` extra): without it
this runner exits with a message saying so.

Usage::

    python benchmarks/end_to_end.py            # 100 train / 40 test tiles at 224 px
    python benchmarks/end_to_end.py --large    # 1,000 train / 200 test at 256 px (PaDiM, DFM)
    python benchmarks/end_to_end.py --quick    # tiny sizes (the test suite's smoke run)

Peak memory beside each fit and predict row, from one extra untimed run of each side:
the host's resident set size above its level before the run (sampled every 2 ms), and
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import os

if __name__ == "__main__":  # tqdm reads this when first imported: anomalib's progress bars
    os.environ.setdefault("TQDM_DISABLE", "1")

import pstats
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import (  # noqa: E402
    errors_section,
    format_seconds,
    host_kind,
    machine_info,
    measure_peaks,
    median_time,
    synchronize,
    write_report,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE = "resnet18"
PADIM_LAYERS = ("layer1", "layer2", "layer3")
PATCHCORE_LAYERS = ("layer2", "layer3")
DFM_LAYERS = ("layer3",)
MISSING_ANOMALIB = (
    "benchmarks/end_to_end.py compares against anomalib's torch models, and anomalib is "
    "not installed (or does not import: {error}). Install the benchmark peers in a "
    "separate environment: python -m venv /work/bench-venv && "
    "/work/bench-venv/bin/pip install -e '.[bench]'"
)


@dataclass(frozen=True)
class Sizes:
    """Images and kernel sizes of one preset."""

    n_train: int
    n_test: int
    image: int  # side in pixels
    padim_features: int  # channels PaDiM keeps
    coreset_ratio: float
    batch_size: int
    kernel: tuple[int, int, int]  # PaDiM fit kernel: N, C, side of the feature grid
    gemm: int  # side of the peak-GEMM matrices
    bandwidth_bytes: int


PRESETS = {
    "full": Sizes(n_train=100, n_test=40, image=224, padim_features=100, coreset_ratio=0.1,
                  batch_size=32, kernel=(200, 100, 56), gemm=4096, bandwidth_bytes=2**30),
    "large": Sizes(n_train=1000, n_test=200, image=256, padim_features=100,
                   coreset_ratio=0.1, batch_size=32, kernel=(1000, 100, 64), gemm=4096,
                   bandwidth_bytes=2**30),
    "quick": Sizes(n_train=10, n_test=4, image=64, padim_features=20, coreset_ratio=0.1,
                   batch_size=4, kernel=(24, 12, 8), gemm=256, bandwidth_bytes=2**22),
}
#: cases a preset runs when --only is not given: anomalib's PatchCore k-center over the
#: large preset's 4 million patches runs for hours on 2 cores, and the transform row's
#: 448-channel features of 1,000 images at 256 px (7.3 GiB, kept as numpy and as a
#: tensor) do not fit a 24 GiB machine beside the naive reference
DEFAULT_CASES = {"large": ("padim", "dfm")}


def _import_anomalib():
    """anomalib's torch models and components, or SystemExit naming the fix."""
    try:
        with warnings.catch_warnings():  # anomalib warns about its deprecated modules
            warnings.simplefilter("ignore")
            from anomalib.models.components import MultiVariateGaussian
            from anomalib.models.image.dfm.torch_model import DFMModel
            from anomalib.models.image.padim.torch_model import PadimModel
            from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except ImportError as exc:
        raise SystemExit(MISSING_ANOMALIB.format(error=exc)) from exc
    return {"PadimModel": PadimModel, "PatchcoreModel": PatchcoreModel,
            "DFMModel": DFMModel, "MultiVariateGaussian": MultiVariateGaussian}


# --------------------------------------------------------------------------- timing

def profile_top(fn: Callable[[], object], top: int = 12) -> dict:
    """Top entries of one run of ``fn`` under torch.profiler and under cProfile.

    Returns ``{"torch_ops": [...], "python": [...]}``: operators by self CPU time
    (name, calls, self and total ms) and Python functions by own time (function,
    calls, own and cumulative ms).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    torch_ops = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                  "total_ms": e.cpu_time_total / 1e3} for e in ops[:top]]
    prof_py = cProfile.Profile()
    prof_py.enable()
    fn()
    prof_py.disable()
    stats = pstats.Stats(prof_py, stream=io.StringIO())
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)
    python = []
    for (path, line, name), (_, ncalls, own, cum, _) in entries[:top]:
        where = f"{Path(path).name}:{line}" if path != "~" else "builtin"
        python.append({"function": f"{name} ({where})", "calls": ncalls,
                       "own_ms": own * 1e3, "cum_ms": cum * 1e3})
    total = sum(v[2] for v in stats.stats.values())
    return {"torch_ops": torch_ops, "python": python, "python_total_ms": total * 1e3}


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one run of ``fn``: host RSS above its level before the run, in MiB,
    sampled every 2 ms by a thread (psutil), and on CUDA ``max_memory_allocated``."""
    import gc
    import threading

    import psutil

    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_alloc = torch.cuda.memory_allocated(device)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        synchronize(device)
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    out = {"rss_mib": (peak[0] - base) / 2**20}
    if device.type == "cuda":
        out["cuda_mib"] = (torch.cuda.max_memory_allocated(device) - start_alloc) / 2**20
    del result
    return out


# --------------------------------------------------------------------------- rows

@dataclass
class Row:
    """One line of the table: a pipeline step, skanomaly beside its peer."""

    case: str
    size: str
    skanomaly_s: float | None
    peer: str
    peer_s: float | None = None
    n_images: int | None = None  # images per run, for images/s
    floor_s: float | None = None  # raw backbone forward of the same images
    target: str = ""
    target_ratio: float | None = None  # peer / sk must reach this
    met: bool | None = None
    fraction_of_peak: float | None = None  # of the fp64 GEMM peak (kernel row)
    memory: dict = field(default_factory=dict)  # side -> peak_memory(...) of one run
    checks: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)  # every timed run, both sides

    @property
    def ratio(self) -> float | None:
        """Peer time / skanomaly time (> 1: skanomaly is faster)."""
        if self.peer_s is None or not self.skanomaly_s:
            return None
        return self.peer_s / self.skanomaly_s

    def judge(self) -> None:
        """Set ``met`` from the ratio and the target ratio."""
        if self.target_ratio is not None and self.ratio is not None:
            self.met = self.ratio >= self.target_ratio


@dataclass
class Context:
    """Data, weights and settings shared by the cases."""

    device: torch.device
    sizes: Sizes
    repeat: int
    seed: int
    x_train: np.ndarray
    x_test: np.ndarray
    peers: dict
    state_dict: dict | None = None  # the seeded resnet18 weights, loaded on both sides
    floors: dict = field(default_factory=dict)  # n images -> raw forward seconds
    profile: bool = True  # profile the skanomaly side of missed targets
    profiles: dict = field(default_factory=dict)  # case -> profile_top(...)
    breakdowns: dict = field(default_factory=dict)  # case -> {stage: seconds}

    def time(self, fn, once_above: float = 20.0):
        return median_time(fn, self.repeat, self.device, once_above)


def _git_state() -> dict:
    """Commit of the checkout and the skanomaly files that differ from it (the code timed)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "skanomaly")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_skanomaly_files": dirty.splitlines() if dirty else []}


def _batches(x: np.ndarray, batch_size: int):
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size]


def _normalise(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """ImageNet-standardised float32 tensor of a numpy batch in [0, 1] (anomalib's input)."""
    t = torch.from_numpy(batch).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (t - mean) / std


def _raw_backbone(ctx: Context) -> torch.nn.Module:
    """torchvision's resnet18 with ctx's weights, truncated after layer3 (the floor)."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(ctx.state_dict)
    return torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                               net.layer2, net.layer3).eval().to(ctx.device)


def _floor(ctx: Context, x: np.ndarray) -> float:
    """Median seconds of the raw forward to layer3 of ``x`` (pre-normalised batches)."""
    n = len(x)
    if n not in ctx.floors:
        net = _raw_backbone(ctx)
        batches = [_normalise(b, ctx.device) for b in _batches(x, ctx.sizes.batch_size)]

        def forward():
            with torch.inference_mode():
                return [net(b) for b in batches][-1].shape

        ctx.floors[n] = ctx.time(forward)[0]
    return ctx.floors[n]


def _extractor(ctx: Context, layers):
    from skanomaly.features import FeatureExtractor

    return FeatureExtractor(BACKBONE, layers=list(layers), random_state=ctx.seed,
                            batch_size=ctx.sizes.batch_size, device=ctx.device)


def _load_weights(model, ctx: Context) -> None:
    """Load ctx's resnet18 weights into an anomalib model's timm extractor (strict on it)."""
    net = model.feature_extractor.feature_extractor
    result = net.load_state_dict(ctx.state_dict, strict=False)
    if result.missing_keys:
        raise RuntimeError(f"anomalib's extractor lacks weights for {result.missing_keys}")


def _peer_fit(ctx: Context, build, finish):
    """anomalib's fit as its Lightning module runs it: train-mode forwards, then finish."""
    model = build()
    _load_weights(model, ctx)
    model.to(ctx.device).train()
    for batch in _batches(ctx.x_train, ctx.sizes.batch_size):
        model(_normalise(batch, ctx.device))
    finish(model)
    return model


def _peer_predict(ctx: Context, model):
    """Scores and maps at image size, eval mode under inference_mode (Lightning's)."""
    model.eval()
    scores, maps = [], []
    with torch.inference_mode():
        for batch in _batches(ctx.x_test, ctx.sizes.batch_size):
            out = model(_normalise(batch, ctx.device))
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map[:, 0])
    return torch.cat(scores).cpu().numpy(), torch.cat(maps).cpu().numpy()


def _sk_predict(ctx: Context, pipe):
    """What a user of the pipeline runs: scores and maps at image size from one pass of
    the fused pipeline (``AnomalyPipeline.score_and_map``)."""
    return pipe.score_and_map(ctx.x_test, output_size=ctx.sizes.image)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference of ``a`` from ``b``, relative to the largest ``|b|``."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _pipeline_rows(ctx: Context, name: str, layers, detail: str, detector, build, finish,
                   compare) -> list[Row]:
    """Fit and predict rows of one pipeline, skanomaly beside anomalib."""
    from skanomaly import make_anomaly_pipeline

    s = ctx.sizes

    def sk_fit():
        return make_anomaly_pipeline(_extractor(ctx, layers), detector()).fit(ctx.x_train)

    sk_fit_s, pipe, sk_fit_runs = ctx.time(sk_fit)
    peer_fit_s, model, peer_fit_runs = ctx.time(lambda: _peer_fit(ctx, lambda: build(pipe),
                                                                  finish))
    sk_pred_s, (sk_scores, sk_maps), sk_pred_runs = ctx.time(lambda: _sk_predict(ctx, pipe))
    peer_pred_s, (pa_scores, pa_maps), peer_pred_runs = ctx.time(
        lambda: _peer_predict(ctx, model))
    last = layers[-1]
    size = f"{s.n_train} train / {s.n_test} test, {s.image} px, {BACKBONE} {'-'.join(layers)}"
    fit = Row(f"{name} fit", f"{size}, {detail}", sk_fit_s, f"anomalib {build.__name__}",
              peer_fit_s, n_images=s.n_train, floor_s=_floor(ctx, ctx.x_train),
              target="anomalib / sk >= 1.5", target_ratio=1.5,
              times={"skanomaly": sk_fit_runs, "anomalib": peer_fit_runs})
    pred = Row(f"{name} predict", f"{size}, scores + maps at {s.image} px",
               sk_pred_s, f"anomalib {build.__name__}", peer_pred_s, n_images=s.n_test,
               floor_s=_floor(ctx, ctx.x_test), target="anomalib / sk >= 1.5",
               target_ratio=1.5, times={"skanomaly": sk_pred_runs, "anomalib": peer_pred_runs})
    fit.checks["floor"] = f"raw forward to {last}"
    pred.checks.update({
        "image_score_corr": _corr(-sk_scores, pa_scores),
        "map_corr": _corr(sk_maps, pa_maps),
        **compare(pipe, model, sk_maps, pa_maps),
    })
    for row in (fit, pred):
        row.judge()
    fit.memory = {"skanomaly": peak_memory(sk_fit, ctx.device),
                  "anomalib": peak_memory(lambda: _peer_fit(ctx, lambda: build(pipe), finish),
                                          ctx.device)}
    pred.memory = {"skanomaly": peak_memory(lambda: _sk_predict(ctx, pipe), ctx.device),
                   "anomalib": peak_memory(lambda: _peer_predict(ctx, model), ctx.device)}
    row_profiles = {}
    if ctx.profile:
        if not fit.met:
            row_profiles[fit.case] = profile_top(sk_fit)
        if not pred.met:
            row_profiles[pred.case] = profile_top(lambda: _sk_predict(ctx, pipe))
    ctx.profiles.update(row_profiles)
    rows = [fit, pred]
    module_row = _module_predict_row(ctx, name, pipe, pred, sk_maps, pa_maps)
    if module_row is not None:
        rows.append(module_row)
    return rows


def _module_predict_row(ctx: Context, name: str, pipe, pred: Row, sk_maps, pa_maps):
    """Predict through ``skanomaly.export.to_torch(pipe, dtype=float32)``, where it exists.

    The fitted pipeline as one module, images -> (scores, maps at image size): the
    counterpart of anomalib's torch model forward (float32, no validation, one pass
    for scores and maps). None when skanomaly has no ``export.to_torch``.
    """
    try:
        from skanomaly.export import to_torch
    except ImportError:
        return None
    row = Row(f"{name} predict, to_torch module", pred.size + ", float32", None, pred.peer,
              pred.peer_s, n_images=pred.n_images, floor_s=pred.floor_s,
              target="(estimator API row above is the target)",
              times={"anomalib": pred.times.get("anomalib")})
    try:
        t0 = time.perf_counter()
        module = to_torch(pipe, device=ctx.device, dtype=torch.float32)
        row.checks["to_torch_s"] = time.perf_counter() - t0

        def predict():
            scores, maps = [], []
            with torch.inference_mode():
                for batch in _batches(ctx.x_test, ctx.sizes.batch_size):
                    s, m = module(torch.from_numpy(batch).to(ctx.device))
                    scores.append(s)
                    maps.append(m)
            return torch.cat(scores).cpu().numpy(), torch.cat(maps).cpu().numpy()

        row.skanomaly_s, (_, maps), row.times["skanomaly"] = ctx.time(predict)
        row.checks.update({"estimator_over_module": pred.skanomaly_s / row.skanomaly_s,
                           "map_max_rel_diff_vs_estimator": _rel(maps, sk_maps),
                           "map_corr_vs_anomalib": _corr(maps, pa_maps)})
    except Exception as exc:  # the export module is optional here: report, do not fail
        row.checks["error"] = f"{type(exc).__name__}: {exc}"
    return row


# --------------------------------------------------------------------------- cases

def case_padim(ctx: Context) -> list[Row]:
    """PaDiM: layer1-3, n_features channels kept (the same indices on both sides)."""
    from skanomaly.detectors import PaDiMDetector

    PadimModel = ctx.peers["PadimModel"]
    k = ctx.sizes.padim_features

    def detector():
        return PaDiMDetector(n_features=k, reg=0.01, random_state=ctx.seed, device=ctx.device)

    def build(pipe):
        model = PadimModel(backbone=BACKBONE, layers=list(PADIM_LAYERS), pre_trained=False,
                           n_features=k)
        model.idx = torch.as_tensor(pipe[-1].feature_indices_, dtype=torch.long)
        return model
    build.__name__ = "PadimModel"

    def compare(pipe, model, sk_maps, pa_maps):
        # anomalib regularises with 0.01 + 1e-5, in float32: about 1e-3 relative
        return {"map_max_rel_diff": _rel(sk_maps, pa_maps)}

    return _pipeline_rows(ctx, "PaDiM", PADIM_LAYERS, f"{k} of 448 channels", detector,
                          build, lambda m: m.fit(), compare)


def case_patchcore(ctx: Context) -> list[Row]:
    """PatchCore: layer2-3, 3x3 local pooling, coreset ratio, 9 neighbours."""
    from skanomaly.detectors import PatchCoreDetector

    PatchcoreModel = ctx.peers["PatchcoreModel"]
    ratio = ctx.sizes.coreset_ratio

    def detector():
        return PatchCoreDetector(coreset_sampling_ratio=ratio, n_neighbors=9,
                                 random_state=ctx.seed, device=ctx.device)

    def build(pipe):
        return PatchcoreModel(layers=list(PATCHCORE_LAYERS), backbone=BACKBONE,
                              pre_trained=False, num_neighbors=9)
    build.__name__ = "PatchcoreModel"

    def finish(model):
        # k-center draws its start point from torch's global RNG: seeded, then restored
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # subsample_embedding's deprecation notice
            torch.manual_seed(ctx.seed)
            model.subsample_embedding(ratio)

    def compare(pipe, model, sk_maps, pa_maps):
        # features differ by design: anomalib pools each layer and upsamples bilinearly,
        # skanomaly upsamples nearest (FeatureExtractor) and pools the concatenation
        return {"bank_size": int(pipe[-1].memory_bank_.shape[0]),
                "anomalib_bank_size": int(model.memory_bank.shape[0])}

    return _pipeline_rows(ctx, "PatchCore", PATCHCORE_LAYERS, f"coreset ratio {ratio:g}",
                          detector, build, finish, compare)


def case_dfm(ctx: Context) -> list[Row]:
    """DFM: layer3, 4x4 average pooling, PCA keeping 97 % of the variance, FRE scores."""
    from skanomaly.detectors import DFMDetector

    DFMModel = ctx.peers["DFMModel"]

    def detector():
        return DFMDetector(n_components=0.97, pooling_kernel_size=4, score_type="fre",
                           device=ctx.device)

    def build(pipe):
        return DFMModel(backbone=BACKBONE, layer=DFM_LAYERS[0], pre_trained=False,
                        pooling_kernel_size=4, n_comps=0.97, score_type="fre")
    build.__name__ = "DFMModel"

    def compare(pipe, model, sk_maps, pa_maps):
        # anomalib's FRE map is upsampled without a blur; skanomaly's is blurred (sigma 4)
        return {"n_components": int(pipe[-1].n_components_),
                "anomalib_n_components": int(model.pca_model.num_components.item()),
                "map_max_rel_diff": _rel(sk_maps, pa_maps)}

    return _pipeline_rows(ctx, "DFM", DFM_LAYERS, "pool 4, 97 % variance, FRE", detector,
                          build, lambda m: m.fit(), compare)


def round_robin(fns: dict, repeat: int, device: torch.device) -> dict:
    """Median seconds of each callable, timed in turns (one warm-up each, then ``repeat``
    rounds), so that a change of the machine's load hits every entry alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def case_transform(ctx: Context) -> list[Row]:
    """FeatureExtractor.transform (PaDiM's layer1-3) against the raw forward to layer3."""
    s = ctx.sizes
    x = ctx.x_train
    fe = _extractor(ctx, PADIM_LAYERS).fit(x[:1])
    x_tensor = torch.from_numpy(x)  # tensor in, tensor out: the features skip numpy
    sk_s, z_tensor, sk_runs = ctx.time(lambda: fe.transform(x_tensor))
    numpy_s, z, numpy_runs = ctx.time(lambda: fe.transform(x))
    floor = _floor(ctx, x)
    net = _raw_backbone(ctx)
    keep = np.sort(np.random.default_rng(ctx.seed).permutation(z.shape[1])[:s.padim_features])
    bounds = np.cumsum([0] + [getattr(net, str(i))[-1].conv2.out_channels for i in (4, 5, 6)])
    kept = [torch.as_tensor(keep[(keep >= lo) & (keep < hi)] - lo)
            for lo, hi in zip(bounds[:-1], bounds[1:])]

    def naive(stage=4, channels_last=False, select=False):
        """Forward, then (by stage) nearest upsampling, concatenation, numpy, finiteness."""
        out = None
        with torch.inference_mode():
            for start in range(0, len(x), s.batch_size):
                batch = _normalise(x[start:start + s.batch_size], ctx.device)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                h = net[:4](batch)
                maps = [net[4](h)]
                maps += [net[5](maps[0])]
                maps += [net[6](maps[1])]
                if select:
                    maps = [m[:, k] for m, k in zip(maps, kept)]
                if stage == 0:
                    continue
                grid = maps[0].shape[-2:]
                maps = maps[:1] + [torch.nn.functional.interpolate(m, size=grid)
                                   for m in maps[1:]]
                if stage == 1:
                    continue
                emb = torch.cat(maps, 1)
                if stage == 2:
                    continue
                if stage >= 4 and not bool(torch.isfinite(emb).all()):
                    raise ValueError("non-finite features")
                emb = emb.cpu().numpy()
                if out is None:
                    out = np.empty((len(x), *emb.shape[1:]), dtype=np.float32)
                out[start:start + len(emb)] = emb
        return out

    naive_s, z_naive, naive_runs = ctx.time(lambda: naive(3))
    row = Row("FeatureExtractor.transform", f"{s.n_train} images, {s.image} px, "
              f"{BACKBONE} {'-'.join(PADIM_LAYERS)}, batch {s.batch_size}, tensor out",
              sk_s, "raw torchvision forward to layer3", floor, n_images=s.n_train,
              floor_s=floor, target="sk / raw <= 1.15", target_ratio=1 / 1.15,
              times={"skanomaly": sk_runs, "naive": naive_runs, "numpy_out": numpy_runs})
    row.checks = {"numpy_out_s": numpy_s,
                  "naive_forward_upsample_concat_numpy_s": naive_s,
                  "naive_equals_transform": bool(np.array_equal(z, z_naive)),
                  "tensor_equals_numpy": bool(np.array_equal(z_tensor.numpy(), z)),
                  "output_mib": z.nbytes / 2**20}
    row.judge()
    if ctx.profile and not row.met:
        ctx.profiles[row.case] = profile_top(lambda: fe.transform(x))
        ctx.breakdowns[row.case] = round_robin({
            "raw forward to layer3 (the floor)": lambda: naive(0),
            "+ nearest upsampling of layer2, layer3 to layer1's grid": lambda: naive(1),
            "+ concatenation (448 channels)": lambda: naive(2),
            f"+ copy into the numpy output ({z.nbytes / 2**20:.0f} MiB)": lambda: naive(3),
            "+ finiteness check of the features": lambda: naive(4),
            "FeatureExtractor.transform": lambda: fe.transform(x),
            "naive with channels_last input": lambda: naive(3, channels_last=True),
            f"naive keeping {s.padim_features} channels (selected before upsampling)":
                lambda: naive(3, select=True),
            "both": lambda: naive(3, channels_last=True, select=True),
        }, ctx.repeat, ctx.device)
    return [row]


def _padim_flops(n: int, c: int, positions: int) -> float:
    """Minimal fit flops (speed.py's count): per position the scatter n c^2 and c^3/3."""
    return positions * (n * c * c + c**3 / 3)


def case_kernel(ctx: Context) -> list[Row]:
    """PaDiMDetector(n_features=None).fit on feature maps vs anomalib MultiVariateGaussian."""
    from skanomaly.detectors import PaDiMDetector

    n, c, hw = ctx.sizes.kernel
    gen = torch.Generator().manual_seed(ctx.seed + 2)
    x = torch.randn(n, c, hw, hw, generator=gen).to(ctx.device)

    def fit():
        return PaDiMDetector(n_features=None, reg=0.01, random_state=0,
                             device=ctx.device).fit(x)

    mvg = ctx.peers["MultiVariateGaussian"]
    sk_s, det, sk_runs = ctx.time(fit)
    peer_s, stats, peer_runs = ctx.time(lambda: mvg().fit(x))
    row = Row("PaDiM fit kernel", f"N={n}, C={c}, {hw}x{hw} fp32 features", sk_s,
              "anomalib MultiVariateGaussian", peer_s, n_images=n,
              target="anomalib / sk >= 1.5", target_ratio=1.5,
              times={"skanomaly": sk_runs, "anomalib": peer_runs})
    row.checks = {"flops": _padim_flops(n, c, hw * hw),
                  "includes": "skanomaly's fit also sets offset_ from leave-one-out "
                              "training scores; MultiVariateGaussian.fit does not score"}
    row.judge()
    if ctx.profile and not row.met:
        ctx.profiles[row.case] = profile_top(fit)
    return [row]


CASES = {"padim": case_padim, "patchcore": case_patchcore, "dfm": case_dfm,
         "transform": case_transform, "kernel": case_kernel}


# --------------------------------------------------------------------------- report

def _fmt_memory(memory: dict) -> str:
    """'host RSS sk / peer MiB' (and CUDA allocated) of a row's peak_memory entries."""
    if not memory:
        return "-"
    sk, peer = memory.get("skanomaly", {}), memory.get("anomalib", {})
    text = f"RSS {sk.get('rss_mib', 0):.0f} / {peer.get('rss_mib', 0):.0f} MiB"
    if "cuda_mib" in sk:
        text += f"; CUDA {sk['cuda_mib']:.0f} / {peer.get('cuda_mib', 0):.0f} MiB"
    return text


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(rows: list[Row], info: dict, peaks: dict, preset: str, profiles: dict,
             breakdowns: dict) -> str:
    """The result table with the machine it ran on, then the profiles of missed targets."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    load = (f"load average {info['load_average_start'][0]:.2f} at the start, "
            f"{info['load_average_end'][0]:.2f} at the end")
    lines = [
        f"# skanomaly end to end against anomalib, {info['date']} ({preset} sizes, "
        f"device {info['device']})",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores, "
        f"{info['memory_gib']:.1f} GiB, {info['threads']} threads"
        + (f", GPU {info['gpu_name']}" if "gpu_name" in info else "")
        + f"; {load}. {versions}. skanomaly at commit {info['git']['commit']}"
        + (f" with {len(info['git']['uncommitted_skanomaly_files'])} uncommitted files"
           if info["git"]["uncommitted_skanomaly_files"] else "") + ".",
        "",
        "Peaks measured in this run (best of start and end): "
        f"fp32 GEMM {peaks['gemm_fp32_gflops']:.3g} GFLOP/s, "
        f"fp64 GEMM {peaks['gemm_fp64_gflops']:.3g} GFLOP/s, "
        f"read bandwidth {peaks['read_gbps']:.3g} GB/s.",
        "",
        "Median of the timed runs after a warm-up. Both sides start from the same float32 "
        "numpy images in [0, 1] and the same resnet18 weights; `floor` is the raw "
        "torchvision forward of the same images to the last layer used (layer3), batch "
        "for batch.",
        "",
        "| case | size | skanomaly | peer | peer time | peer / sk | target | met | "
        "sk images/s | peer images/s | floor | sk / floor | peak memory sk / peer | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        ips = f"{r.n_images / r.skanomaly_s:.3g}" if r.n_images and r.skanomaly_s else "-"
        pips = f"{r.n_images / r.peer_s:.3g}" if r.n_images and r.peer_s else "-"
        over = f"{r.skanomaly_s / r.floor_s:.2f}x" if r.floor_s else "-"
        checks = dict(r.checks)
        if r.fraction_of_peak is not None:
            checks["fp64_gemm_peak_fraction"] = r.fraction_of_peak
        text = "; ".join(f"{k}={_fmt(v)}" for k, v in checks.items())
        lines.append(f"| {r.case} | {r.size} | {format_seconds(r.skanomaly_s)} | {r.peer} | "
                     f"{format_seconds(r.peer_s)} | {ratio} | {r.target} | {met} | {ips} | "
                     f"{pips} | {format_seconds(r.floor_s)} | {over} | "
                     f"{_fmt_memory(r.memory)} | {text} |")
    for case, stages in breakdowns.items():
        base = next(iter(stages.values()))
        lines += ["", f"## {case}: the gap stage by stage (medians, timed in turns)", "",
                  "| variant | seconds | / raw forward |", "|---|---|---|"]
        lines += [f"| {k} | {format_seconds(v)} | {v / base:.2f}x |" for k, v in stages.items()]
    if profiles:
        lines += ["", "## Profiles of the missed targets (skanomaly side, one run each)", ""]
        for case, prof in profiles.items():
            lines += [f"### {case}", "", "torch.profiler, operators by self CPU time:", "",
                      "| operator | calls | self ms | total ms |", "|---|---|---|---|"]
            lines += [f"| `{e['op']}` | {e['calls']} | {e['self_ms']:.0f} | "
                      f"{e['total_ms']:.0f} |" for e in prof["torch_ops"]]
            lines += ["", f"cProfile, functions by own time (total "
                      f"{prof['python_total_ms']:.0f} ms):", "",
                      "| function | calls | own ms | cumulative ms |", "|---|---|---|---|"]
            lines += [f"| `{e['function']}` | {e['calls']} | {e['own_ms']:.0f} | "
                      f"{e['cum_ms']:.0f} |" for e in prof["python"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", dest="sizes", action="store_const", const="quick",
                   help="tiny sizes (10 train / 4 test tiles at 64 px)")
    p.add_argument("--large", dest="sizes", action="store_const", const="large",
                   help="1,000 train / 200 test tiles at 256 px (PaDiM and DFM unless "
                        "--only says otherwise)")
    p.add_argument("--only", action="append", choices=sorted(CASES), metavar="NAME",
                   help=f"run only this case (repeatable): {', '.join(CASES)}")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs after the warm-up; the median is kept (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch and BLAS")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="do not profile the skanomaly side of missed targets")
    p.add_argument("--output", type=Path, default=RESULTS_DIR, help="directory of results")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(sizes="full")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 1 when a case raised an error."""
    args = _parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    peers = _import_anomalib()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        import threadpoolctl  # numpy's and scipy's BLAS threads
        limits = threadpoolctl.threadpool_limits(args.threads)
    except ImportError:
        limits = contextlib.nullcontext()
    try:
        with limits:
            return _run(args, device, peers)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device, peers: dict) -> int:
    from skanomaly.datasets import load_textures

    sizes = PRESETS[args.sizes]
    info = machine_info(device, args.threads)
    info["date"] = datetime.date.today().isoformat()
    info["git"] = _git_state()
    info["load_average_start"] = os.getloadavg()
    peaks = measure_peaks(device, sizes.gemm, sizes.bandwidth_bytes)
    print(f"peaks: fp32 {peaks['gemm_fp32_gflops']:.3g} GFLOP/s, fp64 "
          f"{peaks['gemm_fp64_gflops']:.3g} GFLOP/s, read {peaks['read_gbps']:.3g} GB/s",
          flush=True)
    data = load_textures("brick", n_train=sizes.n_train, n_test=sizes.n_test,
                         image_size=sizes.image, random_state=args.seed)
    ctx = Context(device, sizes, args.repeat, args.seed, data.X_train, data.X_test, peers,
                  profile=args.profile)
    # the seeded weights both sides use: skanomaly builds them, anomalib loads them
    ctx.state_dict = _extractor(ctx, PADIM_LAYERS).fit(data.X_train[:1]).model_.state_dict()

    rows, errors = [], {}
    for name in args.only or DEFAULT_CASES.get(args.sizes, CASES):
        t0 = time.perf_counter()
        try:
            new = CASES[name](ctx)
        except Exception as exc:  # one broken case must not lose the others' results
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        rows.extend(new)
        for r in new:
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
            print(f"{r.case:28s} sk {format_seconds(r.skanomaly_s):>9s}  "
                  f"peer {format_seconds(r.peer_s):>9s}"
                  f"  {ratio}  floor {format_seconds(r.floor_s)}", flush=True)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    info["load_average_end"] = os.getloadavg()
    end = measure_peaks(device, sizes.gemm, sizes.bandwidth_bytes)
    peaks.update({k: max(v, end[k]) for k, v in peaks.items()})
    for r in rows:
        if r.case == "PaDiM fit kernel" and r.skanomaly_s:
            r.fraction_of_peak = (r.checks["flops"] / r.skanomaly_s / 1e9
                                  / peaks["gemm_fp64_gflops"])

    stem = f"end_to_end-{info['date']}-{host_kind(info)}-{device.type}"
    if args.sizes != "full":
        stem += f"-{args.sizes}"
    if args.only:
        stem += "-" + "-".join(args.only)
    table = markdown(rows, info, peaks, args.sizes, ctx.profiles, ctx.breakdowns)
    if errors:
        table += errors_section(errors)
    payload = {"machine": info, "peaks": peaks, "sizes": asdict(sizes), "preset": args.sizes,
               "repeat": args.repeat, "errors": errors, "profiles": ctx.profiles,
               "breakdowns": ctx.breakdowns,
               "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}
    write_report(args.output, stem, table, payload)
    print("\n" + table)
    print(f"written: {args.output / stem}.md and .json")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
