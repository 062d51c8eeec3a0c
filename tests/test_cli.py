"""The ``skanomaly`` command: outputs checked against the data and scikit-learn's metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from skanomaly.cli import main, parse_layers, test_label
from skanomaly.datasets import load_textures

TINY = ["--image-size", "32", "--device", "cpu", "--quiet"]


def read_scores(output_dir):
    with open(output_dir / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_metrics(output_dir):
    return json.loads((output_dir / "metrics.json").read_text())


def check_scores_against_metrics(rows, metrics):
    """Image metrics equal scikit-learn's on the CSV; predictions follow the threshold."""
    labelled = [row for row in rows if row["label"]]
    y = np.array([int(row["label"]) for row in labelled])
    scores = np.array([float(row["anomaly_score"]) for row in labelled])
    assert metrics["metrics"]["image_auroc"] == pytest.approx(roc_auc_score(y == -1, scores))
    assert metrics["metrics"]["image_average_precision"] == pytest.approx(
        average_precision_score(y == -1, scores)
    )
    all_scores = np.array([float(row["anomaly_score"]) for row in rows])
    predictions = np.array([int(row["prediction"]) for row in rows])
    # scores are written with 9 significant digits: leave ties at the threshold alone
    clear = ~np.isclose(all_scores, metrics["threshold"], rtol=1e-7)
    expected = np.where(all_scores > metrics["threshold"], -1, 1)
    np.testing.assert_array_equal(predictions[clear], expected[clear])
    for value in metrics["metrics"].values():
        assert 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled")
    status = main([*TINY, "--n-train", "10", "--n-test", "6", "--output-dir", str(out)])
    return status, out


def test_bundled_run_writes_scores_heatmaps_and_metrics(bundled_run):
    status, out = bundled_run
    assert status == 0
    data = load_textures("brick", n_train=10, n_test=6, image_size=32, random_state=0)
    rows = read_scores(out)
    assert [row["image"] for row in rows] == [f"test_{i:03d}" for i in range(6)]
    assert [int(row["label"]) for row in rows] == data.y_test.tolist()
    assert [row["defect_type"] for row in rows] == data.defect_type_test.tolist()
    metrics = read_metrics(out)
    check_scores_against_metrics(rows, metrics)
    assert set(metrics["metrics"]) == {
        "image_auroc", "image_average_precision", "pixel_auroc", "pro"
    }
    assert metrics["weights"] is None
    assert any("randomly initialised backbone" in note for note in metrics["notes"])
    assert metrics["layers"] == ["layer1", "layer2", "layer3"]
    assert (metrics["n_fit"], metrics["n_calibration"]) == (8, 2)
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert [f"heatmaps/{p.name}" for p in heatmaps] == [row["heatmap"] for row in rows]
    with Image.open(heatmaps[0]) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_bundled_run_is_deterministic(bundled_run, tmp_path):
    _, out = bundled_run
    assert main([*TINY, "--n-train", "10", "--n-test", "6", "--output-dir", str(tmp_path),
                 "--no-heatmaps"]) == 0
    assert [row["anomaly_score"] for row in read_scores(tmp_path)] == [
        row["anomaly_score"] for row in read_scores(out)
    ]
    assert not (tmp_path / "heatmaps").exists()
    assert all(row["heatmap"] == "" for row in read_scores(tmp_path))


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def to_uint8(image):
    """(3, H, W) float image in [0, 1] to an (H, W, 3) uint8 array."""
    return np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """MVTec-style folders made from texture crops: train/, test/{good,blotch}/, masks/."""
    data = load_textures("grass", n_train=10, n_test=8, image_size=48, defect_fraction=0.5)
    for i, image in enumerate(data.X_train):
        save_png(tmp_path / "train" / f"{i:03d}.png", to_uint8(image))
    for i, (image, kind, mask) in enumerate(
        zip(data.X_test, data.defect_type_test, data.masks_test)
    ):
        folder = "good" if kind == "good" else "defect"
        save_png(tmp_path / "test" / folder / f"{i:03d}.png", to_uint8(image))
        if kind != "good":
            save_png(tmp_path / "masks" / folder / f"{i:03d}_mask.png",
                     mask.astype(np.uint8) * 255)
    return tmp_path, data


def test_folder_run_labels_and_pixel_metrics(folders):
    root, data = folders
    # a grey JPEG of another size in a nested folder: converted to RGB and resized
    grey = (to_uint8(data.X_train[0])[:40, :, 0])
    (root / "train" / "nested").mkdir()
    Image.fromarray(grey).save(root / "train" / "nested" / "extra.jpg")
    out = root / "out"
    status = main([
        *TINY, "--train-dir", str(root / "train"), "--test-dir", str(root / "test"),
        "--mask-dir", str(root / "masks"), "--output-dir", str(out),
    ])
    assert status == 0
    rows = read_scores(out)
    kinds = data.defect_type_test
    expected = sorted(
        (f"{'good' if k == 'good' else 'defect'}/{i:03d}.png", 1 if k == "good" else -1)
        for i, k in enumerate(kinds)
    )
    assert [(row["image"], int(row["label"])) for row in rows] == expected
    assert all(row["defect_type"] == row["image"].split("/")[0] for row in rows)
    metrics = read_metrics(out)
    assert metrics["n_train"] == 11
    check_scores_against_metrics(rows, metrics)
    assert {"pixel_auroc", "pro"} <= set(metrics["metrics"])
    assert len(list((out / "heatmaps").glob("*.png"))) == len(rows)


def test_folder_run_without_labels_or_masks(folders):
    root, _ = folders
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    for path in sorted((root / "test").rglob("*.png"))[:3]:
        (unlabelled / path.name).write_bytes(path.read_bytes())
    out = root / "out"
    status = main([
        *TINY, "--detector", "dfm", "--train-dir", str(root / "train"),
        "--test-dir", str(unlabelled), "--output-dir", str(out), "--no-heatmaps",
    ])
    assert status == 0
    rows = read_scores(out)
    assert len(rows) == 3 and all(row["label"] == "" for row in rows)
    metrics = read_metrics(out)
    assert metrics["metrics"] == {}
    assert any("no image metrics" in note for note in metrics["notes"])


@pytest.mark.parametrize("detector", ["gaussian", "dfkde", "patchcore"])
def test_other_detectors(detector, tmp_path):
    status = main([*TINY, "--detector", detector, "--n-train", "12", "--n-test", "6",
                   "--output-dir", str(tmp_path)])
    assert status == 0
    metrics = read_metrics(tmp_path)
    check_scores_against_metrics(read_scores(tmp_path), metrics)
    spatial = detector == "patchcore"
    assert ("pixel_auroc" in metrics["metrics"]) == spatial
    assert (tmp_path / "heatmaps").exists() == spatial


def run_error(argv, capsys):
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("skanomaly: error: ") and "\n" not in err
    return err


def test_empty_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    err = run_error([*TINY, "--train-dir", str(tmp_path / "train"),
                     "--test-dir", str(tmp_path / "test")], capsys)
    assert "no images found" in err and "train" in err


def test_unreadable_image_is_an_error(folders, capsys):
    root, _ = folders
    broken = root / "test" / "good" / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    err = run_error([*TINY, "--train-dir", str(root / "train"),
                     "--test-dir", str(root / "test")], capsys)
    assert "cannot read image" in err and str(broken) in err


def test_mask_of_wrong_size_is_an_error(folders, capsys):
    root, _ = folders
    mask = next((root / "masks").rglob("*_mask.png"))
    save_png(mask, np.zeros((20, 20), np.uint8))
    err = run_error([*TINY, "--train-dir", str(root / "train"), "--test-dir",
                     str(root / "test"), "--mask-dir", str(root / "masks")], capsys)
    assert str(mask) in err and "20x20" in err and "48x48" in err


def test_missing_mask_of_defective_image_is_an_error(folders, capsys):
    root, _ = folders
    mask = next((root / "masks").rglob("*_mask.png"))
    mask.unlink()
    err = run_error([*TINY, "--train-dir", str(root / "train"), "--test-dir",
                     str(root / "test"), "--mask-dir", str(root / "masks")], capsys)
    assert "no mask for defective image" in err and mask.name.replace("_mask", "") in err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--layers", "layer9"], "no module named 'layer9'"),
        (["--backbone", "resnet19"], "unknown backbone 'resnet19'"),
        (["--weights", "NOT_A_WEIGHT"], "unknown weights 'NOT_A_WEIGHT'"),
        (["--weights", "missing/weights.pt"], "does not exist"),
        (["--train-dir", "somewhere"], "--train-dir and --test-dir go together"),
        (["--calibration-fraction", "1.0"], "--calibration-fraction"),
    ],
)
def test_bad_settings_are_errors(options, message, tmp_path, capsys):
    err = run_error([*TINY, "--n-train", "4", "--n-test", "2", "--output-dir",
                     str(tmp_path), *options], capsys)
    assert message in err


def test_unknown_detector_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--detector", "svm"])
    assert exc.value.code == 2
    assert "invalid choice: 'svm'" in capsys.readouterr().err


def test_helpers():
    assert parse_layers(" layer1,layer3 ") == ("layer1", "layer3")
    assert test_label("good/sub/a.png") == (1, "good")
    assert test_label("crack/a.png") == (-1, "crack")
    assert test_label("a.png") == (0, "")


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "skanomaly", "--help"], capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "--train-dir" in result.stdout and "--detector" in result.stdout
