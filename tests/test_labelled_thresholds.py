"""Thresholds from labelled validation data (anomalib's adaptive F1 threshold) and
predicted masks from a pixel threshold.

References: a brute-force F1 search over every candidate threshold (numpy), the
conformal rank computed by hand, and the ground-truth masks of the bundled textures.
"""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
    calibrate,
    make_anomaly_pipeline,
)

DETECTORS = {
    "gaussian": lambda: GaussianDetector(device="cpu"),
    "padim": lambda: PaDiMDetector(random_state=0, device="cpu"),
    "patchcore": lambda: PatchCoreDetector(random_state=0, device="cpu"),
    "dfm": lambda: DFMDetector(device="cpu"),
    "dfkde": lambda: DFKDEDetector(random_state=0, device="cpu"),
}


def _f1(truth, flagged):
    tp = np.sum(truth & flagged)
    return 0.0 if tp == 0 else 2 * tp / (np.sum(truth) + np.sum(flagged))


def _brute_f1(anomaly, truth):
    """Best F1 of the rules ``anomaly >= t`` over every observed score, and the lowest
    threshold that reaches it."""
    candidates = np.unique(anomaly)
    f1 = np.array([_f1(truth, anomaly >= t) for t in candidates])
    return f1.max(), candidates[np.flatnonzero(f1 == f1.max())[0]]


@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 4))
    X_val = rng.normal(size=(60, 4))
    y_val = np.ones(60, dtype=int)
    y_val[:15] = -1
    X_val[:15] += rng.normal(0.0, 1.5, size=(15, 4))  # overlapping: F1 < 1
    return X, X_val, y_val


@pytest.mark.parametrize("name", list(DETECTORS))
def test_labelled_calibrate_maximises_f1_as_a_brute_force_search(name, labelled):
    X, X_val, y_val = labelled
    det = DETECTORS[name]().fit(X)
    assert det.calibrate(X_val, y_val) is det
    assert det.calibration_ == "labelled-f1"
    anomaly, truth = -det.score_samples(X_val), y_val == -1
    best_f1, best_t = _brute_f1(anomaly, truth)
    flagged = det.predict(X_val) == -1
    assert _f1(truth, flagged) == pytest.approx(best_f1, abs=1e-12)
    assert 0.3 < best_f1 < 1.0  # overlapping classes: a real trade-off
    np.testing.assert_array_equal(flagged, anomaly >= best_t)  # the lowest maximiser
    # the normal samples among them are the p-values' calibration set
    np.testing.assert_array_equal(det.calibration_scores_,
                                  np.sort(det.score_samples(X_val[y_val == 1])))


def test_labelled_calibrate_through_pipelines(labelled):
    X, X_val, y_val = labelled
    plain = make_pipeline(StandardScaler(), GaussianDetector(device="cpu")).fit(X)
    calibrate(plain, X_val, y_val)
    anomaly = -plain.score_samples(X_val)
    _, best_t = _brute_f1(anomaly, y_val == -1)
    np.testing.assert_array_equal(plain.predict(X_val) == -1, anomaly >= best_t)
    anomaly_pipeline = make_anomaly_pipeline(StandardScaler(), GaussianDetector(device="cpu"))
    anomaly_pipeline.fit(X).calibrate(X_val, y_val)
    assert anomaly_pipeline[-1].offset_ == plain[-1].offset_


def test_labels_are_checked(labelled):
    X, X_val, y_val = labelled
    det = GaussianDetector(device="cpu").fit(X)
    offset = det.offset_
    with pytest.raises(ValueError, match="shape"):
        det.calibrate(X_val, y_val[:-1])
    with pytest.raises(ValueError, match=r"\+1 \(normal\) and -1"):
        det.calibrate(X_val, np.where(y_val == -1, 0, 1))
    with pytest.raises(ValueError, match="no sample anomalous"):
        det.calibrate(X_val, np.ones(60))
    assert det.offset_ == offset and det.calibration_ != "labelled-f1"  # unchanged


def _maps(n, rng, anomalous):
    X = rng.normal(size=(n, 5, 4, 4))
    masks = np.zeros((n, 4, 4), bool)
    for i in range(anomalous):
        r, c = rng.integers(0, 4, size=2)
        X[i, :, r, c] += rng.normal(0.0, 6.0, size=5)
        masks[i, r, c] = True
    return X, masks


@pytest.mark.parametrize("name", ["padim", "patchcore", "dfm"])
def test_pixel_threshold_from_masks_maximises_pixel_f1(name):
    rng = np.random.default_rng(1)
    X, _ = _maps(60, rng, 0)
    X_val, masks = _maps(20, rng, 10)
    det = DETECTORS[name]().fit(X)
    det.calibrate_pixels(X_val, masks)
    assert det.pixel_calibration_ == "labelled-f1" and det.pixel_map_size_ is None
    maps = det.anomaly_map(X_val)  # masks at the feature resolution: the raw maps
    best_f1, best_t = _brute_f1(maps.ravel(), masks.ravel())
    predicted = det.predict_mask(X_val)
    assert predicted.dtype == bool and predicted.shape == masks.shape
    np.testing.assert_array_equal(predicted, maps >= best_t)
    assert _f1(masks, predicted) == pytest.approx(best_f1, abs=1e-12)
    # better than flagging every pixel (PatchCore's 3 x 3 patches and DFM's pooling
    # spread a one-pixel defect over its neighbours, so their F1 stays low here)
    assert best_f1 > _f1(masks, np.ones_like(masks))


def test_pixel_threshold_from_normal_images_is_the_conformal_quantile():
    rng = np.random.default_rng(2)
    X, _ = _maps(60, rng, 0)
    X_normal, _ = _maps(20, rng, 0)
    det = PaDiMDetector(contamination=0.05, random_state=0, device="cpu").fit(X)
    det.calibrate_pixels(X_normal, output_size=8, sigma=1.0)
    assert det.pixel_calibration_ == "held-out" and det.pixel_map_size_ == (8, 8)
    pixels = np.sort(det.anomaly_map(X_normal, output_size=8, sigma=1.0).ravel())
    # N = 20 * 64 = 1280 pixels: k = ceil(0.95 * 1281) = ceil(1216.95) = 1217
    assert det.pixel_threshold_ == pixels[1217 - 1]
    masks = det.predict_mask(_maps(40, rng, 0)[0])
    assert masks.shape == (40, 8, 8) and 0.0 < masks.mean() < 0.15


def test_pixel_threshold_errors_and_staleness():
    rng = np.random.default_rng(3)
    X, _ = _maps(40, rng, 0)
    det = PaDiMDetector(random_state=0, device="cpu").fit(X)
    with pytest.raises(NotFittedError, match="calibrate_pixels"):
        det.predict_mask(X[:2])
    with pytest.raises(ValueError, match="no anomalous pixel"):
        det.calibrate_pixels(X[:5], np.zeros((5, 4, 4), bool))
    with pytest.raises(ValueError, match="masks have shape"):
        det.calibrate_pixels(X[:5], np.ones((4, 4, 4), bool))
    det.calibrate_pixels(X[:10])
    det.partial_fit(X[:10])  # the model changed: the threshold went with it
    assert not hasattr(det, "pixel_threshold_")
    assert not hasattr(GaussianDetector(), "predict_mask")


def test_predicted_masks_on_the_bundled_textures():
    """Through an AnomalyPipeline at image size: the pixel threshold learnt from the
    masks of validation textures finds the defects of other test textures."""
    from skanomaly.datasets import load_textures
    from skanomaly.features import FeatureExtractor

    data = load_textures("brick", n_train=40, n_test=40, image_size=32, random_state=0)
    model = make_anomaly_pipeline(
        FeatureExtractor("resnet18", ["layer1", "layer2"], random_state=0, device="cpu"),
        PaDiMDetector(n_features=50, random_state=0, device="cpu")).fit(data.X_train)
    model.calibrate_pixels(data.X_test[:20], data.masks_test[:20])
    detector = model[-1]
    assert detector.pixel_map_size_ == (32, 32)
    predicted = model.predict_mask(data.X_test[20:])
    truth = data.masks_test[20:]
    assert predicted.shape == truth.shape
    np.testing.assert_array_equal(predicted,
                                  model.anomaly_map(data.X_test[20:]) > detector.pixel_threshold_)
    assert _f1(truth, predicted) > 0.2


# ---------------------------------------------------------------- command line
def _save_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _to_uint8(image):
    return np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)


def test_cli_fits_thresholds_on_labelled_validation_images_and_writes_masks(tmp_path):
    """``skanomaly fit --validation-dir/--validation-mask-dir``: the image threshold
    maximises F1 on the validation images and the pixel threshold pixel F1 (brute force
    on the saved pipeline's own scores and maps); ``skanomaly predict`` writes the
    predicted masks and their pixel precision and recall against the test masks."""
    import json

    from PIL import Image

    from skanomaly.cli import main
    from skanomaly.persistence import load_model
    from skanomaly.datasets import load_textures
    from skanomaly.streaming import find_images, read_image

    data = load_textures("brick", n_train=12, n_test=24, image_size=32, random_state=0)
    for i, image in enumerate(data.X_train):
        _save_png(tmp_path / "train" / f"{i:03d}.png", _to_uint8(image))
    for i, (image, kind, mask) in enumerate(zip(data.X_test, data.defect_type_test,
                                                data.masks_test)):
        split = "validation" if i < 12 else "test"
        folder = "good" if kind == "good" else kind
        _save_png(tmp_path / split / folder / f"{i:03d}.png", _to_uint8(image))
        if kind != "good":
            _save_png(tmp_path / f"{split}_masks" / folder / f"{i:03d}_mask.png",
                      mask.astype(np.uint8) * 255)
    model_path = tmp_path / "m.skanomaly"
    common = ["--backbone", "resnet18", "--layers", "layer1,layer2", "--image-size", "32",
              "--device", "cpu", "--quiet"]
    assert main(["fit", str(tmp_path / "train"), "--model", str(model_path), *common,
                 "--validation-dir", str(tmp_path / "validation"), "--validation-mask-dir",
                 str(tmp_path / "validation_masks")]) == 0
    model, metadata = load_model(model_path)
    detector = model[-1]
    assert metadata["calibration"] == "labelled-f1" == detector.calibration_
    assert metadata["pixel_calibration"] == "labelled-f1"
    assert metadata["pixel_threshold"] == detector.pixel_threshold_

    def folder(split):
        paths = find_images(tmp_path / split)
        images = np.stack([read_image(p, 32) for p in paths])
        labels = np.array([1 if p.parent.name == "good" else -1 for p in paths])
        masks = np.zeros((len(paths), 32, 32), bool)
        for i, p in enumerate(paths):
            mask = tmp_path / f"{split}_masks" / p.parent.name / f"{p.stem}_mask.png"
            if mask.exists():
                masks[i] = np.asarray(Image.open(mask)) > 0
        return paths, images, labels, masks

    _, X_val, y_val, masks_val = folder("validation")
    anomaly = -model.score_samples(X_val)
    _, best_t = _brute_f1(anomaly, y_val == -1)
    np.testing.assert_array_equal(model.predict(X_val) == -1, anomaly >= best_t)
    # the maps blurred as the command line blurs them (--map-sigma, 8 px untiled)
    assert detector.pixel_sigma_ == metadata["map_sigma"] == 8.0
    maps = model.anomaly_map(X_val, sigma=8.0)
    _, best_pixel = _brute_f1(maps.ravel(), masks_val.ravel())
    np.testing.assert_array_equal(model.predict_mask(X_val), maps >= best_pixel)

    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(tmp_path / "test"), "--mask-dir",
                 str(tmp_path / "test_masks"), "--output-dir", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    paths, X_test, _, masks_test = folder("test")
    expected = model.predict_mask(X_test)
    written = sorted((out / "masks").glob("*.png"))
    assert len(written) == len(paths)
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) > 0 for p in written]),
                                  expected)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    tp = np.sum(expected & masks_test)
    assert metrics["pixel_precision"] == pytest.approx(tp / expected.sum())
    assert metrics["pixel_recall"] == pytest.approx(tp / masks_test.sum())


def test_cli_validation_options_are_checked(tmp_path, capsys):
    from skanomaly.cli import main

    for name in ("train", "cal", "val"):
        (tmp_path / name).mkdir()
    base = ["fit", str(tmp_path / "train"), "--model", str(tmp_path / "m.skanomaly")]
    assert main([*base, "--calibration-dir", str(tmp_path / "cal"), "--validation-dir",
                 str(tmp_path / "val")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--validation-mask-dir", str(tmp_path / "val")]) == 2
    assert "needs --validation-dir" in capsys.readouterr().err
