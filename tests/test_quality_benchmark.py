"""benchmarks/quality.py in quick mode: table rows, files, and one row recomputed by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KernelDensity
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skanomaly.datasets import load_breast_cancer_outliers, load_textures
from skanomaly.features import FeatureExtractor

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("skanomaly_quality_benchmark", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_quick_run_writes_table(quality, tmp_path, capsys):
    rows = quality.main([
        "--quick", "--datasets", "breast_cancer", "textures_brick",
        "--detectors", "padim", "isolation_forest", "--device", "cpu",
        "--output", str(tmp_path),
    ])
    # tabular data once; images once per feature set, pretrained beside random
    assert [(r.dataset, r.features, r.detector) for r in rows] == [
        ("breast_cancer", None, "padim"), ("breast_cancer", None, "isolation_forest"),
        ("textures_brick", "pretrained", "padim"),
        ("textures_brick", "pretrained", "isolation_forest"),
        ("textures_brick", "random", "padim"), ("textures_brick", "random", "isolation_forest"),
    ]
    for r in rows:
        assert r.error is None and r.skipped is None
        assert 0.0 <= r.auroc <= 1.0 and 0.0 <= r.average_precision <= 1.0
        assert r.fit_s >= 0 and r.score_s >= 0
    for features in ("pretrained", "random"):
        pixel = {r.detector: r.pixel_auroc for r in rows
                 if r.dataset == "textures_brick" and r.features == features}
        assert 0.0 <= pixel["padim"] <= 1.0 and pixel["isolation_forest"] is None

    # the protocol's breast-cancer IsolationForest row, recomputed with scikit-learn
    data = load_breast_cancer_outliers(random_state=0)
    model = make_pipeline(StandardScaler(), IsolationForest(random_state=0)).fit(data.X_train)
    expected = roc_auc_score(data.y_test == -1, -model.score_samples(data.X_test))
    assert rows[1].auroc == pytest.approx(expected)

    # the brick IsolationForest rows, recomputed from each feature set's pooled maps
    textures = load_textures("brick", n_train=20, n_test=16, image_size=32, random_state=0)
    for row, params in ((rows[3], dict(backbone="timm/tf_efficientnet_lite0",
                                       layers=["blocks.1", "blocks.2", "blocks.3"],
                                       weights="efficientnet-lite0-imagenet")),
                        (rows[5], dict(backbone="resnet18",
                                       layers=["layer1", "layer2", "layer3"]))):
        fe = FeatureExtractor(**params, random_state=0, device="cpu").fit(textures.X_train)
        pooled_train = fe.transform(textures.X_train).mean(axis=(2, 3))
        pooled_test = fe.transform(textures.X_test).mean(axis=(2, 3))
        forest = make_pipeline(StandardScaler(), IsolationForest(random_state=0))
        scores = -forest.fit(pooled_train).score_samples(pooled_test)
        assert row.auroc == pytest.approx(roc_auc_score(textures.y_test == -1, scores))

    (md,) = tmp_path.glob("quality-*-quick.md")
    (js,) = tmp_path.glob("quality-*-quick.json")
    table = md.read_text()
    assert "randomly initialised backbone" in table and "efficientnet-lite0-imagenet" in table
    assert "## Pretrained against random image features" in table
    assert "| detector | textures_brick pre | textures_brick rnd |" in table
    assert f"| breast_cancer |  | isolation_forest | scikit-learn | {expected:.3f} |" in table
    payload = json.loads(js.read_text())
    assert len(payload["rows"]) == 6 and payload["machine"]["cpu_cores"] >= 1
    assert list(payload["settings"]["features"]) == ["pretrained", "random"]
    assert payload["settings"]["features"]["random"]["params"]["weights"] is None
    assert payload["datasets"]["textures_brick pre"]["shape"] == "144x8x8"
    assert payload["datasets"]["textures_brick rnd"]["shape"] == "448x8x8"
    assert "written:" in capsys.readouterr().out


def test_kernel_density_adapter_is_log_density(quality):
    X = np.random.default_rng(0).normal(size=(50, 3))
    queries = np.array([[0.0, 0.0, 0.0], [3.0, -1.0, 2.0]])
    adapter = quality.KernelDensityDetector().fit(X)
    bandwidth = 50 ** (-1 / (3 + 4))  # Scott's rule
    reference = KernelDensity(bandwidth=bandwidth).fit(X).score_samples(queries)
    np.testing.assert_allclose(adapter.score_samples(queries), reference)


def test_elliptic_envelope_skipped_when_samples_do_not_exceed_features(quality):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 10))
    data = quality.Data("tiny", np.array([1, -1]), {"vectors": X, "maps": X},
                        {"vectors": X[:2], "maps": X[:2]})
    row = quality.evaluate("elliptic_envelope", data, "cpu")
    assert row.skipped is not None and "6 <= 10" in row.skipped and row.auroc is None
