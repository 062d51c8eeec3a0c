"""A sample's scores do not depend on the batch it is scored in: bitwise.

Each sample is scored alone (the reference), then in random batches and orders drawn by
hypothesis; ``score_samples``, ``decision_function``, ``predict`` and ``anomaly_map``
(at feature resolution and upsampled) must return the very same bits.
"""

import copy
import functools
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)
from skanomaly import base
from skanomaly.functional import (
    GaussianKDE,
    GaussianScorer,
    PCAFit,
    PCAProjection,
    WoodburyGaussianScorer,
    mahalanobis,
    pca_fit,
    pca_transform,
)
from skanomaly.functional._alignment import ALIGNMENT_BYTES, pad_aligned

N_QUERIES = 23


NAMES = ["gaussian", "padim", "padim-woodbury", "patchcore", "dfm", "dfkde"]


@functools.lru_cache(maxsize=None)
def _case(name):
    """(fitted detector, queries, outputs of each query scored alone)."""
    detector, X = _fitted(name)
    return detector, X, _alone(detector, X)


def _fitted(name):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(60, 6, 4, 4)).astype(np.float32)
    vectors = rng.normal(size=(120, 5)) @ rng.normal(size=(5, 5))
    queries_maps = rng.normal(size=(N_QUERIES, 6, 4, 4)).astype(np.float32)
    queries_vectors = rng.normal(size=(N_QUERIES, 5)) * 1.5
    common = dict(device="cpu")
    make = {
        "gaussian": lambda: (GaussianDetector(**common).fit(vectors), queries_vectors),
        "padim": lambda: (PaDiMDetector(random_state=0, **common).fit(maps), queries_maps),
        "padim-woodbury": lambda: (PaDiMDetector(random_state=0, **common).fit(maps[:5]),
                                   queries_maps),
        "patchcore": lambda: (PatchCoreDetector(random_state=0, **common).fit(maps),
                              queries_maps),
        "dfm": lambda: (DFMDetector(pooling_kernel_size=2, **common).fit(maps), queries_maps),
        "dfkde": lambda: (DFKDEDetector(random_state=0, **common).fit(vectors),
                          queries_vectors),
    }
    return make[name]()


def _outputs(detector, X):
    out = {
        "score_samples": detector.score_samples(X),
        "decision_function": detector.decision_function(X),
        "predict": detector.predict(X),
    }
    if hasattr(detector, "anomaly_map"):
        out["anomaly_map"] = detector.anomaly_map(X)
        out["anomaly_map_upsampled"] = detector.anomaly_map(X, output_size=12, sigma=1.5)
    return out


def _alone(detector, X):
    """Outputs of each sample scored on its own, stacked."""
    singles = [_outputs(detector, X[i : i + 1]) for i in range(len(X))]
    return {k: np.concatenate([s[k] for s in singles]) for k in singles[0]}


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(data=st.data())
def test_scores_are_bitwise_batch_invariant(name, data):
    detector, X, alone = _case(name)
    order = data.draw(st.permutations(range(len(X))))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(X) - 1), max_size=4)))
    shuffled = X[np.array(order)]
    pieces = [_outputs(detector, part) for part in np.split(shuffled, cuts)]
    for key, expected in alone.items():
        got = np.concatenate([p[key] for p in pieces])
        np.testing.assert_array_equal(got, expected[np.array(order)], err_msg=key)


@pytest.mark.parametrize("name", ["gaussian", "padim", "dfm"])
def test_many_fixed_blocks_are_invariant_too(name):
    # force several scoring blocks (and a padded last one) on a small batch
    detector, X = _fitted(name)
    with mock.patch.object(base, "_BLOCK_NUMBERS", 1), mock.patch.object(base, "_MIN_BLOCK", 2):
        assert detector._block_size() == 2
        whole = _outputs(detector, X)
        singles = _alone(detector, X)
    for key in whole:
        np.testing.assert_array_equal(whole[key], singles[key], err_msg=key)


# ------------------------------------------------------- odd widths: aligned rows
# BLAS kernels take other code paths for rows at other alignments: rows of an odd
# number of float64 entries start at 8-byte but not 16-, 32- or 64-byte aligned
# addresses, and a sample's bits then depend on its row in the product. Every
# scoring product pads its rows to 64-byte multiples (skanomaly.functional._alignment).

WIDTHS = [4, 5, 7, 17]

DETECTORS = {
    "gaussian": lambda: GaussianDetector(device="cpu"),
    "padim": lambda: PaDiMDetector(device="cpu"),
    "patchcore": lambda: PatchCoreDetector(random_state=0, device="cpu"),
    "dfm-fre": lambda: DFMDetector(device="cpu"),
    "dfm-nll": lambda: DFMDetector(score_type="nll", device="cpu"),
    "dfkde": lambda: DFKDEDetector(random_state=0, device="cpu"),
}


def _assert_rows_invariant(score, T, rng):
    """``score`` of shifted subsets, single rows and a shuffle equals that of the whole."""
    full = score(T)
    for start in (1, 3, 17, 101):
        np.testing.assert_array_equal(score(T[start:]), full[start:], err_msg=f"T[{start}:]")
    for i in (0, 1, 50, len(T) - 1):
        np.testing.assert_array_equal(score(T[i : i + 1]), full[i : i + 1], err_msg=f"row {i}")
    order = rng.permutation(len(T))
    np.testing.assert_array_equal(score(T[order]), full[order], err_msg="shuffled")


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("name", list(DETECTORS))
def test_scores_are_bitwise_invariant_for_odd_feature_widths(name, d):
    rng = np.random.default_rng(d)
    X = rng.normal(size=(150, d)) @ rng.normal(size=(d, d))
    T = rng.normal(size=(300, d)) * 1.5
    detector = DETECTORS[name]().fit(X)
    _assert_rows_invariant(detector.score_samples, T, rng)


@pytest.mark.parametrize(("name", "channels"), [("padim", 5), ("padim", 7), ("dfm-fre", 5),
                                                ("dfm-nll", 7), ("dfm-fre", 3)])
def test_spatial_maps_with_an_odd_channel_count_are_invariant(name, channels):
    rng = np.random.default_rng(channels)
    maps = rng.normal(size=(60, channels, 3, 3)).astype(np.float32)
    queries = rng.normal(size=(120, channels, 3, 3)).astype(np.float32)
    params = {} if name == "padim" else {"pooling_kernel_size": 1}  # DFM: 9 c features
    detector = DETECTORS[name]().set_params(**params).fit(maps)
    _assert_rows_invariant(detector.score_samples, queries, rng)
    if name != "dfm-nll":
        _assert_rows_invariant(detector.anomaly_map, queries, rng)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [5, 7, 17])
def test_products_through_the_helper_do_not_depend_on_the_row(k, dtype):
    # the roll test: rows of A moved to other positions give the same bits, for A @ B.T
    # (B rows x k) and A @ B (B k x 17: odd output rows too) -- plain torch, 1,024 rows
    g = torch.Generator().manual_seed(k)
    A = torch.randn(1024, k, generator=g, dtype=dtype)
    nt = pad_aligned(torch.randn(5, k, generator=g, dtype=dtype))
    nn_ = pad_aligned(pad_aligned(torch.randn(k, 17, generator=g, dtype=dtype), dim=0))
    assert nt.shape[1] * nt.element_size() % ALIGNMENT_BYTES == 0
    assert nn_.shape[1] * nn_.element_size() % ALIGNMENT_BYTES == 0
    for product in (lambda a: pad_aligned(a) @ nt.T, lambda a: pad_aligned(a) @ nn_):
        full = product(A)
        for shift in (1, 3, 17, 101, 500):
            assert torch.equal(product(torch.roll(A, shift, 0)), torch.roll(full, shift, 0))
    # the zeros add nothing: the values of the unpadded product, to rounding
    torch.testing.assert_close(pad_aligned(A) @ nt.T, A @ nt[:, :k].T)


def _rolled_equal(fn, x):
    """``fn`` of ``x`` with its rows rolled gives the rows of ``fn(x)`` rolled (bitwise)."""
    full = fn(x)
    full = full if isinstance(full, tuple) else (full,)
    for shift in (1, 3, 17, 101):
        moved = fn(torch.roll(x, shift, 0))
        moved = moved if isinstance(moved, tuple) else (moved,)
        for a, b in zip(moved, full):
            assert torch.equal(a, torch.roll(b, shift, 0)), shift


def _kernel_modules(d, dtype):
    rng = np.random.default_rng(d)
    train = torch.tensor(rng.normal(size=(150, d)) @ rng.normal(size=(d, d)))
    mean, xc = train.mean(0), train - train.mean(0)
    cov = xc.T @ xc / 149
    fit = pca_fit(train, max(1, d - 2))
    return {
        "gaussian": GaussianScorer.from_covariance(mean[None], cov[None], dtype=dtype),
        "woodbury": WoodburyGaussianScorer(train[:9].mean(0)[None],
                                           (train[:9] - train[:9].mean(0))[None], 0.1,
                                           dtype=dtype),
        "pca": PCAProjection.from_fit(fit, dtype=dtype),
        "kde": GaussianKDE(train).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", WIDTHS)
def test_kernel_modules_do_not_depend_on_the_row(d, dtype):
    modules = _kernel_modules(d, dtype)
    x = torch.tensor(np.random.default_rng(0).normal(size=(300, d)), dtype=dtype)
    _rolled_equal(lambda q: modules["gaussian"](q[:, None]), x)
    _rolled_equal(lambda q: modules["woodbury"](q[:, None]), x)
    pca = modules["pca"]
    _rolled_equal(lambda q: (pca(q), pca.residual(q), pca.inverse(pca(q))), x)
    kde = modules["kde"]
    _rolled_equal(lambda q: (kde(q), kde.logpdf(q)), x)


@pytest.mark.parametrize("d", [5, 7])
def test_cast_modules_stay_aligned_and_equal_the_functions(d):
    # a float64 module cast to float32 re-pads its operands to 16 float32 entries
    modules = _kernel_modules(d, torch.float64)
    x = torch.tensor(np.random.default_rng(1).normal(size=(64, d)), dtype=torch.float32)
    scorer = modules["gaussian"].float()
    assert scorer.U_padded.shape[-2:] == (16, 16) and scorer.U.shape == (1, d, d)
    assert torch.equal(scorer(x[:, None])[:, 0],
                       mahalanobis(x, scorer.mean[0], precision_cholesky=scorer.U[0]))
    pca = modules["pca"].float()
    assert pca.components_padded.shape == (16, 16)
    fit = PCAFit(components=pca.components, explained_variance=None,
                 explained_variance_ratio=None, singular_values=None, mean=pca.mean,
                 n_components=pca.n_components, noise_variance=None)
    assert torch.equal(pca(x), pca_transform(x, fit))
    kde64 = modules["kde"]
    kde = copy.deepcopy(kde64).float()
    assert kde.centres_padded.shape == (160, 16) and kde.precision_factor_padded.shape == (16, 16)
    assert torch.equal(kde(x), kde.logpdf(x))
    np.testing.assert_allclose(kde(x).numpy(), kde64(x.double()).numpy(), rtol=1e-5)
    assert kde.double().centres_padded.shape == (160, 8)  # and back
    _rolled_equal(kde, x)
