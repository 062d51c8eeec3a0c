"""Machine description, peak throughput, timing and report helpers of the benchmark runners.

Nothing here knows about skanomaly: it describes the machine (CPU model, cores,
memory, library versions, GPU), measures what the machine can do at best in the
same run as the benchmarks (GEMM GFLOP/s in float32 and float64, read bandwidth
in GB/s), times callables (best or median of several runs after a warm-up) and writes
a run's report (a Markdown table and a JSON file of the same stem).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch


def _meminfo_gib() -> float | None:
    """Total memory from /proc/meminfo in GiB, or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device, threads: int) -> dict:
    """Describe the machine, the libraries and the device a run uses.

    Parameters
    ----------
    device : torch.device
        Device the skanomaly kernels run on.
    threads : int
        Intra-op threads given to torch (and to the peers' thread pools).

    Returns
    -------
    dict
        JSON-serialisable description: host, CPU model, logical cores, memory (GiB),
        threads, Python and library versions (None for those not installed) and, on
        CUDA, the GPU name and memory.
    """
    info = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": _meminfo_gib(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "versions": {
            d: _version(d)
            for d in ("skanomaly", "torch", "numpy", "scipy", "scikit-learn", "faiss-cpu",
                      "anomalib", "psutil")
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_name"] = props.name
        info["gpu_memory_gib"] = props.total_memory / 2**30
    return info


def host_kind(info: dict) -> str:
    """Short file-name slug of the machine, e.g. ``amd-epyc-2c`` or ``nvidia-h100``."""
    name = info.get("gpu_name") if info["device"].startswith("cuda") else None
    if name is None:
        name = f"{info['cpu_model']}-{info['cpu_cores']}c"
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*?ghz|processor|\d+-core", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeat: int, device: torch.device,
              once_above: float = 20.0) -> tuple[float, object]:
    """Best wall time of ``fn()`` over ``repeat`` runs after one warm-up run.

    Parameters
    ----------
    fn : callable
        Work to time, without arguments.
    repeat : int
        Timed runs after the warm-up; 0 times a single run without a warm-up.
    device : torch.device
        Synchronised before reading the clock.
    once_above : float, default=20.0
        A warm-up that takes longer than this many seconds is taken as the
        measurement and not repeated (one-time costs are negligible there).

    Returns
    -------
    seconds : float
        Fastest run.
    result : object
        What the last run returned.
    """
    times, result = _timed_runs(fn, repeat, device, once_above)
    return (times[0] if len(times) == 1 else min(times[1:])), result


def median_time(fn: Callable[[], object], repeat: int, device: torch.device,
                once_above: float = 20.0) -> tuple[float, object, list[float]]:
    """Median wall time of ``fn()`` over ``repeat`` runs after one warm-up run.

    As :func:`best_time` (a warm-up longer than ``once_above`` seconds is the
    measurement: one-time costs are negligible there), with the median of the timed
    runs instead of the fastest. Returns (median seconds, last result, all timed runs).
    """
    times, result = _timed_runs(fn, repeat, device, once_above)
    if len(times) == 1:
        return times[0], result, times
    return statistics.median(times[1:]), result, times[1:]


def _timed_runs(fn: Callable[[], object], repeat: int, device: torch.device,
                once_above: float) -> tuple[list[float], object]:
    """Wall times of a warm-up run of ``fn()`` and ``repeat`` more (the warm-up alone if
    ``repeat`` is 0 or it took longer than ``once_above`` seconds), and the last result."""
    times = []
    for i in range(repeat + 1):
        result = None  # the previous run's output is freed before the next run
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if i == 0 and (repeat == 0 or times[0] > once_above):
            return times, result
    return times, result


def measure_peaks(device: torch.device, gemm_size: int, bandwidth_bytes: int,
                  repeat: int = 3) -> dict:
    """Measure GEMM throughput (fp32, fp64) and read bandwidth of ``device``.

    Parameters
    ----------
    device : torch.device
        Where to measure.
    gemm_size : int
        Side of the square matrices multiplied with ``torch.mm`` (2 n^3 flops).
    bandwidth_bytes : int
        Size of the float32 array summed with ``torch.sum`` (read once per run).
    repeat : int, default=3
        Timed runs after a warm-up; the best is kept.

    Returns
    -------
    dict
        ``gemm_fp32_gflops``, ``gemm_fp64_gflops``, ``read_gbps`` and the sizes used.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    out = {"gemm_size": gemm_size, "bandwidth_bytes": bandwidth_bytes}
    for dtype, key in ((torch.float32, "gemm_fp32_gflops"), (torch.float64, "gemm_fp64_gflops")):
        a = torch.randn(gemm_size, gemm_size, generator=gen, dtype=dtype, device=device)
        b = torch.randn(gemm_size, gemm_size, generator=gen, dtype=dtype, device=device)
        c = torch.empty_like(a)
        seconds, _ = best_time(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), repeat, device)
        out[key] = 2 * gemm_size**3 / seconds / 1e9
        del a, b, c
    x = torch.ones(bandwidth_bytes // 4, dtype=torch.float32, device=device)
    seconds, _ = best_time(lambda: x.sum(), repeat, device)
    out["read_gbps"] = x.numel() * 4 / seconds / 1e9
    return out


def format_seconds(seconds: float | None) -> str:
    """``"12.3 ms"`` below a second, ``"4.56 s"`` above, ``"-"`` for None (tables)."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def errors_section(errors: dict) -> str:
    """The Markdown list of the cases that failed, to append to a report's table."""
    return "\nErrors:\n\n" + "".join(f"- {k}: {v}\n" for k, v in errors.items())


def write_report(folder: Path, stem: str, table: str, payload: dict, indent: int = 1) -> None:
    """Write a run's report: ``folder/stem.md`` (the table) and ``folder/stem.json``
    (``payload``, JSON with ``indent``); ``folder`` is created if needed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(table)
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=indent) + "\n")
