"""Tests of skanomaly.datasets against the raw sources (gzip/csv, scikit-learn, scikit-image)."""

from __future__ import annotations

import csv
import gzip
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from sklearn.datasets import load_breast_cancer, load_digits

from skanomaly.datasets import (
    DEFECT_TYPES,
    load_breast_cancer_outliers,
    load_digits_outliers,
    load_faces,
    load_shuttle,
    load_textures,
)

SHUTTLE_FILE = Path(__file__).parents[1] / "skanomaly" / "data" / "shuttle.csv.gz"
SPLIT_LOADERS = [load_shuttle, load_breast_cancer_outliers, load_digits_outliers, load_faces]
ALL_LOADERS = [*SPLIT_LOADERS, load_textures]


@lru_cache(maxsize=1)
def _shuttle_reference():
    """The vendored file read with the standard library only."""
    with gzip.open(SHUTTLE_FILE, "rt", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [f"f{i}" for i in range(1, 10)] + ["anomaly"]
    table = np.array(rows[1:], dtype=float)
    return table[:, :9], table[:, 9] == 1


def _source(loader):
    """(X, is_outlier) of the raw source of a split loader, for the default arguments."""
    if loader is load_shuttle:
        return _shuttle_reference()
    if loader is load_breast_cancer_outliers:
        data = load_breast_cancer()
        return data.data, data.target == 0
    if loader is load_digits_outliers:
        data = load_digits()
        return data.data, data.target != 0
    faces = skimage.data.lfw_subset()
    return np.repeat(faces[:, None], 3, axis=1), np.arange(200) >= 100


def test_shuttle_file_and_counts():
    assert SHUTTLE_FILE.stat().st_size < 1_000_000
    X, is_outlier = _shuttle_reference()
    assert X.shape == (49_097, 9)
    assert is_outlier.sum() == 3_511
    assert round(100 * is_outlier.mean(), 2) == 7.15
    data = load_shuttle()
    n_rows = len(data.X_train) + len(data.X_test)
    assert n_rows == 49_097 and (data.y_test == -1).sum() == 3_511  # contamination=None
    assert data.X_train.shape[1] == data.X_test.shape[1] == 9
    assert list(data.feature_names) == [f"f{i}" for i in range(1, 10)]


@pytest.mark.parametrize("loader", SPLIT_LOADERS)
def test_split_matches_source_rows_and_labels(loader):
    data = loader()
    X, is_outlier = _source(loader)
    np.testing.assert_allclose(data.X_train, X[data.index_train], rtol=1e-6)
    np.testing.assert_allclose(data.X_test, X[data.index_test], rtol=1e-6)
    assert not is_outlier[data.index_train].any()  # train on normals only
    np.testing.assert_array_equal(data.y_test, np.where(is_outlier[data.index_test], -1, 1))
    # no source row used twice, and none in both train and test
    used = np.r_[data.index_train, data.index_test]
    assert np.unique(used).size == used.size
    # every normal is used: test_size=0.5 takes ceil(n_normal / 2) of them for the test
    n_normal = (~is_outlier).sum()
    assert (data.y_test == 1).sum() == int(np.ceil(n_normal / 2))
    assert len(data.X_train) + (data.y_test == 1).sum() == n_normal


@pytest.mark.parametrize("loader", SPLIT_LOADERS)
def test_split_dtypes_and_shapes(loader):
    data = loader()
    expected = np.float32 if loader is load_faces else np.float64
    for X in (data.X_train, data.X_test):
        assert X.dtype == expected and X.flags.c_contiguous
    assert data.y_test.dtype == np.int64 and data.y_test.shape == (len(data.X_test),)
    assert set(np.unique(data.y_test)) == {-1, 1}
    assert "Licence" in data.DESCR and "Citation" in data.DESCR
    # test set shuffled: not simply all inliers then all outliers
    assert np.any(np.diff(data.y_test) > 0)


def test_faces_images():
    data = load_faces()
    assert data.X_train.shape[1:] == (3, 25, 25)
    assert 0.0 <= data.X_test.min() and data.X_test.max() <= 1.0
    np.testing.assert_array_equal(data.X_test[:, 0], data.X_test[:, 2])
    assert (data.index_train < 100).all()


@pytest.mark.parametrize(
    ("loader", "contamination"),
    [(loader, c) for loader in SPLIT_LOADERS for c in (0.05, 0.1, 0.5) if c < 0.5 or
     loader is not load_shuttle],  # shuttle has too few outliers for 50 %
)
def test_contamination_sets_outlier_fraction(loader, contamination):
    data = loader(contamination=contamination, test_size=0.4)
    n_inliers = (data.y_test == 1).sum()
    n_outliers = (data.y_test == -1).sum()
    assert n_outliers == round(contamination * n_inliers / (1 - contamination))
    assert n_outliers / len(data.y_test) == pytest.approx(contamination, abs=0.01)


def test_digits_normal_digit():
    digits = load_digits()
    data = load_digits_outliers(normal_digit=7, contamination=None)
    assert (digits.target[data.index_train] == 7).all()
    outliers = data.index_test[data.y_test == -1]
    assert set(digits.target[outliers]) == set(range(10)) - {7}
    assert len(outliers) == (digits.target != 7).sum()


@pytest.mark.parametrize("loader", ALL_LOADERS)
def test_deterministic_local_randomness(loader):
    global_state = np.random.get_state()
    first, again, other = loader(), loader(random_state=0), loader(random_state=1)
    assert np.random.get_state()[1].tolist() == global_state[1].tolist()  # untouched
    for key in ("X_train", "X_test", "y_test"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first.X_test, other.X_test)
    assert not np.array_equal(first.X_train, other.X_train)


@pytest.mark.parametrize("loader", ALL_LOADERS)
def test_loads_fast(loader):
    loader()  # warm the imports and the file cache
    # CPU time of this process, not wall time: under pytest-xdist (or any other load)
    # the cores are shared, and waiting for them is not the loader's cost
    start = time.process_time()
    loader()
    assert time.process_time() - start < 2.0


@pytest.mark.parametrize("loader", SPLIT_LOADERS)
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_size": 0.0}, ValueError, "test_size"),
        ({"test_size": 1.0}, ValueError, "test_size"),
        ({"test_size": 0.99999}, ValueError, "no normal sample for training"),
        ({"test_size": "half"}, TypeError, "test_size"),
        ({"contamination": 1.0}, ValueError, "contamination"),
        ({"contamination": 0.0}, ValueError, "contamination"),
        ({"contamination": 0.99}, ValueError, "outliers"),
        ({"contamination": 1e-6}, ValueError, "outliers"),
    ],
)
def test_split_errors(loader, kwargs, error, match):
    with pytest.raises(error, match=match):
        loader(**kwargs)


@pytest.mark.parametrize(
    ("digit", "error"), [(10, ValueError), (-1, ValueError), (1.0, TypeError), ("3", TypeError)]
)
def test_digits_bad_normal_digit(digit, error):
    with pytest.raises(error, match="normal_digit"):
        load_digits_outliers(normal_digit=digit)


# ---------------------------------------------------------------- textures


@pytest.mark.parametrize(("texture", "image_size"), [("brick", 64), ("grass", 32),
                                                     ("gravel", 128)])
def test_textures_masks_and_clean_crops(texture, image_size):
    n_test = 30
    data = load_textures(texture, n_train=10, n_test=n_test, image_size=image_size)
    s = image_size
    assert data.X_train.shape == (10, 3, s, s) and data.X_test.shape == (n_test, 3, s, s)
    assert data.X_train.dtype == data.X_test.dtype == np.float32
    assert data.masks_test.shape == (n_test, s, s) and data.masks_test.dtype == bool
    assert 0.0 <= data.X_test.min() and data.X_test.max() <= 1.0
    grey = getattr(skimage.data, texture)() / 255.0
    # train crops are exact grey crops from the top half; test crops from the bottom half
    for image, (r, c) in zip(data.X_train, data.origin_train):
        assert r + s <= 256
        np.testing.assert_allclose(image, np.broadcast_to(grey[r:r + s, c:c + s], (3, s, s)),
                                   atol=1e-6)
    assert (data.origin_test[:, 0] >= 256).all() and (data.origin_test + s <= 512).all()
    defective = data.y_test == -1
    np.testing.assert_array_equal(data.masks_test.any(axis=(1, 2)), defective)
    np.testing.assert_array_equal(data.defect_type_test == "good", ~defective)
    assert (data.y_test == 1).sum() == n_test // 2
    for image, mask, (r, c) in zip(data.X_test, data.masks_test, data.origin_test):
        clean = np.broadcast_to(grey[r:r + s, c:c + s], (3, s, s))
        changed = np.abs(image - clean).max(axis=0) > 1e-6
        assert not (changed & ~mask).any()  # identical outside the mask
        if mask.any():
            assert changed[mask].mean() > 0.5
            assert np.abs(image - clean).max(axis=0)[mask].mean() > 0.02


def test_textures_defect_types_balanced_and_coloured_blotch():
    data = load_textures(n_test=60, defect_fraction=0.5)
    kinds, counts = np.unique(data.defect_type_test, return_counts=True)
    assert dict(zip(kinds, counts)) == {"good": 30, **{k: 10 for k in DEFECT_TYPES}}
    grey_pixels = np.ptp(data.X_test, axis=1) == 0  # R = G = B
    for kind, mask, grey in zip(data.defect_type_test, data.masks_test, grey_pixels):
        assert (grey[mask] == 0).all() if kind == "blotch" else grey.all()


def test_textures_calibration_crops_beside_the_test_crops():
    s = 32
    plain = load_textures("grass", n_train=10, n_test=8, image_size=s)
    data = load_textures("grass", n_train=10, n_test=8, image_size=s, n_calibration=12)
    for name in ("X_train", "X_test", "y_test", "masks_test", "origin_train", "origin_test"):
        np.testing.assert_array_equal(data[name], plain[name])  # drawn last
    assert plain.X_calibration.shape == (0, 3, s, s) and plain.origin_calibration.shape == (0, 2)
    assert data.X_calibration.shape == (12, 3, s, s) and data.X_calibration.dtype == np.float32
    grey = skimage.data.grass() / 255.0
    # clean crops from the bottom half, as the test crops: no training pixel
    assert (data.origin_calibration[:, 0] >= 256).all()
    assert (data.origin_calibration + s <= 512).all()
    for image, (r, c) in zip(data.X_calibration, data.origin_calibration):
        np.testing.assert_allclose(image, np.broadcast_to(grey[r:r + s, c:c + s], (3, s, s)),
                                   atol=1e-6)
    assert len(np.unique(data.origin_calibration, axis=0)) > 1
    assert "12 normal calibration crops" in data.DESCR


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_textures_defect_fraction_extremes(fraction):
    data = load_textures(n_train=2, n_test=7, defect_fraction=fraction)
    assert (data.y_test == (-1 if fraction else 1)).all()
    assert data.masks_test.any(axis=(1, 2)).all() == bool(fraction)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"texture": "wood"}, ValueError, "unknown texture 'wood'"),
        ({"image_size": 8}, ValueError, "image_size"),
        ({"image_size": 300}, ValueError, "image_size"),
        ({"image_size": 64.0}, TypeError, "image_size"),
        ({"n_train": 0}, ValueError, "n_train"),
        ({"n_test": 0}, ValueError, "n_test"),
        ({"n_calibration": -1}, ValueError, "n_calibration"),
        ({"n_calibration": 2.0}, TypeError, "n_calibration"),
        ({"defect_fraction": 1.5}, ValueError, "defect_fraction"),
    ],
)
def test_textures_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_textures(**kwargs)
