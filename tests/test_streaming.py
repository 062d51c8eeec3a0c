"""skanomaly.streaming: image folders read batch by batch and streamed into partial_fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

import skanomaly.streaming as streaming
from skanomaly import DFMDetector, GaussianDetector, PaDiMDetector, PatchCoreDetector
from skanomaly.base import CalibrationWarning
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor
from skanomaly.streaming import (
    ImageReadError,
    find_images,
    iter_image_batches,
    partial_fit_images,
    read_image,
)

SIZE = 32


def to_uint8(image):
    return np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """11 brick crops as PNG files, 9 at the top and 2 in a subfolder."""
    root = tmp_path_factory.mktemp("images")
    crops = load_textures("brick", n_train=11, n_test=1, image_size=SIZE).X_train
    for i, crop in enumerate(crops):
        path = root / ("sub" if i >= 9 else "") / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(to_uint8(crop)).save(path)
    return root


def pil_reference(path, size):
    """The image as Pillow reads and resizes it, channels first, in [0, 1]."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255)


def extractor(batch_size=32):
    """A small random backbone. The backbone's float32 features of an image may differ in
    the last bits with the batch it is in: references use the streamed batches."""
    return FeatureExtractor("resnet18", ["layer1", "layer2"], random_state=0,
                            batch_size=batch_size, device="cpu")


def test_find_images_is_recursive_sorted_and_skips_other_files(folder, tmp_path):
    paths = find_images(folder)
    assert [p.relative_to(folder).as_posix() for p in paths] == sorted(
        [f"{i:03d}.png" for i in range(9)] + ["sub/009.png", "sub/010.png"])
    (tmp_path / ".hidden.png").write_bytes((folder / "000.png").read_bytes())
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(ValueError, match="no images found in"):
        find_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        find_images(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="str or path-like"):
        find_images(3)


def test_read_image_matches_pillow(folder, tmp_path):
    path = folder / "000.png"
    np.testing.assert_array_equal(read_image(path, 20), pil_reference(path, 20))
    grey16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    image = read_image(tmp_path / "grey16.png", 48)
    assert image.shape == (3, 48, 48) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1
    np.testing.assert_array_equal(image[0], image[2])
    # a 16-bit ramp: the largest value is scaled by 1/65535
    assert image.max() == pytest.approx(grey16.max() / 65535, abs=2e-3)


@pytest.mark.parametrize("width, height, step, expected", [
    # (width, height) of the file -> (height, width) read at a short side of 96 px
    (96, 96, 16, (96, 96)),        # square stays square
    (100, 100, 7, (96, 96)),       # whatever the step
    (200, 150, 1, (96, 128)),      # 4:3, exactly 128
    (200, 150, 16, (96, 128)),
    (160, 90, 1, (96, 171)),       # 16:9: 170.67 px
    (160, 90, 16, (96, 176)),      # 96 + 16 * round(74.67 / 16 = 4.67) = 96 + 80
    (160, 90, 32, (96, 160)),      # 96 + 32 * round(2.33) = 96 + 64
    (90, 160, 16, (176, 96)),      # portrait: the height is the long side
    (101, 100, 16, (96, 96)),      # 96.96 px: rounds to the short side
    (112, 100, 16, (96, 112)),     # 107.5 px: 96 + 16 * round(0.72)
])
def test_target_size_keeps_the_aspect_ratio(width, height, step, expected):
    short, long = min(width, height), max(width, height)
    exact = long * 96 / short
    # the hand rule: 96 plus the multiple of the step nearest to the excess
    by_hand = 96 + step * round((exact - 96) / step)
    assert by_hand == max(expected)
    assert streaming.target_size((width, height), 96, keep_aspect=True,
                                 long_side_step=step) == expected


def test_read_image_keeps_the_aspect_ratio_as_pillow_resizes(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(90, 160, 3), dtype=np.uint8)  # 160 x 90 px
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image, size = read_image(tmp_path / "wide.png", 48, keep_aspect=True, long_side_step=16,
                             return_size=True)
    # 48 x 85.3 -> 48 + 16 * round(37.3 / 16 = 2.33) = 80 px wide
    reference = Image.fromarray(pixels).resize((80, 48), Image.BILINEAR)
    np.testing.assert_array_equal(
        image, np.asarray(reference, dtype=np.float32).transpose(2, 0, 1) / 255)
    assert size == (160, 90)
    shapes = [b.shape for b in iter_image_batches([tmp_path / "wide.png"] * 3, 2, 48,
                                                  keep_aspect=True, long_side_step=16)]
    assert shapes == [(2, 3, 48, 80), (1, 3, 48, 80)]
    for bad, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="long_side_step must be"):
            read_image(tmp_path / "wide.png", 48, keep_aspect=True, long_side_step=bad)
        with pytest.raises(error, match="long_side_step must be"):
            iter_image_batches(tmp_path, 2, 48, keep_aspect=True, long_side_step=bad)


def test_read_image_errors(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG")
    with pytest.raises(ImageReadError, match=f"cannot read image {broken}"):
        read_image(broken, 16)
    with pytest.raises(ImageReadError, match="cannot read image"):
        read_image(tmp_path / "missing.png", 16)
    with pytest.raises(ValueError, match="image_size must be at least 1"):
        read_image(broken, 0)
    with pytest.raises(TypeError, match="image_size must be an int"):
        read_image(broken, 16.0)


def test_iter_image_batches_splits_evenly_in_order(folder):
    paths = find_images(folder)
    batches = list(iter_image_batches(folder, batch_size=4, image_size=SIZE))
    assert [len(b) for b in batches] == [4, 4, 3]  # 11 in 3 batches, none a lone image
    stacked = np.concatenate(batches)
    assert stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked, np.stack([pil_reference(p, SIZE) for p in paths]))
    # paths given explicitly, in their order
    again = list(iter_image_batches(paths[::-1], batch_size=20, image_size=SIZE))
    assert len(again) == 1
    np.testing.assert_array_equal(again[0], stacked[::-1])
    with pytest.raises(TypeError, match="folder or a non-empty sequence of image paths"):
        iter_image_batches([], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        iter_image_batches(folder, batch_size=0)


def test_iter_image_batches_reads_lazily(folder, monkeypatch):
    read = []
    original = streaming._read_image

    def counting(path, size):
        read.append(path)
        return original(path, size)

    monkeypatch.setattr(streaming, "_read_image", counting)
    batches = iter_image_batches(folder, batch_size=4, image_size=SIZE)
    assert read == []
    next(batches)
    assert len(read) == 4  # one batch read, not the folder


def test_streamed_padim_equals_fit_on_all_images(folder):
    images = np.stack([pil_reference(p, SIZE) for p in find_images(folder)])
    model = make_pipeline(extractor(batch_size=4),  # the streamed batches: 4, 4, 3
                          PaDiMDetector(n_features=12, random_state=0, device="cpu"))
    whole = clone(model).fit(images)
    assert partial_fit_images(model, folder, batch_size=4, image_size=SIZE) is model
    detector = model[-1]
    assert detector.n_samples_seen_ == 11 and detector.solver_ == "full"
    # the moments are those of all the images' features, by numpy
    features = whole[0].transform(images)[:, detector.feature_indices_]
    positions = features.reshape(11, 12, -1).transpose(2, 0, 1).astype(np.float64)
    np.testing.assert_allclose(detector.mean_, positions.mean(1), rtol=1e-10, atol=1e-12)
    covariance = np.stack([np.cov(p, rowvar=False) for p in positions])
    np.testing.assert_allclose(detector.covariance_, covariance, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(model.score_samples(images), whole.score_samples(images),
                               rtol=1e-9)
    assert detector.calibration_ == "leave-one-out"


@pytest.mark.parametrize("make_source", [
    lambda X: X,  # an array, split into batches of batch_size
    lambda X: list(X),  # a list of images
    lambda X: (batch for batch in np.array_split(X, 3)),  # a generator of batches
])
def test_sources_in_memory(make_source):
    X = load_textures("grass", n_train=9, n_test=1, image_size=SIZE).X_train
    model = make_pipeline(extractor(3), DFMDetector(n_components=2, device="cpu"))
    with warnings.catch_warnings():
        # the first batch of 3 has an in-sample threshold, which the next batches replace:
        # no warning
        warnings.simplefilter("error", CalibrationWarning)
        partial_fit_images(model, make_source(X), batch_size=3)
    whole = make_pipeline(extractor(3), DFMDetector(n_components=2, device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # 9 are too few to cross-fit
        whole.fit(X)
    assert model[-1].n_samples_seen_ == 9
    assert model[-1].calibration_ == "score-then-update"
    np.testing.assert_allclose(model.score_samples(X), whole.score_samples(X), rtol=1e-8)


def test_pooling_step_and_gaussian(folder):
    """Every transformer runs on each batch; an unfitted one is fitted on the first."""
    pool = FunctionTransformer(np.mean, kw_args={"axis": (2, 3)})
    model = make_pipeline(extractor(4), pool, GaussianDetector(device="cpu"))
    partial_fit_images(model, folder, batch_size=5, image_size=SIZE)  # batches 4, 4, 3
    images = np.concatenate(list(iter_image_batches(folder, 5, image_size=SIZE)))
    vectors = model[0].transform(images).mean(axis=(2, 3)).astype(np.float64)
    np.testing.assert_allclose(model[-1].location_, vectors.mean(0), rtol=1e-10)
    assert model.score_samples(images).shape == (11,)


def test_one_batch_in_memory_at_a_time():
    """A generator's next batch is drawn only after partial_fit absorbed the last."""
    X = load_textures("brick", n_train=12, n_test=1, image_size=SIZE).X_train
    events = []

    def batches():
        for i, batch in enumerate(np.array_split(X, 4)):
            events.append(f"read {i}")
            yield batch

    model = make_pipeline(extractor(), PatchCoreDetector(max_bank_size=40, random_state=0,
                                                         device="cpu"))
    detector = model[-1]
    original = detector.partial_fit

    def recording(features):
        events.append(f"fit {len(features)}")
        return original(features)

    detector.partial_fit = recording
    partial_fit_images(model, batches())
    assert events == ["read 0", "fit 3", "read 1", "fit 3", "read 2", "fit 3", "read 3",
                      "fit 3"]
    assert detector.memory_bank_.shape[0] == 40 and detector.n_samples_seen_ == 12


def test_errors(folder, tmp_path):
    detector = PaDiMDetector(device="cpu")
    with pytest.raises(TypeError, match="must be a sklearn.pipeline.Pipeline"):
        partial_fit_images(detector, folder)
    with pytest.raises(TypeError, match="last step of pipeline must be a skanomaly detector"):
        partial_fit_images(make_pipeline(extractor(), FunctionTransformer()), folder)
    model = make_pipeline(extractor(), PaDiMDetector(n_features=4, device="cpu"))
    with pytest.raises(ValueError, match="no images: source gave no batches"):
        partial_fit_images(model, iter([]))
    with pytest.raises(TypeError, match="source must be"):
        partial_fit_images(model, 42)
    with pytest.raises(ValueError, match="no images found"):
        partial_fit_images(model, tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG")
    with pytest.raises(ImageReadError, match=str(broken)):
        partial_fit_images(model, [broken], image_size=SIZE)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        partial_fit_images(model, folder, batch_size=0)


def test_in_sample_threshold_of_a_lone_batch_warns():
    X = load_textures("brick", n_train=3, n_test=1, image_size=SIZE).X_train
    model = make_pipeline(extractor(), DFMDetector(n_components=2, device="cpu"))
    with pytest.warns(CalibrationWarning, match="in-sample"):
        partial_fit_images(model, X, batch_size=8)
    assert model[-1].calibration_ == "in-sample"
