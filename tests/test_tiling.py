"""Tiling at native resolution: the kernels and the tiled AnomalyPipeline.

The reference is tiling by hand: tiles sliced with numpy, the UNTILED pipeline fitted
and run on them as if they were images, its per-tile maps stitched back with numpy
(sum / count, or max), and an image's score the worst of its tiles'. The backbone is
a randomly initialised resnet18 (no weights can be downloaded here).
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.base import clone

from skanomaly import (AnomalyPipeline, PaDiMDetector, PatchCoreDetector,
                       make_anomaly_pipeline)
from skanomaly.base import _quantile_offset
from skanomaly.features import FeatureExtractor
from skanomaly.functional import tile, tile_grid, untile
from skanomaly.functional.tiling import tile_origins

pytest.importorskip("torchvision")


def _extractor():
    return FeatureExtractor("resnet18", ["layer1"], random_state=0, device="cpu",
                            batch_size=7)


DETECTORS = [PaDiMDetector(n_features=12, random_state=0, device="cpu"),
             PatchCoreDetector(coreset_sampling_ratio=0.5, random_state=0, device="cpu")]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # 40 x 60 with 24-px tiles at stride 16: rows at 0, 16; columns at 0, 16, 32, 36
    # (60 - 24 = 36 is not a multiple of 16: the last column ends at the border)
    return rng.random((10, 3, 40, 60), dtype=np.float32)


# ------------------------------------------------------------------ kernels
def _numpy_tiles(X, size, stride):
    rows = tile_origins(X.shape[2], size[0], stride[0])
    cols = tile_origins(X.shape[3], size[1], stride[1])
    tiles = [X[i, :, r:r + size[0], c:c + size[1]]
             for i in range(len(X)) for r in rows for c in cols]
    return np.stack(tiles), [(r, c) for r in rows for c in cols]


def _numpy_untile(maps, grid, image_size, merge):
    n_tiles, (th, tw) = len(grid), maps.shape[-2:]
    out = []
    for image in maps.reshape(-1, n_tiles, th, tw):
        total = np.zeros(image_size)
        count = np.zeros(image_size)
        best = np.full(image_size, -np.inf)
        for m, (r, c) in zip(image, grid):
            total[r:r + th, c:c + tw] += m
            count[r:r + th, c:c + tw] += 1
            best[r:r + th, c:c + tw] = np.maximum(best[r:r + th, c:c + tw], m)
        out.append(total / count if merge == "mean" else best)
    return np.stack(out)


def test_tile_origins_align_the_last_tile_to_the_border():
    assert tile_origins(60, 24, 16) == [0, 16, 32, 36]
    assert tile_origins(64, 32, 32) == [0, 32]
    assert tile_origins(32, 32, 8) == [0]


@given(length=st.integers(1, 200), tile_size=st.integers(1, 200), stride=st.integers(1, 200))
def test_tile_origins_cover_every_pixel_inside_the_image(length, tile_size, stride):
    if tile_size > length or stride > tile_size:
        with pytest.raises(ValueError, match="larger than"):
            tile_origins(length, tile_size, stride)
        return
    origins = tile_origins(length, tile_size, stride)
    covered = np.zeros(length, bool)
    for o in origins:
        covered[o:o + tile_size] = True
    assert covered.all() and origins[0] == 0 and origins[-1] == length - tile_size
    assert all(0 < b - a <= stride for a, b in zip(origins, origins[1:]))


@pytest.mark.parametrize("merge", ["mean", "max"])
def test_tile_and_untile_match_numpy(merge):
    rng = np.random.default_rng(1)
    X = rng.random((3, 2, 23, 31))
    tiles, grid = _numpy_tiles(X, (10, 12), (7, 9))
    got = tile(torch.as_tensor(X), (10, 12), (7, 9))
    np.testing.assert_array_equal(got.numpy(), tiles)
    assert tile_grid((23, 31), (10, 12), (7, 9)) == grid
    maps = rng.random((len(tiles), 10, 12))
    np.testing.assert_allclose(
        untile(torch.as_tensor(maps), (23, 31), (7, 9), merge).numpy(),
        _numpy_untile(maps, grid, (23, 31), merge), rtol=1e-13)


def test_untile_rejects_bad_input():
    with pytest.raises(ValueError, match="merge must be one of"):
        untile(torch.zeros(4, 4, 4), (4, 6), 2, merge="median")
    with pytest.raises(ValueError, match="not a whole number of images"):
        untile(torch.zeros(3, 4, 4), (4, 6), 2)
    with pytest.raises(ValueError, match="image width 6: tile size 8 is larger"):
        tile(torch.zeros(1, 1, 8, 6), 8)


# ------------------------------------------------------------------ pipeline
@pytest.mark.parametrize("merge", ["mean", "max"])
@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_tiled_pipeline_equals_the_untiled_one_on_hand_cut_tiles(detector, merge, images):
    X = images
    X_copy = X.copy()
    tiled = make_anomaly_pipeline(_extractor(), clone(detector), tile_size=24,
                                  tile_stride=16, tile_merge=merge).fit(X)
    np.testing.assert_array_equal(X, X_copy)  # input never mutated

    tiles, grid = _numpy_tiles(X, (24, 24), (16, 16))
    assert len(grid) == 8
    ref = make_anomaly_pipeline(_extractor(), clone(detector)).fit(tiles)
    # the detector saw the same tiles: same fitted state
    for name in ("memory_bank_", "mean_"):
        if hasattr(ref[-1], name):
            np.testing.assert_array_equal(getattr(tiled[-1], name), getattr(ref[-1], name))
    # offset_ per image: from the worst out-of-sample tile score of each image
    tile_normality = ref[-1].__dict__["_device_cache"]["fit_normality"]
    image_normality = tile_normality.reshape(len(X), 8).min(axis=1)
    assert tiled[-1].offset_ == _quantile_offset(image_normality, ref[-1].contamination)

    X_test = X[:3] + 0.0
    X_test[0, :, 5:9, 30:34] = 1.0  # a small bright defect
    scores, maps = tiled.score_and_map(X_test)
    test_tiles, _ = _numpy_tiles(X_test, (24, 24), (16, 16))
    ref_scores, ref_maps = ref.score_and_map(test_tiles)
    np.testing.assert_array_equal(scores, ref_scores.reshape(3, 8).min(axis=1))
    np.testing.assert_allclose(maps, _numpy_untile(ref_maps, grid, (40, 60), merge),
                               rtol=1e-12, atol=1e-12)
    assert scores.shape == (3,) and maps.shape == (3, 40, 60)
    # every method: one result per image, equal to the one pass
    np.testing.assert_array_equal(tiled.score_samples(X_test), scores)
    np.testing.assert_array_equal(tiled.anomaly_map(X_test), maps)
    np.testing.assert_array_equal(tiled.decision_function(X_test),
                                  scores - tiled[-1].offset_)
    np.testing.assert_array_equal(tiled.predict(X_test),
                                  np.where(scores - tiled[-1].offset_ < 0, -1, 1))


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_one_tile_of_the_image_size_is_the_untiled_pipeline(detector, images):
    X = images[:, :, :32, :48]
    plain = make_anomaly_pipeline(_extractor(), clone(detector)).fit(X)
    tiled = make_anomaly_pipeline(_extractor(), clone(detector),
                                  tile_size=(32, 48)).fit(X)
    assert tiled[-1].offset_ == plain[-1].offset_
    for a, b in zip(tiled.score_and_map(X[:4]), plain.score_and_map(X[:4])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tiled.fit_predict(X), plain.fit_predict(X))


def test_tiled_pipeline_scores_images_of_another_size(images):
    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=16).fit(images)
    wide = np.random.default_rng(3).random((2, 3, 30, 70), dtype=np.float32)
    scores, maps = model.score_and_map(wide)
    assert scores.shape == (2,) and maps.shape == (2, 30, 70)
    assert model.anomaly_map(wide, output_size=(15, 35)).shape == (2, 15, 35)


def test_tiled_calibrate_fit_predict_and_pvalues_are_per_image(images):
    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[1]), tile_size=24,
                                  tile_stride=16)
    labels = model.fit_predict(images)
    assert labels.shape == (10,) and set(np.unique(labels)) <= {-1, 1}
    held_out = np.random.default_rng(5).random((9, 3, 40, 60), dtype=np.float32)
    model.calibrate(held_out)
    detector = model[-1]
    assert detector.calibration_ == "held-out"
    assert detector.calibration_scores_.shape == (9,)  # images, not 72 tiles
    assert model.pvalues(held_out[:2]).shape == (2,)
    y = np.array([1] * 7 + [-1] * 2)
    model.calibrate(held_out, y)
    assert model[-1].calibration_ == "labelled-f1"
    from skanomaly import calibrate, pvalues  # the functions reach the pipeline's methods
    calibrate(model, held_out)
    assert model[-1].calibration_ == "held-out"
    assert model[-1].calibration_scores_.shape == (9,)
    np.testing.assert_array_equal(pvalues(model, held_out[:2]), model.pvalues(held_out[:2]))


def test_tiled_partial_fit_streams_tiles_and_thresholds_images(images):
    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[1]), tile_size=24,
                                  tile_stride=16)
    for batch in np.array_split(images, 2):
        model.partial_fit(batch)
    assert model[-1].n_samples_seen_ == 10 * 8  # tiles
    assert model[-1].calibration_ == "score-then-update"
    assert model[-1]._offset_record.shape[0] == 10  # one record per image
    assert "_tiles_per_image" not in model[-1].__dict__
    assert model.score_samples(images[:3]).shape == (3,)
    # PaDiM: one batch is fit, bitwise
    padim = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=16)
    fitted = clone(padim).fit(images)
    padim.partial_fit(images)
    assert padim[-1].offset_ == fitted[-1].offset_
    np.testing.assert_array_equal(padim.score_samples(images[:2]),
                                  fitted.score_samples(images[:2]))


def test_tiled_pipeline_tensors_in_tensors_out(images):
    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=16).fit(torch.as_tensor(images))
    X = torch.as_tensor(images[:2])
    scores, maps = model.score_and_map(X)
    assert isinstance(scores, torch.Tensor) and isinstance(maps, torch.Tensor)
    assert maps.shape == (2, 40, 60) and scores.dtype == torch.float64
    np.testing.assert_array_equal(scores.numpy(), model.score_samples(images[:2]))


def test_tiling_parameters_are_checked(images):
    def pipe(**kw):
        return AnomalyPipeline([("f", _extractor()), ("d", clone(DETECTORS[0]))], **kw)

    with pytest.raises(ValueError, match="tile size 48 is larger than the image"):
        pipe(tile_size=48).fit(images)
    with pytest.raises(ValueError, match="tile_stride 32 is larger than tile_size 24"):
        pipe(tile_size=24, tile_stride=32).fit(images)
    with pytest.raises(ValueError, match="tile_stride is set but tile_size is None"):
        pipe(tile_stride=8).fit(images)
    with pytest.raises(ValueError, match="tile_merge must be one of"):
        pipe(tile_size=24, tile_merge="median").fit(images)
    with pytest.raises(TypeError, match="tile_size must be an int or a pair"):
        pipe(tile_size=2.5).fit(images)
    with pytest.raises(ValueError, match="tiling needs 4-D images"):
        pipe(tile_size=24).fit(images[:, :, 0, 0])
    from sklearn.preprocessing import FunctionTransformer
    three = AnomalyPipeline([("id", FunctionTransformer()), ("f", _extractor()),
                             ("d", clone(DETECTORS[0]))], tile_size=24)
    with pytest.raises(ValueError, match="fit with tile_size needs the fused pipeline"):
        three.fit(images)
    fitted = pipe(tile_size=24).fit(images)
    with pytest.raises(ValueError, match="image height 20: tile size 24 is larger"):
        fitted.score_samples(images[:, :, :20])
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError, match="no pixel threshold"):
        fitted.predict_mask(images[:1])


def test_tiled_pixel_threshold_is_set_on_stitched_maps(images):
    from skanomaly.base import _conformal_rank

    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=16).fit(images)
    held_out = np.random.default_rng(7).random((4, 3, 40, 60), dtype=np.float32)
    model.calibrate_pixels(held_out)
    pixels = np.sort(model.anomaly_map(held_out).ravel())
    threshold = pixels[_conformal_rank(pixels.size, 0.1) - 1]
    assert model[-1].pixel_threshold_ == threshold
    np.testing.assert_array_equal(model.predict_mask(held_out[:2]),
                                  model.anomaly_map(held_out[:2]) > threshold)
    masks = np.zeros((4, 40, 60), bool)
    masks[:2, 10:14, 20:24] = True
    model.calibrate_pixels(held_out, masks)
    assert model[-1].pixel_calibration_ == "labelled-f1"
    assert model.predict_mask(held_out).shape == (4, 40, 60)


def test_tiling_parameters_clone_and_grid_search():
    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=(12, 16), tile_merge="max")
    params = model.get_params(deep=False)
    assert (params["tile_size"], params["tile_stride"], params["tile_merge"]) == \
        (24, (12, 16), "max")
    assert clone(model).set_params(tile_size=32).tile_size == 32


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_exported_tiled_pipeline_tiles_and_stitches(detector, images, tmp_path):
    from skanomaly.export import export, to_torch

    model = make_anomaly_pipeline(_extractor(), clone(detector), tile_size=24,
                                  tile_stride=16).fit(images)
    X = images[:3]
    scores, maps = model.score_and_map(X)
    got_scores, got_maps = to_torch(model)(torch.as_tensor(X))
    np.testing.assert_allclose(got_scores.numpy(), -scores, rtol=1e-5)
    np.testing.assert_allclose(got_maps.numpy(), maps, rtol=1e-5, atol=1e-6)
    ort = pytest.importorskip("onnxruntime")
    meta = export(model, tmp_path / "tiled.onnx")  # default example: the fitted size
    assert meta["tile_size"] == [24, 24] and meta["input_shape"] == [3, 40, 60]
    session = ort.InferenceSession(str(tmp_path / "tiled.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx_scores, onnx_maps = session.run(None, {"input": X})  # batch 3, example's 2
    np.testing.assert_allclose(onnx_scores, -scores, rtol=1e-4)
    np.testing.assert_allclose(onnx_maps, maps, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ images of any shape
def _write_images(folder, sizes):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")


def test_a_folder_of_mixed_sizes_is_read_one_size_per_batch(tmp_path):
    from skanomaly.streaming import iter_image_batches, read_image, target_size

    sizes = [(60, 40)] * 3 + [(50, 40)] * 2 + [(60, 40)]  # (width, height)
    _write_images(tmp_path, sizes)
    native = [b.shape for b in iter_image_batches(tmp_path, batch_size=2, image_size=None)]
    assert native == [(2, 3, 40, 60), (1, 3, 40, 60), (2, 3, 40, 50), (1, 3, 40, 60)]
    aspect = [b.shape for b in iter_image_batches(tmp_path, 8, 20, keep_aspect=True)]
    assert aspect == [(3, 3, 20, 30), (2, 3, 20, 25), (1, 3, 20, 30)]
    square = [b.shape for b in iter_image_batches(tmp_path, 8, 20)]
    assert square == [(6, 3, 20, 20)]  # an int without keep_aspect: squares, as before
    assert read_image(tmp_path / "00.png", (10, 30)).shape == (3, 10, 30)
    assert target_size((30, 90), 20, keep_aspect=True) == (60, 20)
    with pytest.raises(ValueError, match="keep_aspect=True takes an int"):
        read_image(tmp_path / "00.png", (10, 30), keep_aspect=True)


def test_a_tiled_pipeline_streams_a_folder_of_mixed_sizes(tmp_path):
    from skanomaly.streaming import iter_image_batches, partial_fit_images

    _write_images(tmp_path, [(60, 40)] * 4 + [(48, 56)] * 3)
    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[1]), tile_size=24,
                                  tile_stride=16)
    partial_fit_images(model, tmp_path, batch_size=4, image_size=None)
    batches = list(iter_image_batches(tmp_path, 4, image_size=None))
    # 8 tiles of a 40 x 60 image, 3 x 3 of a 56 x 48 one
    assert model[-1].n_samples_seen_ == 4 * 8 + 3 * 9
    for batch in batches:  # each image's map at its own size
        scores, maps = model.score_and_map(batch)
        assert scores.shape == (len(batch),) and maps.shape[1:] == batch.shape[2:]


# ------------------------------------------------------------------ tiles resized (zoom)
def _numpy_bilinear(X, height, width):
    """Bilinear resize of (n, C, h, w) with pixel centres at half-integers (the
    convention of align_corners=False), edges clamped: the reference of enlarging."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, wr = axis(X.shape[2], height)
    c0, c1, wc = axis(X.shape[3], width)
    rows = X[:, :, r0] * (1 - wr)[:, None] + X[:, :, r1] * wr[:, None]
    return rows[..., c0] * (1 - wc) + rows[..., c1] * wc


def test_resize_tiles_enlarges_as_bilinear_and_shrinks_as_pil():
    from PIL import Image

    from skanomaly.functional import resize_tiles

    rng = np.random.default_rng(2)
    X = rng.random((2, 3, 10, 12))
    np.testing.assert_allclose(resize_tiles(torch.as_tensor(X), (25, 36)).numpy(),
                               _numpy_bilinear(X, 25, 36), rtol=1e-12, atol=1e-12)
    # shrinking is antialiased, as PIL's bilinear filter resizes
    big = rng.random((1, 1, 40, 48)).astype(np.float32)
    pil = np.asarray(Image.fromarray(big[0, 0], mode="F").resize((12, 10), Image.BILINEAR))
    np.testing.assert_allclose(resize_tiles(torch.as_tensor(big), (10, 12))[0, 0].numpy(),
                               pil, atol=1e-5)
    half = resize_tiles(torch.as_tensor(big, dtype=torch.float16), (10, 12))  # via float32
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half[0, 0].float().numpy(), pil, atol=2e-3)
    same = torch.as_tensor(X)
    assert resize_tiles(same, (10, 12)) is same
    with pytest.raises(ValueError, match="tiles must be floating"):
        resize_tiles(torch.zeros(2, 10, 12), 20)
    with pytest.raises(ValueError, match="tile_resize must be at least 1"):
        resize_tiles(same, 0)


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_tiled_pipeline_with_tile_resize_equals_the_untiled_one_on_resized_tiles(
        detector, images):
    X = images
    tiled = make_anomaly_pipeline(_extractor(), clone(detector), tile_size=24,
                                  tile_stride=16, tile_resize=40).fit(X)
    tiles, grid = _numpy_tiles(X, (24, 24), (16, 16))
    # the tiles resized by torch's bilinear interpolation, which the test above checks
    # against numpy: the reference pipeline then sees the very same tiles (a coreset
    # selection can turn on the last bit of a feature)

    def zoom(t):
        return torch.nn.functional.interpolate(torch.as_tensor(t), size=(40, 40),
                                               mode="bilinear", align_corners=False).numpy()

    zoomed = zoom(tiles)
    np.testing.assert_allclose(zoomed, _numpy_bilinear(tiles, 40, 40), atol=1e-5)
    ref = make_anomaly_pipeline(_extractor(), clone(detector)).fit(zoomed)
    assert tiled[-1].input_shape_ == ref[-1].input_shape_ == (64, 10, 10)
    for name in ("memory_bank_", "mean_"):
        if hasattr(ref[-1], name):
            np.testing.assert_array_equal(getattr(tiled[-1], name), getattr(ref[-1], name))
    tile_normality = ref[-1].__dict__["_device_cache"]["fit_normality"]
    assert tiled[-1].offset_ == _quantile_offset(tile_normality.reshape(len(X), 8).min(axis=1),
                                                 ref[-1].contamination)

    X_test = X[:3] + 0.0
    X_test[0, :, 5:7, 30:40] = 1.0  # a thin bright scratch
    scores, maps = tiled.score_and_map(X_test)
    test_tiles, _ = _numpy_tiles(X_test, (24, 24), (16, 16))
    # each tile's map at the tile's own size, then stitched
    ref_scores, ref_maps = ref.score_and_map(
        zoom(test_tiles), output_size=24)
    np.testing.assert_array_equal(scores, ref_scores.reshape(3, 8).min(axis=1))
    np.testing.assert_allclose(maps, _numpy_untile(ref_maps, grid, (40, 60), "mean"),
                               rtol=1e-12, atol=1e-12)
    assert maps.shape == (3, 40, 60)
    np.testing.assert_array_equal(tiled.anomaly_map(X_test), maps)
    np.testing.assert_array_equal(tiled.score_samples(X_test), scores)
    # tensors in: the same values, as tensors
    t_scores, t_maps = tiled.score_and_map(torch.as_tensor(X_test))
    np.testing.assert_array_equal(t_scores.numpy(), scores)
    np.testing.assert_array_equal(t_maps.numpy(), maps)


def test_tile_resize_streams_checks_and_equal_size_is_no_resize(images):
    padim = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=16, tile_resize=(32, 40))
    fitted = clone(padim).fit(images)
    assert fitted[-1].input_shape_ == (64, 8, 10)
    padim.partial_fit(images)  # one batch is fit, bitwise
    assert padim[-1].offset_ == fitted[-1].offset_
    np.testing.assert_array_equal(padim.score_samples(images[:2]),
                                  fitted.score_samples(images[:2]))
    held_out = np.random.default_rng(5).random((9, 3, 40, 60), dtype=np.float32)
    assert fitted.calibrate(held_out)[-1].calibration_scores_.shape == (9,)  # images

    plain = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=16).fit(images)
    same = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                 tile_stride=16, tile_resize=24).fit(images)
    for a, b in zip(same.score_and_map(images[:2]), plain.score_and_map(images[:2])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="tile_resize is set but tile_size is None"):
        AnomalyPipeline([("f", _extractor()), ("d", clone(DETECTORS[0]))],
                        tile_resize=32).fit(images)
    with pytest.raises(TypeError, match="tile_resize must be an int or a pair"):
        make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                              tile_resize=1.5).fit(images)


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_exported_pipeline_resizes_its_tiles(detector, images, tmp_path):
    from skanomaly.export import export, to_torch

    model = make_anomaly_pipeline(_extractor(), clone(detector), tile_size=24,
                                  tile_stride=16, tile_resize=40).fit(images)
    X = images[:3]
    scores, maps = model.score_and_map(X)
    got_scores, got_maps = to_torch(model)(torch.as_tensor(X))
    np.testing.assert_allclose(got_scores.numpy(), -scores, rtol=1e-5)
    np.testing.assert_allclose(got_maps.numpy(), maps, rtol=1e-5, atol=1e-6)
    ort = pytest.importorskip("onnxruntime")
    meta = export(model, tmp_path / "zoomed.onnx")
    assert meta["tile_resize"] == [40, 40] and meta["tile_size"] == [24, 24]
    session = ort.InferenceSession(str(tmp_path / "zoomed.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx_scores, onnx_maps = session.run(None, {"input": X})
    np.testing.assert_allclose(onnx_scores, -scores, rtol=1e-4)
    np.testing.assert_allclose(onnx_maps, maps, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ a list of several sizes
#: (height, width) of a list of training images and of test images: with 24-px tiles at
#: stride 16, 8 tiles of 40 x 60, 3 x 3 of 56 x 48, 2 x 1 of 32 x 24, 1 of 24 x 24
MIXED_TRAIN = [(40, 60), (56, 48), (40, 60), (32, 24), (56, 48), (24, 24), (40, 60)]
MIXED_TEST = [(30, 70), (40, 60), (24, 24), (56, 48)]


def _mixed(sizes, seed):
    rng = np.random.default_rng(seed)
    return [rng.random((3, h, w), dtype=np.float32) for h, w in sizes]


def _hand_tiles(images):
    """Every image's tiles cut by hand (numpy), concatenated; each image's grid."""
    cut = [_numpy_tiles(image[None], (24, 24), (16, 16)) for image in images]
    return np.concatenate([tiles for tiles, _ in cut]), [grid for _, grid in cut]


@pytest.mark.parametrize("merge", ["mean", "max"])
@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_tiled_pipeline_fits_a_list_of_images_of_several_sizes(detector, merge):
    """Each image of a list is cut into its own grid of 24-px tiles; all the tiles are
    the training samples: the untiled pipeline fitted on the tiles cut by hand has the
    same state, the threshold is per image, and each test image's score and map are
    the worst of its hand-cut tiles' scores and their maps stitched by hand, at its
    own size."""
    X = _mixed(MIXED_TRAIN, 0)
    X_copy = [x.copy() for x in X]
    tiled = make_anomaly_pipeline(_extractor(), clone(detector), tile_size=24,
                                  tile_stride=16, tile_merge=merge).fit(X)
    for x, x_copy in zip(X, X_copy):
        np.testing.assert_array_equal(x, x_copy)

    tiles, grids = _hand_tiles(X)
    counts = [len(grid) for grid in grids]
    assert counts == [8, 9, 8, 2, 9, 1, 8]
    ref = make_anomaly_pipeline(_extractor(), clone(detector)).fit(tiles)
    assert tiled[-1].n_samples_seen_ == ref[-1].n_samples_seen_ == sum(counts)
    for name in ("memory_bank_", "mean_"):
        if hasattr(ref[-1], name):
            np.testing.assert_array_equal(getattr(tiled[-1], name), getattr(ref[-1], name))
    # offset_ per image: from the worst out-of-sample tile score of each image
    tile_normality = ref[-1].__dict__["_device_cache"]["fit_normality"]
    image_normality = np.minimum.reduceat(tile_normality, np.cumsum([0] + counts[:-1]))
    assert tiled[-1].offset_ == _quantile_offset(image_normality, ref[-1].contamination)
    np.testing.assert_array_equal(
        clone(tiled).fit_predict(X), np.where(image_normality < tiled[-1].offset_, -1, 1))

    X_test = _mixed(MIXED_TEST, 1)
    X_test[1][:, 5:9, 30:34] = 1.0  # a small bright defect
    scores, maps = tiled.score_and_map(X_test)
    test_tiles, test_grids = _hand_tiles(X_test)
    ref_scores, ref_maps = ref.score_and_map(test_tiles)
    start = 0
    assert scores.shape == (4,) and isinstance(maps, list) and len(maps) == 4
    for i, (size, grid) in enumerate(zip(MIXED_TEST, test_grids)):
        stop = start + len(grid)
        assert scores[i] == ref_scores[start:stop].min()
        assert isinstance(maps[i], np.ndarray) and maps[i].shape == size
        np.testing.assert_allclose(maps[i], _numpy_untile(ref_maps[start:stop], grid, size,
                                                          merge)[0], rtol=1e-12, atol=1e-12)
        start = stop
    # every method: one result per image, equal to the one pass
    np.testing.assert_array_equal(tiled.score_samples(X_test), scores)
    for a, b in zip(tiled.anomaly_map(X_test), maps):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tiled.decision_function(X_test),
                                  scores - tiled[-1].offset_)
    np.testing.assert_array_equal(tiled.predict(X_test),
                                  np.where(scores - tiled[-1].offset_ < 0, -1, 1))
    # with output_size, the maps share it: one array, each as the image scored alone
    # (up to the backbone's float32 rounding, which depends on the batch)
    resized = tiled.anomaly_map(X_test, output_size=(20, 30))
    assert resized.shape == (4, 20, 30)
    for image, expected in zip(X_test, resized):
        np.testing.assert_allclose(tiled.anomaly_map(image[None], output_size=(20, 30))[0],
                                   expected, rtol=1e-5)


def test_a_list_of_several_sizes_streams_calibrates_and_keeps_tensors():
    X, X_test = _mixed(MIXED_TRAIN, 0), _mixed(MIXED_TEST, 1)
    padim = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24,
                                  tile_stride=16)
    fitted = clone(padim).fit(X)
    padim.partial_fit(X)  # one batch: the fit, bitwise
    assert padim[-1].offset_ == fitted[-1].offset_
    assert "_tiles_per_image" not in padim[-1].__dict__
    np.testing.assert_array_equal(padim.score_samples(X_test), fitted.score_samples(X_test))
    # held-out images of several sizes: the conformal threshold of their image scores
    held = _mixed(MIXED_TRAIN + MIXED_TEST, 2)
    fitted.calibrate(held)
    assert fitted[-1].calibration_scores_.shape == (len(held),)
    # the ceil(0.9 * 12) = 11th smallest of the 11 images' anomaly scores
    assert fitted[-1].offset_ == -np.sort(-fitted.score_samples(held))[10]
    # pixel threshold over all the pixels of maps of several sizes
    fitted.calibrate_pixels(held)
    pixels = np.concatenate([m.ravel() for m in fitted.anomaly_map(held)])
    k = int(np.ceil((1 - fitted[-1].contamination) * (pixels.size + 1)))
    assert fitted[-1].pixel_threshold_ == np.sort(pixels)[k - 1]
    masks = fitted.predict_mask(X_test)
    for mask, anomaly_map in zip(masks, fitted.anomaly_map(X_test)):
        np.testing.assert_array_equal(mask, anomaly_map > fitted[-1].pixel_threshold_)
    # tensors in, tensors out
    scores, maps = fitted.score_and_map([torch.as_tensor(x) for x in X_test])
    assert isinstance(scores, torch.Tensor) and all(isinstance(m, torch.Tensor) for m in maps)
    np.testing.assert_array_equal(scores.numpy(), fitted.score_samples(X_test))


def test_an_untiled_pipeline_names_a_list_of_several_sizes():
    X = _mixed(MIXED_TRAIN, 0)
    model = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]))
    with pytest.raises(ValueError, match=r"fit: X is a list of images of 4 sizes .*set "
                                         r"tile_size"):
        model.fit(X)
    model.fit(np.stack([x for x in X if x.shape == (3, 40, 60)]))
    with pytest.raises(ValueError, match="score_samples: X is a list of images of 4 sizes"):
        model.score_samples(X)
    with pytest.raises(ValueError, match="anomaly_map: X is a list of images"):
        model.anomaly_map(X)
    tiled = make_anomaly_pipeline(_extractor(), clone(DETECTORS[0]), tile_size=24)
    with pytest.raises(TypeError, match="mixes torch tensors and other arrays"):
        tiled.fit([X[0], torch.as_tensor(X[1])])
