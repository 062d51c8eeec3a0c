"""Smoke runs of benchmarks/speed.py and benchmarks/end_to_end.py at tiny sizes.

The peers (faiss-cpu, anomalib) live in the benchmark environment only: where one is
missing its column must say "not installed" and the case must still time skanomaly.
end_to_end.py needs anomalib: without it, it exits with a message naming the fix, and
its quick run is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("skanomaly_bench_speed", BENCH / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package that fails to import
        return False


PEER_MODULES = {
    "covariance": "numpy",
    "PaDiM fit": "anomalib",
    "k-center greedy": "anomalib",
    "Gaussian KDE": "scipy",
    "PatchCore NN scoring": "faiss",
}


@pytest.fixture(scope="module")
def smoke_run(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        code = speed.main(["--sizes", "smoke", "--repeat", "1", "--skip-memory",
                           "--output", str(out)])
    finally:
        torch.set_num_threads(threads)
    return code, out


def test_smoke_run_writes_complete_results(smoke_run):
    code, out = smoke_run
    assert code == 0
    (json_file,) = out.glob("*-cpu-smoke.json")
    md = json_file.with_suffix(".md").read_text()
    payload = json.loads(json_file.read_text())
    assert payload["errors"] == {}
    assert payload["machine"]["cpu_cores"] >= 1
    assert payload["machine"]["versions"]["torch"] is not None
    for key in ("gemm_fp32_gflops", "gemm_fp64_gflops", "read_gbps"):
        assert payload["peaks"][key] > 0
    rows = payload["rows"]
    assert {r["case"] for r in rows} >= set(PEER_MODULES)
    for r in rows:
        assert r["skanomaly_s"] > 0
        assert f"| {r['case']} | {r['size']} |" in md
        module = PEER_MODULES.get(r["case"])
        if module is None or r["peer_status"].startswith("not run"):
            continue
        if _installed(module):
            assert r["peer_status"] == "ok" and r["peer_s"] > 0
            assert r["ratio"] == pytest.approx(r["peer_s"] / r["skanomaly_s"])
        else:
            assert r["peer_status"] == "not installed" and r["peer_s"] is None
            assert "not installed" in md


def test_smoke_run_checks_agreement_with_peers(smoke_run):
    _, out = smoke_run
    (json_file,) = out.glob("*-cpu-smoke.json")
    rows = {r["case"]: r for r in json.loads(json_file.read_text())["rows"]}
    assert rows["covariance"]["checks"]["allclose"]
    kde = rows["Gaussian KDE"]["checks"]
    if _installed("scipy"):
        assert kde["max_rel_diff_queries"] <= 1e-6 and kde["max_rel_diff_tail"] <= 1e-6
    if _installed("faiss"):
        assert rows["PatchCore NN scoring"]["checks"]["same_neighbour_fraction"] == 1.0


def test_cli_size_presets(speed):
    parse = speed._parser().parse_args
    assert parse([]).sizes == "full"
    assert parse(["--quick"]).sizes == "quick"
    assert parse(["--sizes", "smoke"]).sizes == "smoke"


def test_covering_radius_matches_brute_force(speed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=gen)
    centers = x[torch.randperm(500, generator=gen)[:9]]
    expected = torch.cdist(x.double(), centers.double()).amin(1).max().item()
    assert speed.covering_radius(x, centers, chunk=64) == pytest.approx(expected, rel=1e-6)


def test_largest_n_fits_budget(speed):
    def predicted(n):  # ratio * n iterations of per_iter * n / n_full, plus the fixed cost
        return 0.1 * n * (0.1 * n / 100_000) + 5.0 * n / 100_000

    n = speed._largest_n(per_iter_full=0.1, fixed_full=5.0, n_full=100_000, ratio=0.1,
                         budget=60.0)
    assert n % 100 == 0 and predicted(n) <= 60.0 < predicted(n + 100)
    assert speed._largest_n(0.1, 5.0, 1000, 0.1, 60.0) == 1000


@pytest.mark.slow
def test_child_reports_peak_rss(speed):
    run = speed.run_child({"kind": "padim_stream", "n": 4, "c": 5, "hw": 4, "batch": 2,
                           "device": "cpu", "threads": 1, "seed": 0})
    assert run["peak_rss_mib"] >= run["rss_after_import_mib"] > 0
    assert run["seconds"] > 0
    assert np.isfinite(run["batch_mib"])


# --------------------------------------------------------------------------- end_to_end.py

END_TO_END_CASES = {"PaDiM fit", "PaDiM predict", "PatchCore fit", "PatchCore predict",
                    "DFM fit", "DFM predict", "FeatureExtractor.transform",
                    "PaDiM fit kernel"}


@pytest.fixture(scope="module")
def end_to_end():
    spec = importlib.util.spec_from_file_location("skanomaly_bench_end_to_end",
                                                  BENCH / "end_to_end.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _anomalib_imports() -> bool:
    if not _installed("anomalib"):
        return False
    try:
        with warnings.catch_warnings():  # anomalib warns about its deprecated modules
            warnings.simplefilter("ignore")
            import anomalib.models.components  # noqa: F401
    except ImportError:
        return False
    return True


def test_end_to_end_exits_without_anomalib(end_to_end, monkeypatch):
    for name in [m for m in sys.modules if m == "anomalib" or m.startswith("anomalib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "anomalib", None)  # any anomalib import fails
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match=r"anomalib is not installed.*\[bench\]"):
        end_to_end.main(["--quick", "--output", "unused"])
    assert torch.get_num_threads() == threads


def test_end_to_end_cli(end_to_end):
    parse = end_to_end._parser().parse_args
    assert parse([]).sizes == "full" and parse([]).threads == 2
    assert parse(["--quick"]).sizes == "quick"
    full = end_to_end.PRESETS["full"]
    assert (full.n_train, full.n_test, full.image, full.padim_features) == (100, 40, 224, 100)


def test_median_time_takes_the_median_after_a_warm_up(end_to_end, monkeypatch):
    # a fake clock that each call of fn advances by its duration: no real timing (a
    # sleep-based version failed under load, when sleep(0.01) took 0.034 s)
    now = [0.0]
    machine = sys.modules[end_to_end.median_time.__module__]  # benchmarks/_machine.py
    monkeypatch.setattr(machine, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    calls = []
    durations = iter([5.0, 3.0, 1.0, 2.0])  # warm-up, then three timed runs

    def fn():
        calls.append(1)
        now[0] += next(durations)
        return len(calls)

    seconds, result, runs = end_to_end.median_time(fn, 3, torch.device("cpu"))
    assert len(calls) == 4 and result == 4
    assert runs == [3.0, 1.0, 2.0] and seconds == 2.0
    # a warm-up longer than once_above is the measurement
    now[0], durations, calls[:] = 0.0, iter([30.0]), []
    assert end_to_end.median_time(fn, 3, torch.device("cpu"))[::2] == (30.0, [30.0])


@pytest.fixture(scope="module")
def end_to_end_run(end_to_end, tmp_path_factory):
    if not _anomalib_imports():
        pytest.skip("anomalib (the bench extra) is not installed")
    out = tmp_path_factory.mktemp("end_to_end")
    code = end_to_end.main(["--quick", "--repeat", "1", "--output", str(out)])
    return code, out


@pytest.mark.slow
def test_end_to_end_quick_run(end_to_end_run):
    code, out = end_to_end_run
    assert code == 0
    (json_file,) = out.glob("end_to_end-*-cpu-quick.json")
    md = json_file.with_suffix(".md").read_text()
    payload = json.loads(json_file.read_text())
    assert payload["errors"] == {} and payload["machine"]["threads"] == 2
    assert payload["peaks"]["gemm_fp64_gflops"] > 0
    rows = {r["case"]: r for r in payload["rows"]}
    modules = {case for case in rows if case.endswith(", to_torch module")}
    assert set(rows) - modules == END_TO_END_CASES
    for r in rows.values():
        assert "error" not in r["checks"]
        assert r["skanomaly_s"] > 0 and r["peer_s"] > 0
        assert r["ratio"] == pytest.approx(r["peer_s"] / r["skanomaly_s"])
        if r["case"] not in modules:
            assert r["met"] == (r["ratio"] >= r["target_ratio"])
        assert f"| {r['case']} | {r['size']} |" in md
        if r["met"] is False:  # every missed target is profiled
            prof = payload["profiles"][r["case"]]
            assert prof["torch_ops"] and prof["python"]
            assert f"### {r['case']}" in md
    for case in END_TO_END_CASES - {"PaDiM fit kernel"}:
        assert rows[case]["floor_s"] > 0
    # the same weights and channels on both sides: anomalib's maps are the reference
    assert rows["PaDiM predict"]["checks"]["map_max_rel_diff"] < 1e-2
    assert rows["PaDiM predict"]["checks"]["map_corr"] > 0.999
    assert rows["DFM predict"]["checks"]["map_corr"] > 0.9
    checks = rows["PatchCore predict"]["checks"]
    assert checks["bank_size"] == checks["anomalib_bank_size"]
    assert rows["FeatureExtractor.transform"]["checks"]["naive_equals_transform"]
    for case in modules:  # the exported module computes what the estimator does
        assert rows[case]["checks"]["map_max_rel_diff_vs_estimator"] < 1e-4


@pytest.fixture(scope="module")
def small_defects():
    spec = importlib.util.spec_from_file_location("skanomaly_bench_small_defects",
                                                  BENCH / "small_defects.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_small_defects_are_small_and_masked_exactly(small_defects):
    X_train, X_test, y, masks, kinds = small_defects.make_data("gravel", 3, 12, 96)
    assert X_train.shape == (3, 3, 96, 96) and X_test.shape == (12, 3, 96, 96)
    assert (y == -1).sum() == 6 and set(kinds[y == -1]) == {"scratch", "blotch", "patch"}
    for mask, kind in zip(masks[y == -1], kinds[y == -1]):
        rows, cols = np.nonzero(mask)
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        assert 2 <= extent <= 13, (kind, extent)
    assert not masks[y == 1].any()


def test_small_defects_quick_run(small_defects, tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = small_defects.main(["--quick", "--merges", "mean", "--no-whole",
                                   "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [(r.detector, r.way) for r in rows] == [
        ("padim", "tiled (mean)"), ("padim", "resized 32"),
        ("patchcore", "tiled (mean)"), ("patchcore", "resized 32")]
    for r in rows:
        assert r.error is None
        assert 0 <= r.pixel_auroc <= 1 and 0 <= r.image_auroc <= 1 and 0 <= r.pro <= 1
        assert r.fit_s > 0 and r.score_s > 0
    assert all(r.map_sigma == 2.0 for r in rows)  # the command line's tiled blur
    (md,) = tmp_path.glob("small_defects-*-quick.md")
    assert "| brick | padim | tiled (mean) | 2 |" in md.read_text()


def test_small_defects_zoomed_tiles_and_layers(small_defects, tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = small_defects.main(["--quick", "--merges", "max", "--ways", "tiled",
                                   "--tile-resize", "48", "--detectors", "padim",
                                   "--padim-layers", "layer2", "--padim-features", "50",
                                   "--tag", "zoom", "--map-sigmas", "0", "4",
                                   "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    # one fit, a row per blur: the same image scores, other maps
    assert [(r.detector, r.way, r.map_sigma) for r in rows] == [
        ("padim", "tiled (max)", 0.0), ("padim", "tiled (max)", 4.0)]
    assert rows[0].error is None and rows[1].error is None
    assert rows[0].image_auroc == rows[1].image_auroc and rows[0].fit_s == rows[1].fit_s
    assert rows[0].pixel_auroc != rows[1].pixel_auroc
    text = next(tmp_path.glob("small_defects-*-quick-zoom.md")).read_text()
    assert "layers: padim layer2" in text
    assert "each enlarged to 48 px before the backbone (zoom 1.5)" in text
    assert "PaDiM n_features=50" in text
