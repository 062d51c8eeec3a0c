"""partial_fit of PatchCore, DFM and DFKDE: the streaming contract and independent references.

Contract (every detector): a first partial_fit is fit; a failed call leaves the state as it
was; streams are reproducible and survive pickling; scores stay batch-invariant; offset_
is set by score-then-update. References: fit on all the data (DFM, DFKDE within
max_training_points), scikit-learn's PCA and scipy's KDE, the k-center kernel applied by
hand (PatchCore's merge-and-reduce) and brute-force covering radii.
"""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from skanomaly import DFKDEDetector, DFMDetector, PatchCoreDetector
from skanomaly.functional import k_center_greedy

from _streams import correlated_vectors, low_rank_maps

warnings.filterwarnings("ignore", message=".*too few.*")  # tiny first batches in-sample


_maps, _vectors = low_rank_maps, correlated_vectors


CASES = {
    "patchcore": (lambda: PatchCoreDetector(max_bank_size=40, random_state=0, device="cpu"),
                  _maps),
    "dfm": (lambda: DFMDetector(n_components=5, pooling_kernel_size=2, device="cpu"), _maps),
    "dfm-nll": (lambda: DFMDetector(n_components=3, score_type="nll", device="cpu"), _maps),
    "dfkde": (lambda: DFKDEDetector(n_components=3, max_training_points=50, random_state=0,
                                    device="cpu"), _vectors),
}
cases = pytest.mark.parametrize("name", list(CASES))


def _stream(detector, X, cuts):
    for batch in np.split(X, cuts):
        detector.partial_fit(batch)
    return detector


def _state(detector):
    """Every instance attribute but the device cache, for exact comparisons."""
    return {k: v for k, v in detector.__dict__.items() if k != "_device_cache"}


def _assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        va, vb = sa[key], sb[key]
        if key == "_model_as_it_stood":  # the model that scores the batches to come
            _assert_same_state(va, vb)
        elif isinstance(va, (tuple, list)):  # factorised moments, buffered batches
            assert len(va) == len(vb)
            for x, y in zip(va, vb):
                np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            np.testing.assert_array_equal(va, vb, err_msg=key)


# ---------------------------------------------------------------- the contract
@cases
def test_first_partial_fit_is_fit(name):
    make, data = CASES[name]
    X, Q = data(80), data(10, seed=1)
    streamed, fitted = make().partial_fit(X), make().fit(X)
    _assert_same_state(streamed, fitted)
    np.testing.assert_array_equal(streamed.score_samples(Q), fitted.score_samples(Q))


@cases
def test_failed_partial_fit_leaves_the_state_unchanged(name, monkeypatch):
    make, data = CASES[name]
    X = data(90)
    det = _stream(make(), X[:60], [30])
    reference = copy.deepcopy(det)
    bad = X[60:].copy()
    bad[3].flat[2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        det.partial_fit(bad)
    with pytest.raises(ValueError, match="features|shape"):
        det.partial_fit(X[60:].reshape(30, -1)[:, :5])
    # a failure after the batch was absorbed (the model already updated) rolls back too
    with monkeypatch.context() as m:
        m.setattr(type(det), "_record_scores",
                  lambda *args: (_ for _ in ()).throw(ValueError("late failure")))
        with pytest.raises(ValueError, match="late failure"):
            det.partial_fit(X[60:])
    _assert_same_state(det, reference)
    # ... and the stream goes on as if the failed calls had not happened
    det.partial_fit(X[60:])
    reference.partial_fit(X[60:])
    _assert_same_state(det, reference)


@cases
def test_failed_first_partial_fit_leaves_it_unfitted(name):
    make, data = CASES[name]
    det = make()
    with pytest.raises(ValueError, match="NaN|2 samples"):
        det.partial_fit(np.full_like(data(1), np.nan) if name != "dfkde" else data(1))
    assert not hasattr(det, "n_features_in_") and not hasattr(det, "offset_")
    det.partial_fit(data(40))
    assert det.n_samples_seen_ == 40


@cases
def test_streams_are_reproducible_and_survive_pickling(name):
    make, data = CASES[name]
    X, Q = data(120), data(10, seed=1)
    a = _stream(make(), X, [40, 80])
    b = make().partial_fit(X[:40])
    b = pickle.loads(pickle.dumps(b))
    b = _stream(b, X[40:], [40])
    _assert_same_state(a, b)
    np.testing.assert_array_equal(a.score_samples(Q), b.score_samples(Q))
    assert a.n_samples_seen_ == 120


@cases
def test_scores_after_streaming_are_batch_invariant(name):
    make, data = CASES[name]
    det = _stream(make(), data(90), [30, 60])
    Q = data(13, seed=2)
    whole = det.score_samples(Q)
    np.testing.assert_array_equal(np.concatenate([det.score_samples(Q[i:i + 1])
                                                  for i in range(len(Q))]), whole)
    np.testing.assert_array_equal(det.score_samples(Q[::-1].copy()), whole[::-1])


@cases
def test_offset_is_score_then_update(name):
    # four equal batches: at the last call the model had seen 3 batches, so the scores
    # kept are those taken by models that saw >= 1.5 batches: batches 3 and 4, each scored
    # by a copy of the model before it absorbed them
    # (finalize after each call: the model every batch meets is up to date)
    make, data = CASES[name]
    X = data(160)
    det = make().partial_fit(X[:40])
    first_method = det.calibration_
    before = []
    for batch in np.split(X[40:], 3):
        before.append(-copy.deepcopy(det).score_samples(batch))
        det.partial_fit(batch).finalize()
    assert first_method in ("leave-one-image-out", "cross-fit", "leave-one-out")
    assert det.calibration_ == "score-then-update"
    expected = np.percentile(-np.concatenate(before[1:]), 100 * det.contamination)
    assert det.offset_ == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # calibrate overrides it; the next partial_fit goes back to score-then-update
    det.calibrate(data(30, seed=3))
    assert det.calibration_ == "held-out"
    det.partial_fit(data(20, seed=4))
    assert det.calibration_ == "score-then-update"


@cases
def test_deferred_stream_scores_each_batch_with_the_model_of_the_last_refresh(name):
    # without reads, a batch meets the model as of the last refresh (the buffer's), and
    # offset_ is the same record's quantile; a deferred model then scores exactly as one
    # refreshed by finalize, by an attribute read or by a pickle round trip
    make, data = CASES[name]
    X, Q = data(200), data(9, seed=3)
    det = make().partial_fit(X[:20])
    scored = []
    for batch in np.split(X[20:], 9):
        model = copy.copy(det.__dict__.get("_model_as_it_stood", det))
        n_model = model.n_samples_seen_
        scored.append((-model.score_samples(batch), n_model))
        det.partial_fit(batch)
    keep = scored[-1][1] / 2
    record = np.concatenate([s for s, n in scored if n >= keep])
    if scored[0][1] >= keep:  # the first batch's out-of-sample scores count too
        record = None
    twins = [copy.deepcopy(det) for _ in range(3)]
    twins[0].finalize()
    getattr(twins[1], det._deferred[0])  # a read refreshes
    twins[2] = pickle.loads(pickle.dumps(twins[2]))
    assert all("_stale" not in vars(twin) for twin in twins[:2])
    # a pickle keeps what was deferred as it was
    assert ("_stale" in vars(twins[2])) == ("_stale" in vars(det))
    for twin in twins:
        np.testing.assert_array_equal(twin.score_samples(Q), det.score_samples(Q))
        assert twin.offset_ == det.offset_
    assert det.calibration_ == "score-then-update"
    if record is not None:
        expected = np.percentile(-record, 100 * det.contamination)
        assert det.offset_ == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_offset_record_is_bounded_to_the_latest_scores():
    X = _vectors(6010, d=5)
    det = DFMDetector(n_components=3, device="cpu").partial_fit(X[:10])
    det.partial_fit(X[10:3010])  # scored by a model of 10 samples: dropped next
    model = copy.deepcopy(det)
    det.partial_fit(X[3010:])
    latest = model.score_samples(X[3010:])[-2048:]
    assert det.offset_ == pytest.approx(np.percentile(latest, 10), rel=1e-12)


# ------------------------------------------------------------------ PatchCore
def _patches(X, p=3):
    """p x p zero-padded means (torch.nn.AvgPool2d(p, 1, p // 2)), (N * H * W, C) float32."""
    pooled = torch.nn.functional.avg_pool2d(torch.as_tensor(X, dtype=torch.float32), p, 1,
                                            p // 2)
    return pooled.permute(0, 2, 3, 1).reshape(-1, X.shape[1])


def _covering_radius(points, bank):
    """Largest distance of a point to its nearest bank entry, brute force in float64."""
    points, bank = np.asarray(points, np.float64), np.asarray(bank, np.float64)
    d2 = (points**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * points @ bank.T
    return float(np.sqrt(np.maximum(d2, 0).min(1).max()))


def test_patchcore_bank_is_bounded_and_numbered_across_batches():
    X = _maps(100)
    det = PatchCoreDetector(max_bank_size=30, random_state=0, device="cpu")
    for i, batch in enumerate(np.split(X, 10), start=1):
        det.partial_fit(batch)
        assert det.memory_bank_.shape[0] == min(30, int(0.1 * 16 * 10 * i))
        assert det.n_samples_seen_ == 10 * i
    rows = det.coreset_indices_
    assert len(np.unique(rows)) == len(rows) and rows.max() < 100 * 16
    np.testing.assert_array_equal(det.memory_bank_, _patches(X)[rows].numpy())
    np.testing.assert_array_equal(det.bank_images_, rows // 16)
    assert det.bank_images_.max() >= 50  # later images made it into the bank


def test_patchcore_merge_and_reduce_is_k_center_by_hand():
    # after a first batch, one call and a read of the bank: one k-center of the union of
    # the bank and the batch's patches, from the generator the stream seeded, in the
    # stream's metric (the batch is buffered, not reduced on its own)
    X = np.random.default_rng(0).normal(size=(12, 128, 3, 3)).astype(np.float32)
    det = PatchCoreDetector(coreset_sampling_ratio=0.25, max_bank_size=20, random_state=4,
                            device="cpu").partial_fit(X[:6])
    bank, rows = torch.as_tensor(det.memory_bank_), det.coreset_indices_
    assert det._projection is not None  # the JL dimension is below 128 channels
    projection = torch.as_tensor(det._projection)
    generator = torch.Generator().manual_seed(det._next_seed)
    det.partial_fit(X[6:])

    batch = _patches(X[6:])
    budget = 20  # min(max_bank_size, int(0.25 * 12 * 9))
    union = torch.cat([bank, batch])
    keep = k_center_greedy(union, budget, generator=generator, projection=projection)
    np.testing.assert_array_equal(det.memory_bank_, union[keep].numpy())
    union_rows = np.concatenate([rows, 6 * 9 + np.arange(54)])
    np.testing.assert_array_equal(det.coreset_indices_, union_rows[keep.numpy()])


def test_patchcore_full_ratio_keeps_every_patch_in_order():
    X = _maps(30)
    det = _stream(PatchCoreDetector(coreset_sampling_ratio=1.0, device="cpu"), X, [7, 19])
    fitted = PatchCoreDetector(coreset_sampling_ratio=1.0, device="cpu").fit(X)
    np.testing.assert_array_equal(det.memory_bank_, fitted.memory_bank_)
    np.testing.assert_array_equal(det.coreset_indices_, np.arange(30 * 16))


def test_patchcore_streamed_bank_covers_clusters_seen_in_any_batch():
    # 12 tight clusters far apart, each present in one batch only (the first ones long
    # before the end): a bank of 24 must keep a centre within the clusters' width of
    # every point, as one-shot greedy does
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 5)) * 50.0
    X = np.concatenate([c + rng.normal(size=(40, 5)) for c in centres]).astype(np.float32)
    det = _stream(PatchCoreDetector(max_bank_size=24, patch_size=1, random_state=0,
                                    device="cpu"), X, range(40, 480, 40))
    one = PatchCoreDetector(max_bank_size=24, patch_size=1, random_state=0,
                            device="cpu").fit(X)
    r_stream = _covering_radius(X, det.memory_bank_)
    r_one = _covering_radius(X, one.memory_bank_)
    width = max(_covering_radius(X[i:i + 40], centres[i // 40][None]) for i in range(0, 480, 40))
    assert r_one < 2 * width and r_stream < 2 * width < 50.0


def test_patchcore_streamed_covering_radius_is_close_to_one_shot():
    # digits, 64 features, batches of 100: measured 1.09-1.12 on average over seeds
    X = load_digits().data.astype(np.float32)
    ratios = []
    for seed in range(3):
        kw = dict(max_bank_size=100, patch_size=1, random_state=seed, device="cpu")
        det = _stream(PatchCoreDetector(**kw), X, range(100, len(X), 100))
        one = PatchCoreDetector(**kw).fit(X)
        assert det.memory_bank_.shape == one.memory_bank_.shape == (100, 64)
        ratios.append(_covering_radius(X, det.memory_bank_)
                      / _covering_radius(X, one.memory_bank_))
    assert 0.9 < np.mean(ratios) < 1.25


def test_patchcore_fit_then_partial_fit_continues_the_stream():
    X = _maps(60)
    a = PatchCoreDetector(max_bank_size=25, random_state=1, device="cpu").fit(X[:30])
    b = PatchCoreDetector(max_bank_size=25, random_state=1, device="cpu").partial_fit(X[:30])
    _assert_same_state(a.partial_fit(X[30:]), b.partial_fit(X[30:]))
    assert a.n_samples_seen_ == 60 and a.memory_bank_.shape == (25, 6)


# ------------------------------------------------------------------------ DFM
def _pool(X, k):
    n, c, h, w = X.shape
    return X[:, :, : h // k * k, : w // k * k].reshape(n, c, h // k, k, w // k, k).mean(
        axis=(3, 5)).reshape(n, -1)


@pytest.mark.parametrize("cuts", [[40], [5, 6, 50, 51], list(range(10, 90, 10))])
@pytest.mark.parametrize("params", [{"n_components": 0.9}, {"n_components": 4},
                                    {"n_components": 4, "score_type": "nll"}])
def test_dfm_streamed_is_fit_to_1e_8(cuts, params):
    X, Q = _maps(90) + 5.0, _maps(15, seed=1) + 5.0
    streamed = _stream(DFMDetector(pooling_kernel_size=2, device="cpu", **params), X, cuts)
    fitted = DFMDetector(pooling_kernel_size=2, device="cpu", **params).fit(X)
    pca = PCA(n_components=params["n_components"], svd_solver="full").fit(_pool(X, 2))
    assert streamed.n_components_ == fitted.n_components_ == pca.n_components_
    for det in (streamed, fitted):
        signs = np.sign((det.components_ * pca.components_).sum(1))
        np.testing.assert_allclose(det.components_ * signs[:, None], pca.components_,
                                   atol=1e-8)
        np.testing.assert_allclose(det.explained_variance_, pca.explained_variance_, rtol=1e-8)
        np.testing.assert_allclose(det.explained_variance_ratio_,
                                   pca.explained_variance_ratio_, rtol=1e-8)
        np.testing.assert_allclose(det.singular_values_, pca.singular_values_, rtol=1e-8)
        np.testing.assert_allclose(det.noise_variance_, pca.noise_variance_, rtol=1e-8)
        np.testing.assert_allclose(det.mean_, pca.mean_, rtol=1e-12)
    np.testing.assert_allclose(streamed.score_samples(Q), fitted.score_samples(Q), rtol=1e-8)
    if params.get("score_type") != "nll":
        np.testing.assert_allclose(streamed.anomaly_map(Q), fitted.anomaly_map(Q), rtol=1e-8)
        err = _pool(Q, 2) - pca.inverse_transform(pca.transform(_pool(Q, 2)))
        np.testing.assert_allclose(-streamed.score_samples(Q), (err**2).sum(1), rtol=1e-8)


def test_dfm_more_features_than_images_and_fit_then_partial_fit():
    X, Q = _maps(50, c=16, h=4, w=4), _maps(8, seed=1, c=16, h=4, w=4)  # 256 > 50
    fitted = DFMDetector(pooling_kernel_size=1, device="cpu").fit(X)
    streamed = DFMDetector(pooling_kernel_size=1, device="cpu").fit(X[:20])
    _stream(streamed, X[20:], [1, 2, 15])
    assert streamed.n_components_ == fitted.n_components_
    assert streamed.singular_values_.shape == (fitted.n_components_,)
    np.testing.assert_allclose(streamed.explained_variance_, fitted.explained_variance_,
                               rtol=1e-8)
    np.testing.assert_allclose(streamed.score_samples(Q), fitted.score_samples(Q), rtol=1e-8)


def test_dfm_pooling_changed_mid_stream_raises():
    X = _maps(40)
    det = DFMDetector(pooling_kernel_size=2, device="cpu").partial_fit(X[:20])
    reference = copy.deepcopy(det)
    with pytest.raises(ValueError, match="pooling_kernel_size changed"):
        det.set_params(pooling_kernel_size=1).partial_fit(X[20:])
    det.set_params(pooling_kernel_size=2)
    _assert_same_state(det, reference)


# ---------------------------------------------------------------------- DFKDE
def _kde_reference(train, kept, test, k):
    """-log density of scipy's KDE of the kept points, on sklearn's PCA of ``train``."""
    pca = PCA(n_components=k, svd_solver="full").fit(train)
    z, zq = pca.transform(kept), pca.transform(test)
    scale = np.linalg.norm(z, axis=1).max()
    return pca, z / scale, -gaussian_kde((z / scale).T).logpdf((zq / scale).T)


@pytest.mark.parametrize("cuts", [[50], list(range(10, 150, 10))])
def test_dfkde_within_max_training_points_is_fit(cuts):
    X, Q = _vectors(150), _vectors(20, seed=1)
    make = lambda: DFKDEDetector(n_components=4, random_state=0, device="cpu")  # noqa: E731
    streamed, fitted = _stream(make(), X, cuts), make().fit(X)
    np.testing.assert_array_equal(streamed.kde_indices_, np.arange(150))
    np.testing.assert_allclose(streamed.dataset_, fitted.dataset_, atol=1e-10)
    np.testing.assert_allclose(streamed.max_length_, fitted.max_length_, rtol=1e-10)
    np.testing.assert_allclose(streamed.score_samples(Q), fitted.score_samples(Q), rtol=1e-8)
    _, _, expected = _kde_reference(X, X, Q, 4)
    np.testing.assert_allclose(-streamed.score_samples(Q), expected, rtol=1e-6)


def test_dfkde_beyond_max_training_points_keeps_a_reservoir_on_the_full_pca():
    X, Q = _vectors(400), _vectors(20, seed=1)
    det = _stream(DFKDEDetector(n_components=3, max_training_points=60, random_state=2,
                                device="cpu"), X, range(50, 400, 50))
    assert det.dataset_.shape == (60, 3) and det.n_samples_seen_ == 400
    kept = det.kde_indices_
    assert len(np.unique(kept)) == 60 and kept.min() >= 0 and kept.max() < 400
    assert (kept >= 200).sum() > 10  # later samples enter the reservoir
    pca, points, expected = _kde_reference(X, X[kept], Q, 3)  # PCA of every sample
    signs = np.sign((det.pca_components_ * pca.components_).sum(1))
    np.testing.assert_allclose(det.dataset_ * signs, points, atol=1e-8)
    np.testing.assert_allclose(-det.score_samples(Q), expected, rtol=1e-6)


@pytest.mark.slow  # 200 streamed fits: ~50 s on 2 cores
def test_dfkde_reservoir_is_seeded_and_uniform():
    X = _vectors(48, d=3)
    counts = np.zeros(48)
    for seed in range(200):
        det = _stream(DFKDEDetector(n_components=2, max_training_points=12, random_state=seed,
                                    device="cpu"), X, [12, 20, 33, 40])
        counts[det.kde_indices_] += 1
    # each sample is kept with probability 12 / 48: binomial(200, 0.25), sd 6.1
    assert np.abs(counts - 50).max() < 4.5 * 6.2
    assert np.abs(counts[:12].mean() - 50) < 8 and np.abs(counts[36:].mean() - 50) < 8
    again = [_stream(DFKDEDetector(n_components=2, max_training_points=12, random_state=s,
                                   device="cpu"), X, [12, 20, 33, 40]).kde_indices_
             for s in (7, 7, 8)]
    np.testing.assert_array_equal(again[0], again[1])
    assert not np.array_equal(again[0], again[2])
