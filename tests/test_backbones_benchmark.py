"""benchmarks/backbones.py in quick mode: rows, files, and one row recomputed by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skanomaly import PatchCoreDetector
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor
from skanomaly.metrics import image_auroc, pixel_auroc
from skanomaly.pipeline import AnomalyPipeline

BACKBONES = Path(__file__).resolve().parents[1] / "benchmarks" / "backbones.py"


@pytest.fixture(scope="module")
def backbones():
    spec = importlib.util.spec_from_file_location("skanomaly_backbones_benchmark", BACKBONES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_quick_run_writes_table_and_matches_a_hand_made_pipeline(backbones, tmp_path):
    rows = backbones.main(["--quick", "--backbones", "lite0", "--detectors", "patchcore",
                           "--sizes", "32", "--textures", "gravel", "--output",
                           str(tmp_path)])
    assert len(rows) == 1
    row = rows[0]
    assert (row["texture"], row["backbone"], row["detector"], row["size"]) == (
        "gravel", "lite0", "patchcore", 32)
    assert row["layers"] == ["blocks.2", "blocks.3"] and row["model_mb"] > 1
    (md,) = tmp_path.glob("backbones-*-quick.md")
    (js,) = tmp_path.glob("backbones-*-quick.json")
    assert "| lite0 | patchcore | blocks.2+blocks.3 | 32 | 8 |" in md.read_text()
    assert json.loads(js.read_text())["rows"][0]["pixel_auroc"] == row["pixel_auroc"]
    assert not list(tmp_path.glob("*partial*"))

    # the same pipeline built by hand: crops at 64 px resized to 32 (antialiased
    # bilinear), maps back at 64 px against the masks
    data = load_textures("gravel", n_train=8, n_test=6, image_size=64, random_state=0)

    def resize(X):
        return torch.nn.functional.interpolate(
            torch.from_numpy(X), size=(32, 32), mode="bilinear", antialias=True,
            align_corners=False).clamp(0, 1).numpy()

    model = AnomalyPipeline([
        ("features", FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.2", "blocks.3"],
                                      weights="efficientnet-lite0-imagenet", device="cpu",
                                      random_state=0)),
        ("detector", PatchCoreDetector(random_state=0, contamination=0.1, device="cpu")),
    ]).fit(resize(data.X_train))
    scores = -model.score_samples(resize(data.X_test))
    # maps blurred as the command line blurs them untiled: 8 px
    assert row["map_sigma"] == 8.0
    maps = model.anomaly_map(resize(data.X_test), output_size=64, sigma=8.0)
    assert row["image_auroc"] == pytest.approx(image_auroc(data.y_test, scores))
    assert row["pixel_auroc"] == pytest.approx(pixel_auroc(data.masks_test, np.asarray(maps)))


def test_detector_options_reach_patchcore_and_name_the_row(backbones, tmp_path):
    rows = backbones.main(["--quick", "--backbones", "lite0", "--detectors", "patchcore",
                           "--sizes", "32", "--textures", "gravel", "--coreset-ratio", "0.5",
                           "--n-neighbors", "3", "--map-sigmas", "2", "0", "--output",
                           str(tmp_path)])
    row, unblurred = rows
    assert (row["map_sigma"], unblurred["map_sigma"]) == (2.0, 0.0)
    assert unblurred["image_auroc"] == row["image_auroc"]  # the blur moves maps only
    assert row["detector_params"] == {"coreset_sampling_ratio": 0.5, "n_neighbors": 3}
    (md,) = tmp_path.glob("backbones-*-quick.md")
    for sigma in ("0", "2"):
        assert ("| lite0 | patchcore (coreset_sampling_ratio=0.5, n_neighbors=3) | "
                f"blocks.2+blocks.3 | 32 | {sigma} |") in md.read_text()

    data = load_textures("gravel", n_train=8, n_test=6, image_size=64, random_state=0)
    X_train, X_test = backbones.resize(data.X_train, 32), backbones.resize(data.X_test, 32)
    model = AnomalyPipeline([
        ("features", FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.2", "blocks.3"],
                                      weights="efficientnet-lite0-imagenet", device="cpu",
                                      random_state=0)),
        ("detector", PatchCoreDetector(coreset_sampling_ratio=0.5, n_neighbors=3,
                                       random_state=0, contamination=0.1, device="cpu")),
    ]).fit(X_train)
    scores = -model.score_samples(X_test)
    assert row["image_auroc"] == pytest.approx(image_auroc(data.y_test, scores))
    for r, sigma in ((row, 2.0), (unblurred, 0.0)):
        maps = model.anomaly_map(X_test, output_size=64, sigma=sigma)
        assert r["pixel_auroc"] == pytest.approx(pixel_auroc(data.masks_test, np.asarray(maps)))
