"""The ``skanomaly`` command on images that are not square, and on folders of mixed sizes.

The rule under test (``skanomaly --help``): each image is resized so that its short side
is ``--image-size`` pixels and its long side keeps the aspect ratio, rounded to
``--image-size`` plus a multiple of 16 pixels; training and threshold images must share
one size, test images too unless the model is tiled; maps, heatmaps and predicted masks
come back at each image's own size. References are built here by hand with Pillow.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from skanomaly.cli import main
from skanomaly.datasets import load_textures
from skanomaly.persistence import load_model

# 96 x 64 px images (width x height) at a short side of 32 px: 32 x 48 (height x width)
SIZE, INPUT = 32, (32, 48)
RESNET = ["--backbone", "resnet18", "--layers", "layer1,layer2", "--image-size", str(SIZE),
          "--device", "cpu", "--quiet", "--detector", "padim"]


def save_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def to_uint8(image):
    return np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)


def by_hand(path, height, width):
    """The image as the command should read it: Pillow's bilinear resize, in [0, 1]."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255


def nearest(mask, height, width):
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (width, height), Image.NEAREST)) > 0


def read_scores(folder):
    with open(folder / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Brick crops cut to 96 x 64 px (width x height): train/ (12), calibration/ (10),
    test/{good,<defect>}/ with masks/; test/good/big.png is a good crop at twice the
    resolution (192 x 128: the same aspect ratio)."""
    root = tmp_path_factory.mktemp("shapes")
    data = load_textures("brick", n_train=22, n_test=10, image_size=96, defect_fraction=0.5,
                         random_state=0)
    for i, image in enumerate(data.X_train):
        folder = "train" if i < 12 else "calibration"
        save_png(root / folder / f"{i:03d}.png", to_uint8(image[:, 16:80]))
    for i, (image, kind, mask) in enumerate(
            zip(data.X_test, data.defect_type_test, data.masks_test)):
        folder = "good" if kind == "good" else kind
        save_png(root / "test" / folder / f"{i:03d}.png", to_uint8(image[:, 16:80]))
        if kind != "good":
            save_png(root / "masks" / folder / f"{i:03d}_mask.png",
                     mask[16:80].astype(np.uint8) * 255)
    good = to_uint8(data.X_train[0][:, 16:80])
    save_png(root / "test" / "good" / "big.png",
             np.asarray(Image.fromarray(good).resize((192, 128), Image.BILINEAR)))
    return root


@pytest.fixture(scope="module")
def fitted(tree):
    model = tree / "padim.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(model), *RESNET,
                 "--batch-size", "5", "--calibration-dir", str(tree / "calibration")]) == 0
    return model


def test_fit_and_predict_keep_the_aspect_ratio(tree, fitted, tmp_path):
    pipeline, metadata = load_model(fitted)
    assert metadata["input_size"] == list(INPUT) and metadata["image_size"] == SIZE
    assert pipeline[-1].input_shape_[1:] == (8, 12)  # layer1: a quarter of 32 x 48
    out = tmp_path / "out"
    assert main(["predict", str(fitted), str(tree / "test"), "--mask-dir",
                 str(tree / "masks"), "--output-dir", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    rows = read_scores(out)
    paths = [tree / "test" / row["image"] for row in rows]
    X = np.stack([by_hand(p, *INPUT) for p in paths])  # the big image too: 128 -> 32
    np.testing.assert_array_equal([float(r["anomaly_score"]) for r in rows],
                                  -pipeline.score_samples(X))
    # predicted masks at each image's own size: the model's masks, resized by hand
    predicted = pipeline.predict_mask(X)
    for row, path, mask in zip(rows, paths, predicted):
        with Image.open(path) as img:
            width, height = img.size
        name = row["heatmap"].replace("heatmaps/", "masks/")
        written = np.asarray(Image.open(out / name)) > 0
        assert written.shape == (height, width)
        np.testing.assert_array_equal(written, nearest(mask, height, width))
        assert (out / row["heatmap"]).is_file()
    assert {tuple(Image.open(out / r["heatmap"].replace("heatmaps/", "masks/")).size)
            for r in rows} == {(96, 64), (192, 128)}
    # pixel metrics at the size the maps were computed at, masks resized to it
    assert metadata["map_sigma"] == 8.0  # the default blur of an untiled model
    _, maps = pipeline.score_and_map(X, output_size=INPUT, sigma=8.0)
    truth = np.zeros((len(paths), *INPUT), dtype=bool)
    for i, path in enumerate(paths):
        mask_path = tree / "masks" / path.parent.name / f"{path.stem}_mask.png"
        if mask_path.exists():
            truth[i] = nearest(np.asarray(Image.open(mask_path)) > 0, *INPUT)
    assert truth.any()
    metrics = read_metrics(out)["metrics"]
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(truth.ravel(), maps.ravel()))


def test_images_of_nearly_one_aspect_ratio_share_a_size(tree, tmp_path):
    """97 x 64 px gives a long side of 48.5 px: 48 in steps of 16, so it trains beside
    the 96 x 64 images; the summary names the size."""
    train = tmp_path / "train"
    for path in sorted((tree / "train").glob("*.png")):
        save_png(train / path.name, np.asarray(Image.open(path)))
    wide = np.asarray(Image.open(train / "000.png").resize((97, 64), Image.BILINEAR))
    save_png(train / "wide.png", wide)
    assert main(["fit", str(train), "--model", str(tmp_path / "m.skanomaly"),
                 *[a for a in RESNET if a != "--quiet"]]) == 0
    pipeline, metadata = load_model(tmp_path / "m.skanomaly")
    assert metadata["input_size"] == list(INPUT) and metadata["n_train"] == 13


def run_error(argv, capsys):
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("skanomaly: error: ") and "\n" not in err
    return err


def test_training_images_of_another_shape_are_named(tree, tmp_path, capsys):
    train = tmp_path / "train"
    for path in sorted((tree / "train").glob("*.png")):
        save_png(train / path.name, np.asarray(Image.open(path)))
    portrait = np.asarray(Image.open(train / "000.png")).transpose(1, 0, 2)  # 64 x 96
    save_png(train / "sub" / "portrait.png", portrait)
    err = run_error(["fit", str(train), "--model", str(tmp_path / "m.skanomaly"), *RESNET],
                    capsys)
    assert "must have one size after resizing" in err
    assert "12 of them come out at 48x32 px" in err
    assert "sub/portrait.png (64x96 px -> 32x48 px)" in err
    test = tmp_path / "test"
    save_png(test / "good" / "a.png", np.asarray(Image.open(train / "001.png")))
    err = run_error([*RESNET, "--train-dir", str(train), "--test-dir", str(test),
                     "--output-dir", str(tmp_path / "out")], capsys)
    assert "sub/portrait.png (64x96 px -> 32x48 px)" in err and "--train-dir" in err


def test_calibration_images_of_another_shape_are_an_error(tree, tmp_path, capsys):
    calibration = tmp_path / "calibration"
    for path in sorted((tree / "calibration").glob("*.png")):
        square = np.asarray(Image.open(path))[:, :64]  # 64 x 64
        save_png(calibration / path.name, square)
    err = run_error(["fit", str(tree / "train"), "--model", str(tmp_path / "m.skanomaly"),
                     *RESNET, "--calibration-dir", str(calibration)], capsys)
    assert "--calibration-dir" in err and "32x32 px" in err and "48x32 px" in err


def test_untiled_models_name_test_images_of_another_shape(tree, fitted, tmp_path, capsys):
    test = tmp_path / "test"
    save_png(test / "good" / "a.png", np.asarray(Image.open(tree / "train" / "000.png")))
    square = test / "good" / "square.png"
    save_png(square, np.zeros((50, 50, 3), np.uint8))
    err = run_error(["predict", str(fitted), str(test), "--output-dir",
                     str(tmp_path / "out"), "--quiet"], capsys)
    assert f"image {square} (50x50 px) comes out at 32x32 px" in err
    assert "fitted on 48x32 px images" in err and "--tile-size" in err
    err = run_error([*RESNET, "--train-dir", str(tree / "train"), "--test-dir", str(test),
                     "--output-dir", str(tmp_path / "out")], capsys)
    assert str(square) in err and "give --tile-size" in err


def test_tiled_models_score_images_of_any_shape(tree, tmp_path):
    """Tiles of 16 px: test images 96 x 64, 64 x 96 and 80 x 80 px are scored at
    48 x 32, 32 x 48 and 32 x 32, each by its own tiles; pixel AUROC pools the pixels."""
    model_path = tmp_path / "tiled.skanomaly"
    assert main(["fit", str(tree / "train"), "--model", str(model_path), *RESNET,
                 "--tile-size", "16", "--calibration-dir", str(tree / "calibration")]) == 0
    pipeline, metadata = load_model(model_path)
    assert metadata["map_sigma"] == 2.0  # the default blur of a tiled model
    test, masks = tmp_path / "test", tmp_path / "masks"
    source = sorted((tree / "test").rglob("*.png"))
    defective = next(p for p in source if p.parent.name != "good")
    mask = np.asarray(Image.open(tree / "masks" / defective.parent.name
                                 / f"{defective.stem}_mask.png"))
    image = np.asarray(Image.open(defective))
    kind = defective.parent.name
    save_png(test / kind / "landscape.png", image)
    save_png(masks / kind / "landscape_mask.png", mask)
    save_png(test / kind / "portrait.png", image.transpose(1, 0, 2).copy())
    save_png(masks / kind / "portrait_mask.png", mask.T.copy())
    good = next(p for p in source if p.parent.name == "good")
    save_png(test / "good" / "square.png", np.asarray(Image.open(good))[:, 8:88])
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(test), "--mask-dir", str(masks),
                 "--output-dir", str(out), "--device", "cpu", "--quiet"]) == 0
    rows = read_scores(out)
    sizes = {"landscape.png": (32, 48), "portrait.png": (48, 32), "square.png": (32, 32)}
    all_maps, all_truth = [], []
    for row in rows:
        path = test / row["image"]
        X = by_hand(path, *sizes[path.name])[None]
        score, anomaly_map = pipeline.score_and_map(X, sigma=2.0)
        assert float(row["anomaly_score"]) == -score[0]
        assert anomaly_map.shape[1:] == sizes[path.name]
        mask_path = masks / kind / f"{path.stem}_mask.png"
        truth = (nearest(np.asarray(Image.open(mask_path)) > 0, *sizes[path.name])
                 if mask_path.exists() else np.zeros(sizes[path.name], bool))
        all_maps.append(anomaly_map[0].ravel())
        all_truth.append(truth.ravel())
        with Image.open(path) as img:
            own = img.size
        assert Image.open(out / row["heatmap"].replace("heatmaps/", "masks/")).size == own
    result = read_metrics(out)
    assert result["metrics"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate(all_truth), np.concatenate(all_maps)))
    assert "pro" not in result["metrics"]
    assert any("no PRO: the test images have several shapes" in n for n in result["notes"])
    # the main job, tiled, on the same folders
    main_out = tmp_path / "main"
    assert main([*RESNET, "--tile-size", "16", "--train-dir", str(tree / "train"),
                 "--test-dir", str(test), "--mask-dir", str(masks), "--output-dir",
                 str(main_out)]) == 0
    metrics = read_metrics(main_out)
    assert metrics["input_size"] == list(INPUT) and "pixel_auroc" in metrics["metrics"]
    assert len(list((main_out / "heatmaps").glob("*.png"))) == 3


def test_main_job_on_non_square_folders(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*[a for a in RESNET if a != "--quiet"], "--train-dir",
                 str(tree / "train"), "--test-dir", str(tree / "test"), "--mask-dir",
                 str(tree / "masks"), "--output-dir", str(out)]) == 0
    assert "at 48x32 px (short side 32)" in capsys.readouterr().out
    result = read_metrics(out)
    assert result["input_size"] == list(INPUT)
    assert {"pixel_auroc", "pro"} <= set(result["metrics"])
    heatmap = Image.open(out / read_scores(out)[0]["heatmap"])
    assert heatmap.format == "PNG"


def test_model_files_from_before_read_squares(tree, tmp_path):
    """A model file without input_size (older skanomaly) resizes every image to an
    --image-size square, as it was fitted: a 96 x 64 image is squashed to 32 x 32."""
    train = tmp_path / "train"
    for path in sorted((tree / "train").glob("*.png")):
        save_png(train / path.name, np.asarray(Image.open(path))[:, :64])  # 64 x 64
    model = tmp_path / "square.skanomaly"
    assert main(["fit", str(train), "--model", str(model), *RESNET]) == 0
    lines = model.read_bytes().split(b"\n", 2)
    metadata = json.loads(lines[1])
    assert metadata.pop("input_size") == [SIZE, SIZE]
    old = tmp_path / "old.skanomaly"
    old.write_bytes(b"\n".join([lines[0], json.dumps(metadata).encode(), lines[2]]))
    test = tmp_path / "test"
    save_png(test / "a.png", np.asarray(Image.open(sorted((tree / "train").glob("*"))[0])))
    out = tmp_path / "out"
    assert main(["predict", str(old), str(test), "--output-dir", str(out), "--device",
                 "cpu", "--quiet"]) == 0
    pipeline, _ = load_model(model)
    X = by_hand(test / "a.png", SIZE, SIZE)[None]
    assert float(read_scores(out)[0]["anomaly_score"]) == -pipeline.score_samples(X)[0]
    assert (out / "heatmaps" / "0000_a.png").is_file()
    err_out = tmp_path / "err"
    status = main(["predict", str(model), str(test), "--output-dir", str(err_out),
                   "--device", "cpu", "--quiet"])  # the new file knows its shape
    assert status == 2


def test_help_states_the_rule_with_sizes_the_reader_gives(capsys):
    from skanomaly.streaming import target_size

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "short side is --image-size pixels" in text
    assert "plus a multiple of 16 pixels" in text
    # the examples of --help, by the reader: (height, width) of a (width, height) file
    for (width, height), shown in (((1024, 768), "256x192"), ((1920, 1080), "336x192")):
        h, w = target_size((width, height), 192, keep_aspect=True, long_side_step=16)
        assert f"a {width}x{height} " in text or f"{width}x{height} one" in text
        assert shown == f"{w}x{h}" and shown in text
