"""Nearest-neighbour kernels against numpy brute force and scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from hypothesis import given, settings
from hypothesis import strategies as st

from skanomaly.functional import KNNIndex, knn_distances, pairwise_sq_distances


def _brute_sq(x, y):
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(37, 6)), rng.normal(size=(50, 6))


def test_pairwise_matches_brute_force(data):
    x, y = data
    got = pairwise_sq_distances(torch.tensor(x), torch.tensor(y))
    assert got.shape == (37, 50) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _brute_sq(x, y), rtol=1e-10, atol=1e-12)


def test_pairwise_self_distances_are_non_negative(data):
    x = torch.tensor(data[0] * 1e3 + 5.0)
    got = pairwise_sq_distances(x, x)
    assert bool((got >= 0).all())
    assert float(got.diagonal().abs().max()) <= 1e-9 * float(got.max())


def test_pairwise_float32_far_from_origin(data):
    # Centring keeps float32 exact enough when the data sit far from the origin.
    x, y = data[0] + 1000.0, data[1] + 1000.0
    got = pairwise_sq_distances(torch.tensor(x, dtype=torch.float32),
                                torch.tensor(y, dtype=torch.float32))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _brute_sq(x, y), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3, 50])
@pytest.mark.parametrize("chunk_size", [None, 1, 8])
def test_knn_matches_sklearn(data, k, chunk_size):
    queries, bank = data
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(queries)
    dist, idx = knn_distances(torch.tensor(queries), torch.tensor(bank), k, chunk_size=chunk_size)
    assert dist.shape == idx.shape == (37, k) and idx.dtype == torch.long
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-6)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


def test_knn_squared_and_brute_force(data):
    queries, bank = data
    sq, idx = knn_distances(torch.tensor(queries), torch.tensor(bank), 4, squared=True)
    brute = _brute_sq(queries, bank)
    order = np.argsort(brute, axis=1)[:, :4]
    np.testing.assert_array_equal(idx.numpy(), order)
    np.testing.assert_allclose(sq.numpy(), np.take_along_axis(brute, order, 1), rtol=1e-10)
    assert bool((sq[:, 1:] >= sq[:, :-1]).all())


def test_knn_float32_far_from_origin(data):
    queries, bank = data[0] + 500.0, data[1] + 500.0
    dist, idx = knn_distances(torch.tensor(queries, dtype=torch.float32),
                              torch.tensor(bank, dtype=torch.float32), 2)
    brute = np.sqrt(_brute_sq(queries, bank))
    assert dist.dtype == torch.float32
    np.testing.assert_allclose(dist.numpy(), np.sort(brute, 1)[:, :2], rtol=1e-4)
    np.testing.assert_array_equal(idx.numpy()[:, 0], brute.argmin(1))


def test_knn_query_in_bank_has_zero_distance(data):
    bank = torch.tensor(data[1])
    dist, idx = knn_distances(bank[:5], bank)
    np.testing.assert_array_equal(idx[:, 0].numpy(), np.arange(5))
    assert float(dist.max()) < 1e-6


def test_inputs_not_mutated(data):
    queries, bank = torch.tensor(data[0]), torch.tensor(data[1])
    copies = queries.clone(), bank.clone()
    knn_distances(queries, bank, 2)
    pairwise_sq_distances(queries, bank)
    assert torch.equal(queries, copies[0]) and torch.equal(bank, copies[1])


def test_errors(data):
    queries, bank = torch.tensor(data[0]), torch.tensor(data[1])
    with pytest.raises(ValueError, match="exceeds"):
        knn_distances(queries, bank, 51)
    with pytest.raises(ValueError, match="n_neighbors"):
        knn_distances(queries, bank, 0)
    with pytest.raises(TypeError, match="n_neighbors"):
        knn_distances(queries, bank, 2.0)
    with pytest.raises(ValueError, match="features"):
        knn_distances(queries[:, :3], bank)
    with pytest.raises(ValueError, match="features"):
        pairwise_sq_distances(queries, bank[:, :2])
    bad = queries.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        knn_distances(bad, bank)
    with pytest.raises(ValueError, match="2-D"):
        knn_distances(queries[0], bank)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_distances(queries, bank, chunk_size=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pairwise_sq_distances(data[0], bank)


@pytest.mark.parametrize("k", [1, 2, 5, 50])
@pytest.mark.parametrize("tile_size", [1, 3, 7, 49, 50, 64])
def test_index_tiles_match_sklearn(data, k, tile_size):
    # Tiles narrower than k, an uneven last tile and a single tile all merge exactly.
    queries, bank = data
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(queries)
    dist, idx = KNNIndex(torch.tensor(bank)).search(torch.tensor(queries), k,
                                                    tile_size=tile_size, chunk_size=16)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-6)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


@settings(deadline=None)
@given(n_bank=st.integers(1, 40), n_queries=st.integers(0, 30), k=st.integers(1, 6),
       tile=st.integers(1, 45), chunk=st.integers(1, 35), seed=st.integers(0, 2**16))
def test_index_search_matches_brute_force(n_bank, n_queries, k, tile, chunk, seed):
    rng = np.random.default_rng(seed)
    # integer coordinates: exact ties are common and must resolve to valid neighbours
    bank = rng.integers(-3, 4, size=(n_bank, 3)).astype(np.float64)
    queries = rng.integers(-3, 4, size=(n_queries, 3)).astype(np.float64)
    k = min(k, n_bank)
    sq, idx = KNNIndex(torch.tensor(bank)).search(torch.tensor(queries), k, squared=True,
                                                  tile_size=tile, chunk_size=chunk)
    brute = _brute_sq(queries, bank)
    assert sq.shape == idx.shape == (n_queries, k)
    # the distances are the k smallest, ascending, and the indices point at them
    np.testing.assert_allclose(sq.numpy(), np.sort(brute, 1)[:, :k], atol=1e-9)
    np.testing.assert_allclose(np.take_along_axis(brute, idx.numpy(), 1), sq.numpy(),
                               atol=1e-9)
    assert all(len(set(row)) == k for row in idx.numpy().tolist())


def test_index_reused_equals_one_shot(data):
    queries, bank = (torch.tensor(a, dtype=torch.float32) for a in data)
    index = KNNIndex(bank)
    assert (index.n_samples, index.n_features, index.dtype) == (50, 6, torch.float32)
    assert index.device == torch.device("cpu") and "n_samples=50" in repr(index)
    for k in (1, 4):
        got, ref = index.search(queries, k), knn_distances(queries, bank, k)
        torch.testing.assert_close(got[0], ref[0])
        assert torch.equal(got[1], ref[1])
    # float64 queries are promoted with the float32 bank
    dist64, _ = index.search(queries.double(), 2)
    assert dist64.dtype == torch.float64


def test_index_errors_and_no_mutation(data):
    queries, bank = torch.tensor(data[0]), torch.tensor(data[1])
    copy = bank.clone()
    index = KNNIndex(bank)
    index.search(queries, 3)
    assert torch.equal(bank, copy)
    with pytest.raises(ValueError, match="empty"):
        KNNIndex(bank[:0])
    bad = bank.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinity"):
        KNNIndex(bad)
    with pytest.raises(ValueError, match="features"):
        index.search(queries[:, :2])
    with pytest.raises(ValueError, match="exceeds"):
        index.search(queries, 51)
    with pytest.raises(ValueError, match="tile_size"):
        index.search(queries, tile_size=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        KNNIndex(data[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(data):
    queries, bank = torch.tensor(data[0]), torch.tensor(data[1])
    for k in (1, 3):
        dist, idx = knn_distances(queries.cuda(), bank.cuda(), k, chunk_size=10)
        ref_dist, ref_idx = knn_distances(queries, bank, k)
        assert dist.is_cuda and torch.equal(idx.cpu(), ref_idx)
        torch.testing.assert_close(dist.cpu(), ref_dist)
        index = KNNIndex(bank.cuda())
        dist, idx = index.search(queries.cuda(), k, tile_size=7)
        assert torch.equal(idx.cpu(), ref_idx)
        torch.testing.assert_close(dist.cpu(), ref_dist)
        with pytest.raises(ValueError, match="cuda"):
            index.search(queries, k)
