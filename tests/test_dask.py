"""Fitting and scoring on dask arrays: a 2-process LocalCluster, data made on the workers.

References are the numpy fits of the same data (the dask array computed to numpy in the
test only) and the detectors' own numpy scoring.
"""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from skanomaly import (  # noqa: E402
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)
from skanomaly._dask import _scheduler  # noqa: E402
from skanomaly.datasets import load_digits_outliers  # noqa: E402
from skanomaly.metrics import image_auroc  # noqa: E402


def _maps(seed, n, chunk, shape=(6, 4, 4), draw=None):
    """Correlated feature maps, generated block by block where the array is computed.

    ``seed`` fixes the distribution (the channel mixing) and, unless ``draw`` is given,
    the samples.
    """
    rng = da.random.default_rng(seed if draw is None else draw)
    mix = np.random.default_rng(seed).normal(size=(shape[0], shape[0]))
    x = rng.standard_normal((n, *shape), chunks=(chunk, *shape))
    return da.einsum("nchw,cd->ndhw", x, mix) + 2.0


def _vectors(seed, n, chunk, d=6):
    rng = da.random.default_rng(seed)
    mix = np.random.default_rng(seed).normal(size=(d, d))
    return rng.standard_normal((n, d), chunks=(chunk, d)) @ mix + 3.0


def _close(a, b, rtol=1e-8, name=""):
    """``a == b`` to ``rtol``; a covariance to ``rtol`` of its largest entry, since one
    derived from a factor (a one-shot PaDiM fit keeps no scatter) is exact to rounding
    of that size, not entry by entry (an exact 0 may come back as 1e-18)."""
    a, b = np.asarray(a), np.asarray(b)
    atol = rtol * np.abs(b).max() if name == "covariance_" and b.size else 0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------ default scheduler (no Client): first
def test_default_scheduler_pipeline_with_feature_extractor():
    """No Client: dask's default scheduler; images through FeatureExtractor -> PaDiM."""
    from sklearn.pipeline import make_pipeline

    from skanomaly.features import FeatureExtractor

    assert _scheduler() is None
    images = da.random.default_rng(3).random((24, 3, 32, 32), chunks=(7, 3, 32, 32))
    images = images.astype(np.float32)
    model = make_pipeline(FeatureExtractor("resnet18", layers=["layer1"], weights=None,
                                           random_state=0, device="cpu"),
                          PaDiMDetector(n_features=8, random_state=0, device="cpu"))
    model.fit(images)
    features = model[0].transform(images)
    assert isinstance(features, da.Array)
    numpy_images = images.compute()
    _close(features.compute(), model[0].transform(numpy_images), rtol=0)
    reference = PaDiMDetector(n_features=8, random_state=0, device="cpu").fit(
        model[0].transform(numpy_images))
    for name in ("mean_", "covariance_", "feature_indices_"):
        _close(getattr(model[-1], name), getattr(reference, name), name=name)
    scores = model.score_samples(images)
    assert isinstance(scores, da.Array)
    _close(scores.compute(), reference.score_samples(model[0].transform(numpy_images)))


def test_one_block_is_the_numpy_fit_and_small_blocks_are_merged():
    from skanomaly._dask import _by_samples

    X = _maps(6, 40, 40)
    det, reference = (DFMDetector(n_components=3, device="cpu").fit(Z)
                      for Z in (X, X.compute()))
    _close(det.components_, reference.components_, rtol=0)
    assert (det.offset_, det.calibration_) == (reference.offset_, reference.calibration_)
    ragged = da.ones((34, 3), chunks=((1, 30, 1, 1, 1), (3,)))
    assert _by_samples(ragged, 2).chunks == ((31, 3), (3,))


def test_max_bank_size_and_reservoir_bounds_hold_after_merges():
    X = _maps(7, 80, 10).astype(np.float32)
    bank = PatchCoreDetector(max_bank_size=40, random_state=0, device="cpu").fit(X)
    assert bank.memory_bank_.shape == (40, 6)
    kde = DFKDEDetector(n_components=3, max_training_points=30, random_state=0,
                        device="cpu").fit(X)
    assert kde.dataset_.shape == (30, 3) and kde.n_samples_seen_ == 80
    assert len(np.unique(kde.kde_indices_)) == 30 and kde.kde_indices_.max() < 80
    vectors = kde._vectors(torch.as_tensor(X.compute())).numpy()
    np.testing.assert_array_equal(kde._reservoir, vectors[kde.kde_indices_])


def test_threshold_fallbacks(monkeypatch):
    """No exact leave-one-out scores: cross-fit over blocks; no fold scores: in-sample."""
    from skanomaly.base import CalibrationWarning

    X = _vectors(8, 200, 40)

    def no_loo(self, X):
        raise ValueError("singular leave-one-out model")

    with monkeypatch.context() as m:
        m.setattr(GaussianDetector, "_leave_one_out", no_loo)
        det = GaussianDetector(device="cpu").fit(X)
    assert det.calibration_ == "cross-fit"
    reference = GaussianDetector(device="cpu").fit(X.compute())
    _close(det.covariance_, reference.covariance_)

    score = DFMDetector._score

    def only_the_final_model_scores(self, X):
        if self.n_samples_seen_ < 200:
            raise ValueError("beyond the float range")
        return score(self, X)

    monkeypatch.setattr(DFMDetector, "_score", only_the_final_model_scores)
    with pytest.warns(CalibrationWarning, match="cross-fit over the blocks"):
        det = DFMDetector(n_components=3, device="cpu").fit(X)
    assert det.calibration_ == "in-sample"
    normality = det.score_samples(X.compute())  # of the training samples: in-sample
    assert det.offset_ == pytest.approx(np.percentile(normality, 10.0), rel=1e-12)


def test_import_does_not_import_dask():
    code = "import sys, skanomaly; print(any(m.split('.')[0] == 'dask' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------- on a LocalCluster
@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


EXACT = [
    ("gaussian", lambda: GaussianDetector(device="cpu"),
     ("location_", "covariance_", "covariance_cholesky_", "shrinkage_")),
    ("gaussian-empirical", lambda: GaussianDetector(shrinkage=None, device="cpu"),
     ("location_", "covariance_")),
    ("padim", lambda: PaDiMDetector(n_features=5, random_state=0, device="cpu"),
     ("mean_", "covariance_", "precision_cholesky_", "feature_indices_")),
    ("dfm", lambda: DFMDetector(n_components=4, device="cpu"),
     ("mean_", "components_", "explained_variance_", "singular_values_")),
    ("dfm-nll", lambda: DFMDetector(n_components=3, score_type="nll", device="cpu"),
     ("mean_", "components_", "gaussian_covariance_")),
]


@pytest.mark.parametrize("make, attributes", [e[1:] for e in EXACT], ids=[e[0] for e in EXACT])
def test_fit_on_cluster_equals_numpy_fit(client, make, attributes):
    vectors = isinstance(make(), GaussianDetector)
    X = _vectors(0, 300, 40) if vectors else _maps(0, 150, 40)  # 40 rows: a last block of 20 / 30
    det = make().fit(X)
    X_np = X.compute()
    reference = make().fit(X_np)
    assert det.n_samples_seen_ == reference.n_samples_seen_ == X.shape[0]
    for name in attributes:
        _close(getattr(det, name), getattr(reference, name), name=name)
    _close(det.score_samples(X_np), reference.score_samples(X_np))
    if det.calibration_ == "leave-one-out":  # the same exact leave-one-out scores as fit
        assert reference.calibration_ == "leave-one-out"
        _close(det.offset_, reference.offset_)
    else:  # folds of blocks
        assert det.calibration_ == "cross-fit"
        flagged = (det.predict(_maps(0, 400, 400, draw=1).compute()) == -1).mean()
        assert 0.0 < flagged < 0.3


def test_fit_predict_on_cluster(client):
    # one block (the worker's own fit, pickled back) and several (leave-one-out scores
    # per block): the labels of the numpy fit_predict
    X = _vectors(3, 200, 200)
    expected = GaussianDetector(device="cpu").fit_predict(X.compute())
    assert (expected == -1).sum() == 20
    for chunk in (200, 60):
        labels = GaussianDetector(device="cpu").fit_predict(X.rechunk(chunk))
        assert isinstance(labels, np.ndarray)
        np.testing.assert_array_equal(labels, expected)


def test_scoring_a_dask_array_equals_numpy_scoring(client):
    X = _maps(2, 90, 30)
    X_np = X.compute()
    det = PaDiMDetector(n_features=4, random_state=0, device="cpu").fit(X_np)
    queries = _maps(5, 50, 12)  # chunks 12, 12, 12, 12, 2
    queries_np = queries.compute()
    for method, kwargs in [("score_samples", {}), ("decision_function", {}),
                           ("predict", {}), ("anomaly_map", {}),
                           ("anomaly_map", {"output_size": 16})]:
        lazy = getattr(det, method)(queries, **kwargs)
        assert isinstance(lazy, da.Array), method
        expected = getattr(det, method)(queries_np, **kwargs)
        assert lazy.shape == expected.shape and lazy.dtype == expected.dtype
        np.testing.assert_array_equal(lazy.compute(), expected)  # batch-invariant: bitwise
    calibrated = PaDiMDetector(n_features=4, random_state=0, device="cpu").fit(X_np)
    assert calibrated.calibrate(queries).offset_ == det.calibrate(queries_np).offset_


@pytest.mark.parametrize("normal_digit", [3, 8])
@pytest.mark.parametrize("make", [
    lambda: PatchCoreDetector(coreset_sampling_ratio=0.3, random_state=0, device="cpu"),
    lambda: DFKDEDetector(n_components=8, random_state=0, device="cpu"),
], ids=["patchcore", "dfkde"])
def test_same_ranking_quality_as_numpy_fit(client, make, normal_digit):
    data = load_digits_outliers(normal_digit=normal_digit)
    det = make().fit(da.from_array(data.X_train, chunks=25))
    reference = make().fit(data.X_train)
    assert det.n_samples_seen_ == data.X_train.shape[0]
    ours = image_auroc(data.y_test, -det.score_samples(data.X_test))
    theirs = image_auroc(data.y_test, -reference.score_samples(data.X_test))
    assert abs(ours - theirs) <= 0.01, (ours, theirs)
    assert det.calibration_ == ("leave-one-image-out" if isinstance(det, PatchCoreDetector)
                                else "cross-fit")


def test_patchcore_bank_numbering_is_global(client):
    X = _maps(4, 60, 15).astype(np.float32)
    det = PatchCoreDetector(random_state=0, device="cpu").fit(X)
    X_np = X.compute()
    patches = det._patches(torch.as_tensor(X_np)).numpy()
    np.testing.assert_array_equal(det.memory_bank_, patches[det.coreset_indices_])
    np.testing.assert_array_equal(det.bank_images_, det.coreset_indices_ // 16)
    assert len(np.unique(det.bank_images_ // 15)) == 4  # entries from every block


def test_bad_block_raises_the_detectors_error(client):
    X = _vectors(0, 100, 25)
    X = da.where(da.arange(100)[:, None] == 70, np.nan, X)
    with pytest.raises(ValueError, match="NaN"):
        GaussianDetector(device="cpu").fit(X)
    with pytest.raises(ValueError, match="could not be fitted on their own"):
        GaussianDetector(shrinkage=None, device="cpu").fit(_vectors(0, 100, 4))  # n <= d
    with pytest.raises(ValueError, match="woodbury"):
        PaDiMDetector(solver="woodbury", device="cpu").fit(_maps(0, 40, 10))
    det = GaussianDetector(device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        det.fit(X)
    assert not hasattr(det, "offset_") and not hasattr(det, "location_")  # left unfitted


def _peak_rss_during(fn):
    psutil = pytest.importorskip("psutil")
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    base = process.memory_info().rss
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return peak[0] - base


def test_client_memory_does_not_grow_with_the_data(client):
    """The client never holds X: its peak RSS grows far less than the larger data's size."""
    d, chunk = 64, 10_000

    def fit(n):
        X = da.random.default_rng(7).standard_normal((n, d), chunks=(chunk, d))
        GaussianDetector(device="cpu").fit(X)

    fit(2 * chunk)  # warm up: imports, first tasks
    small = _peak_rss_during(lambda: fit(2 * chunk))
    large = _peak_rss_during(lambda: fit(20 * chunk))
    nbytes = 20 * chunk * d * 8  # 102 MB of float64
    # the per-sample scores (8 bytes a sample) do come to the client; the data do not
    assert large - small < 0.25 * nbytes, (small, large, nbytes)
