"""PatchCoreDetector against numpy pooling, brute-force neighbours and Eq. 7 by hand."""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from skanomaly.base import make_generator
from skanomaly.detectors import PatchCoreDetector
from skanomaly.functional import (
    johnson_lindenstrauss_min_dim,
    k_center_greedy,
    sparse_random_projection_matrix,
)


def _patches(X, p=3):
    """p x p mean with zero padding counted (torch.nn.AvgPool2d(p, 1, p // 2)), (N*H*W, C)."""
    n, c, h, w = X.shape
    r = p // 2
    padded = np.pad(X.astype(np.float64), ((0, 0), (0, 0), (r, r), (r, r)))
    pooled = sum(padded[:, :, i : i + h, j : j + w] for i in range(p) for j in range(p)) / p**2
    return pooled.transpose(0, 2, 3, 1).reshape(-1, c)


def _torch_patches(X):
    """The same patches in float32 by torch.nn.AvgPool2d(3, 1, 1) (anomalib's feature_pooler)."""
    pooled = torch.nn.AvgPool2d(3, 1, 1)(torch.as_tensor(X, dtype=torch.float32))
    return pooled.permute(0, 2, 3, 1).reshape(-1, X.shape[1])


def _distances(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _reference_scores(test, bank, n_neighbors):
    """anomalib's compute_anomaly_score, written out in numpy one image at a time."""
    n, _, h, w = test.shape
    feats = _patches(test).reshape(n, h * w, -1)
    scores = []
    for f in feats:
        d = _distances(f, bank)
        patch_scores, nn = d.min(axis=1), d.argmin(axis=1)
        worst = patch_scores.argmax()
        k = min(n_neighbors, len(bank))
        if k == 1:
            scores.append(patch_scores[worst])
            continue
        support = np.argsort(_distances(bank[nn[worst]][None], bank)[0], kind="stable")[:k]
        weight = 1.0 - softmax(_distances(f[worst][None], bank[support])[0])[0]
        scores.append(weight * patch_scores[worst])
    return np.array(scores)


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 8, 5, 4)), rng.normal(size=(4, 8, 5, 4))


@pytest.mark.parametrize("patch_size", [3, 1, 5])
def test_full_bank_anomaly_map_is_brute_force_nn(maps, device, patch_size):
    train, test = maps
    det = PatchCoreDetector(coreset_sampling_ratio=1.0, patch_size=patch_size, device=device)
    det.fit(train)
    bank = _patches(train, patch_size)
    assert det.memory_bank_.dtype == np.float32
    np.testing.assert_allclose(det.memory_bank_, bank, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(det.coreset_indices_, np.arange(len(bank)))
    expected = _distances(_patches(test, patch_size), bank).min(axis=1).reshape(4, 5, 4)
    np.testing.assert_allclose(det.anomaly_map(test), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_neighbors", [1, 3, 9])
@pytest.mark.parametrize("ratio", [1.0, 0.3, 0.02])  # 0.02: a 2-entry bank, capped support
def test_image_score_is_reweighted_max_distance(maps, n_neighbors, ratio):
    train, test = maps
    det = PatchCoreDetector(coreset_sampling_ratio=ratio, n_neighbors=n_neighbors,
                            random_state=0, device="cpu").fit(train)
    expected = _reference_scores(test, det.memory_bank_.astype(np.float64), n_neighbors)
    np.testing.assert_allclose(-det.score_samples(test), expected, rtol=1e-4)
    if n_neighbors > 1:  # the weight is a real re-weighting, strictly below 1
        assert np.all(-det.score_samples(test) < det.anomaly_map(test).max(axis=(1, 2)))


def test_single_entry_bank_scores_max_distance(maps):
    train, test = maps
    det = PatchCoreDetector(coreset_sampling_ratio=1e-6, random_state=0, device="cpu")
    det.fit(train)
    assert det.memory_bank_.shape == (1, 8)
    np.testing.assert_allclose(-det.score_samples(test), det.anomaly_map(test).max(axis=(1, 2)))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_coreset_is_k_center_greedy(maps, ratio):
    train, _ = maps
    det = PatchCoreDetector(coreset_sampling_ratio=ratio, random_state=3, device="cpu")
    det.fit(train)
    # Bit-identical float32 patches: k-center greedy is sensitive to rounding in near ties.
    patches = _torch_patches(train)
    np.testing.assert_allclose(patches.numpy(), _patches(train), atol=1e-6)
    n_centers = int(len(patches) * ratio)
    # 120 patches: the JL dimension for eps=0.9 is far above 8 channels, so no projection.
    assert johnson_lindenstrauss_min_dim(len(patches), eps=0.9) >= 8
    expected = k_center_greedy(patches, n_centers, generator=make_generator(3))
    assert det.memory_bank_.shape == (n_centers, 8)
    np.testing.assert_array_equal(det.coreset_indices_, expected.numpy())
    np.testing.assert_array_equal(det.memory_bank_, patches[expected].numpy())


@pytest.mark.parametrize("cap", [1, 7, 1000])
def test_max_bank_size_caps_the_one_shot_coreset(maps, cap):
    train, _ = maps
    det = PatchCoreDetector(coreset_sampling_ratio=0.25, max_bank_size=cap, random_state=3,
                            device="cpu").fit(train)
    patches = _torch_patches(train)
    n_centers = min(cap, int(len(patches) * 0.25))
    expected = k_center_greedy(patches, n_centers, generator=make_generator(3))
    np.testing.assert_array_equal(det.coreset_indices_, expected.numpy())
    np.testing.assert_array_equal(det.memory_bank_, patches[expected].numpy())
    assert det.n_samples_seen_ == len(train)


def test_coreset_uses_projection_when_it_reduces_dimension():
    X = np.random.default_rng(0).normal(size=(2, 128, 3, 3))
    det = PatchCoreDetector(coreset_sampling_ratio=0.5, random_state=5, device="cpu").fit(X)
    patches = _torch_patches(X)
    dim = johnson_lindenstrauss_min_dim(18, eps=0.9)
    assert dim < 128
    gen = make_generator(5)
    projection = sparse_random_projection_matrix(dim, 128, generator=gen, dtype=torch.float32)
    expected = k_center_greedy(patches, 9, generator=gen, projection=projection)
    np.testing.assert_array_equal(det.coreset_indices_, expected.numpy())


def test_same_random_state_is_reproducible(maps):
    train, test = maps
    fit = lambda seed: PatchCoreDetector(coreset_sampling_ratio=0.2,  # noqa: E731
                                         random_state=seed, device="cpu").fit(train)
    a, b = fit(11), fit(11)
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    np.testing.assert_array_equal(a.score_samples(test), b.score_samples(test))
    starts = {int(fit(seed).coreset_indices_[0]) for seed in range(6)}
    assert len(starts) > 1


def test_ranks_obvious_anomaly_first(maps, device):
    train, test = maps
    outlier = test[:1].copy()
    outlier[0, :, 2, 1] += 8.0  # one anomalous position, seen by the 3x3 windows around it
    det = PatchCoreDetector(coreset_sampling_ratio=0.5, random_state=0, device=device)
    det.fit(train)
    scores = det.score_samples(np.concatenate([test, outlier]))
    assert scores.argmin() == len(test)
    amap = det.anomaly_map(outlier)[0]
    row, col = np.unravel_index(amap.argmax(), amap.shape)
    assert abs(row - 2) <= 1 and abs(col - 1) <= 1


def test_2d_input_and_no_mutation():
    X = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    X.flags.writeable = False
    det = PatchCoreDetector(coreset_sampling_ratio=1.0, n_neighbors=3, device="cpu").fit(X)
    # 1x1 maps: the 3x3 average of a lone position with zero padding is x / 9.
    np.testing.assert_allclose(det.memory_bank_, X / 9.0, rtol=1e-6)
    assert det.anomaly_map(X[:2]).shape == (2, 1, 1)
    t = torch.tensor(X)
    before = t.clone()
    det.score_samples(t)
    assert torch.equal(t, before)


@pytest.mark.parametrize("params", [{"coreset_sampling_ratio": 0.0}, {"n_neighbors": 0},
                                    {"projection_eps": 1.0}, {"coreset_sampling_ratio": 1.5},
                                    {"patch_size": 0}, {"patch_size": 2},
                                    {"max_bank_size": 0}, {"max_bank_size": 2.5}])
def test_invalid_parameters_raise(maps, params):
    with pytest.raises(ValueError):
        PatchCoreDetector(device="cpu", **params).fit(maps[0])


def test_shape_mismatch_raises(maps):
    det = PatchCoreDetector(coreset_sampling_ratio=1.0, device="cpu").fit(maps[0])
    with pytest.raises(ValueError, match="shape"):
        det.score_samples(maps[1][:, :, :4])
