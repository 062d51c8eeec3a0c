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


# --------------------------------------------------------------------------- batch invariance

def _ranked(brute, k):
    """The k best columns of each row by (distance, index): numpy's stable sort."""
    order = np.argsort(brute, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(brute, order, 1), order


@settings(deadline=None, max_examples=25)
@given(n_bank=st.integers(1, 60), n_queries=st.integers(1, 25), n_features=st.integers(1, 9),
       k=st.integers(1, 5), integer=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2**16), data=st.data())
def test_search_is_bitwise_batch_invariant(n_bank, n_queries, n_features, k, integer, dtype,
                                           seed, data):
    rng = np.random.default_rng(seed)
    if integer:  # exact ties everywhere, duplicated rows
        bank = rng.integers(-2, 3, size=(n_bank, n_features))
        queries = rng.integers(-2, 3, size=(n_queries, n_features))
    else:
        bank = rng.normal(size=(n_bank, n_features)) * 10.0 ** rng.integers(-3, 4)
        queries = rng.normal(size=(n_queries, n_features)) * np.abs(bank).max()
    torch_dtype = getattr(torch, dtype)
    bank, queries = (torch.tensor(a, dtype=torch_dtype) for a in (bank, queries))
    k = min(k, n_bank)
    index = KNNIndex(bank)
    full_d, full_i = index.search(queries, k)
    # any order, any split into batches, any block sizes: the same bits per query
    order = data.draw(st.permutations(range(n_queries)))
    cuts = sorted(data.draw(st.lists(st.integers(0, n_queries), max_size=4)))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 30)))
    tile = data.draw(st.one_of(st.none(), st.integers(1, 70)))
    got_d, got_i = torch.empty_like(full_d), torch.empty_like(full_i)
    perm = torch.tensor(order, dtype=torch.long)
    for lo, hi in zip([0, *cuts], [*cuts, n_queries]):
        if lo < hi:
            rows = perm[lo:hi]
            d, i = index.search(queries[rows], k, chunk_size=chunk, tile_size=tile)
            got_d[rows], got_i[rows] = d, i
    assert torch.equal(got_d, full_d) and torch.equal(got_i, full_i)
    alone = index.search(queries[order[0] : order[0] + 1], k)
    assert torch.equal(alone[0][0], full_d[order[0]]) and torch.equal(alone[1][0], full_i[order[0]])
    # and the k best by (distance, index) of a float64 brute force
    brute = _brute_sq(queries.double().numpy(), bank.double().numpy())
    ref_sq, ref_idx = _ranked(brute, k)
    np.testing.assert_allclose(full_d.double().numpy() ** 2, ref_sq, rtol=1e-5 if dtype ==
                               "float32" else 1e-12, atol=1e-30)
    if integer:  # exact distances: the indices too, ties to the smaller index
        np.testing.assert_array_equal(full_i.numpy(), ref_idx)
    else:  # the returned rows are at the returned distances
        np.testing.assert_allclose(np.take_along_axis(brute, full_i.numpy(), 1), ref_sq,
                                   rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-30)


def test_single_query_equals_batch_on_wide_data():
    # the shape of scikit-learn's check_methods_subset_invariance, at PatchCore's width
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(700, 384, generator=gen)
    queries = torch.randn(40, 384, generator=gen)
    index = KNNIndex(bank)
    for k in (1, 3):
        d, i = index.search(queries, k)
        for row in range(0, 40, 7):
            d1, i1 = index.search(queries[row : row + 1], k)
            assert torch.equal(d1[0], d[row]) and torch.equal(i1[0], i[row])
        ref_d, ref_i = NearestNeighbors(n_neighbors=k).fit(bank.double()).kneighbors(
            queries.double())
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-6)


def test_duplicated_bank_rows_tie_to_the_smallest_index():
    # every candidate ties: the exhaustive pass settles it, the smaller index wins
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    bank = base.repeat(12, 1)  # row j duplicates rows j % 5
    perm = torch.randperm(60, generator=gen)
    bank = bank[perm]
    queries = base + 1e-3 * torch.randn(5, 16, generator=gen, dtype=torch.float64)
    for k in (1, 4, 15):
        d, i = KNNIndex(bank).search(queries, k, tile_size=7)
        ref_sq, ref_i = _ranked(_brute_sq(queries.numpy(), bank.numpy()), k)
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_allclose(d.numpy() ** 2, ref_sq, rtol=1e-12)


def test_reduced_precision_matmul_still_exact():
    # float32 products on bfloat16 inputs: the bound widens, the result stays exact
    gen = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(300, 64, generator=gen), torch.randn(20, 64, generator=gen)
    ref = KNNIndex(bank).search(queries, 3)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = KNNIndex(bank).search(queries, 3)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --------------------------------------------------------------------------- groups

@settings(deadline=None, max_examples=25)
@given(n_bank=st.integers(2, 40), n_queries=st.integers(0, 15), n_groups=st.integers(2, 5),
       k=st.integers(1, 4), tile=st.integers(1, 45), seed=st.integers(0, 2**16))
def test_groups_exclude_the_query_group(n_bank, n_queries, n_groups, k, tile, seed):
    rng = np.random.default_rng(seed)
    bank = rng.integers(-3, 4, size=(n_bank, 3)).astype(np.float64)
    queries = rng.integers(-3, 4, size=(n_queries, 3)).astype(np.float64)
    groups = rng.integers(0, n_groups, size=n_bank)
    query_groups = rng.integers(0, n_groups + 1, size=n_queries)  # n_groups: no bank row
    admissible = np.array([(groups != g).sum() for g in query_groups], dtype=int)
    k = max(1, min(k, admissible.min() if n_queries else k, n_bank))
    index = KNNIndex(torch.tensor(bank), groups=torch.tensor(groups))
    if n_queries and admissible.min() < k:
        return
    sq, idx = index.search(torch.tensor(queries), k, squared=True, tile_size=tile,
                           query_groups=torch.tensor(query_groups))
    brute = _brute_sq(queries, bank)
    brute[groups[None, :] == query_groups[:, None]] = np.inf
    ref_sq, ref_idx = _ranked(brute, k)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sq.numpy(), ref_sq, atol=0)
    # alone equals batched
    for row in range(n_queries):
        one = index.search(torch.tensor(queries[row : row + 1]), k, squared=True,
                           query_groups=torch.tensor(query_groups[row : row + 1]))
        assert torch.equal(one[0][0], sq[row]) and torch.equal(one[1][0], idx[row])


def test_groups_leave_one_image_out_against_sklearn():
    # PatchCore's calibration: each image's patches against the others' bank
    gen = torch.Generator().manual_seed(3)
    n_images, per_image = 6, 20
    bank = torch.randn(n_images * per_image, 8, generator=gen)
    image = torch.arange(n_images).repeat_interleave(per_image)
    index = KNNIndex(bank, groups=image)
    d, i = index.search(bank, 2, query_groups=image)
    for g in range(n_images):
        own = image == g
        others = torch.nonzero(~own)[:, 0]
        ref_d, ref_i = NearestNeighbors(n_neighbors=2).fit(bank[others]).kneighbors(bank[own])
        np.testing.assert_array_equal(i[own].numpy(), others.numpy()[ref_i])
        np.testing.assert_allclose(d[own].numpy(), ref_d, rtol=1e-5)
    # without query_groups the grouped index searches the whole bank
    d0, i0 = index.search(bank, 1)
    np.testing.assert_array_equal(i0[:, 0].numpy(), np.arange(len(bank)))
    assert float(d0.max()) == 0.0


def test_group_errors():
    bank = torch.arange(6.0).reshape(6, 1)
    index = KNNIndex(bank, groups=torch.tensor([0, 0, 0, 1, 1, 2]))
    assert "groups=True" in repr(index)
    assert torch.equal(index.groups, torch.tensor([0, 0, 0, 1, 1, 2]))
    q = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="query 2 \\(group 0\\) has only 3"):
        index.search(q, 4, query_groups=torch.tensor([2, 1, 0]))
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        index.search(q, query_groups=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        index.search(q, query_groups=torch.zeros(3))
    with pytest.raises(ValueError, match="needs an index built with groups"):
        KNNIndex(bank).search(q, query_groups=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape \\(6,\\)"):
        KNNIndex(bank, groups=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        KNNIndex(bank, groups=torch.zeros(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor"):
        KNNIndex(bank, groups=[0, 1, 2, 3, 4, 5])


# --------------------------------------------------------------------------- scale and dtypes

@pytest.mark.parametrize("scale", [1e-300, 1e-150, 1e-20, 1.0, 1e20, 1e150, 1e300])
def test_any_finite_float64_scale(scale):
    rng = np.random.default_rng(4)
    bank, queries = rng.normal(size=(50, 5)), rng.normal(size=(9, 5))
    ref_d, ref_i = NearestNeighbors(n_neighbors=3).fit(bank).kneighbors(queries)
    d, i = knn_distances(torch.tensor(queries * scale), torch.tensor(bank * scale), 3)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy() / scale, ref_d, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e10, 1e20, 1e37])
def test_any_finite_float32_scale(scale):
    rng = np.random.default_rng(5)
    bank, queries = rng.normal(size=(50, 5)), rng.normal(size=(9, 5))
    b32 = torch.tensor(bank * scale, dtype=torch.float32)
    q32 = torch.tensor(queries * scale, dtype=torch.float32)
    brute = np.sqrt(_brute_sq(q32.double().numpy(), b32.double().numpy()))
    d, i = KNNIndex(b32).search(q32, 3)
    assert d.dtype == torch.float32 and bool(torch.isfinite(d).all())
    ref_d, ref_i = _ranked(brute, 3)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.double().numpy(), ref_d, rtol=1e-6)


def test_queries_far_beyond_the_bank():
    # queries 1e30 x the bank: searched in their own scale, distances still right
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(30, 4)) * 1e-20
    queries = np.vstack([rng.normal(size=(3, 4)) * 1e10, rng.normal(size=(2, 4)) * 1e-20])
    q32, b32 = (torch.tensor(a, dtype=torch.float32) for a in (queries, bank))
    d, i = KNNIndex(b32).search(q32, 2)
    brute = np.sqrt(_brute_sq(q32.double().numpy(), b32.double().numpy()))
    np.testing.assert_allclose(d.double().numpy(), np.sort(brute, 1)[:, :2], rtol=1e-6)
    np.testing.assert_array_equal(i[3:].numpy(), np.argsort(brute[3:], 1)[:, :2])
    for row in range(5):  # far and near queries alone equal them in the batch
        one = KNNIndex(b32).search(q32[row : row + 1], 2)
        assert torch.equal(one[0][0], d[row]) and torch.equal(one[1][0], i[row])


def test_squared_overflow_raises():
    bank = torch.tensor([[0.0], [3e30]])
    d, i = KNNIndex(bank).search(torch.tensor([[1e30]]), 2)
    torch.testing.assert_close(d, torch.tensor([[1e30, 2e30]]))
    with pytest.raises(ValueError, match="squared distances exceed the range of torch.float32"):
        KNNIndex(bank).search(torch.tensor([[1e30]]), squared=True)
    with pytest.raises(ValueError, match="distances exceed the range"):
        KNNIndex(torch.tensor([[-3e38], [3e38]])).search(torch.tensor([[-3e38]]), 2)
    with pytest.raises(ValueError, match="exceed the range"):
        pairwise_sq_distances(bank, torch.tensor([[1e30]]))


def test_half_and_integer_inputs_are_computed_in_float32():
    bank = torch.tensor([[0, 0], [3, 4], [1, 0]], dtype=torch.float16)
    d, i = KNNIndex(bank).search(torch.tensor([[0.0, 0.5]], dtype=torch.bfloat16), 2)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, torch.tensor([[0.5, 1.118034]]))
    assert i.tolist() == [[0, 2]]
    d, i = knn_distances(torch.tensor([[0, 1]]), torch.tensor([[0, 0], [5, 5]]), squared=True)
    assert d.dtype == torch.get_default_dtype() and d.tolist() == [[1.0]]
    assert pairwise_sq_distances(bank, bank).dtype == torch.float32


def test_empty_axes():
    with pytest.raises(ValueError, match="0 features \\(axis 1"):
        KNNIndex(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="0 rows along axis 0"):
        KNNIndex(torch.zeros(0, 3))
    d, i = KNNIndex(torch.zeros(3, 2)).search(torch.zeros(0, 2), 2)
    assert d.shape == i.shape == (0, 2)
    assert pairwise_sq_distances(torch.zeros(2, 0), torch.zeros(3, 0)).tolist() == [[0.0] * 3] * 2
    assert pairwise_sq_distances(torch.zeros(0, 2), torch.zeros(3, 2)).shape == (0, 3)


def test_exact_distances_do_not_depend_on_the_block_shape():
    # torch reduces a (p, 60000) block differently for different p: the fixed-shape
    # blocks make a query alone give the bits it gets in a batch
    gen = torch.Generator().manual_seed(7)
    bank, queries = torch.randn(3, 60_000, generator=gen), torch.randn(6, 60_000, generator=gen)
    index = KNNIndex(bank)
    d, i = index.search(queries, 3)
    for row in range(6):
        one = index.search(queries[row : row + 1], 3)
        assert torch.equal(one[0][0], d[row]) and torch.equal(one[1][0], i[row])
    np.testing.assert_allclose(d.double().numpy() ** 2, np.sort(_brute_sq(
        queries.double().numpy(), bank.double().numpy()), 1), rtol=1e-5)


def test_exhaustive_pass_gives_the_candidate_pass_bits(monkeypatch):
    # with no extra candidate the bound can never certify: every query goes exhaustive
    import skanomaly.functional.neighbors as module

    gen = torch.Generator().manual_seed(8)
    bank, queries = torch.randn(500, 48, generator=gen), torch.randn(30, 48, generator=gen)
    bank[7] = bank[3]  # an exact tie, to the smaller index in both passes
    queries[0] = bank[3]
    want = KNNIndex(bank).search(queries, 3, squared=True)
    monkeypatch.setattr(module, "_EXTRA", 0)
    got = KNNIndex(bank).search(queries, 3, squared=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[1][0, :2].tolist() == [3, 7]


# ------------------------------------------------------------------ pruned search
def _low_rank(rng, n, d, rank, noise):
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + noise * rng.normal(
        size=(n, d))


@settings(deadline=None, max_examples=30)
@given(n_bank=st.integers(9, 90), n_queries=st.integers(1, 30), n_features=st.integers(32, 70),
       rank=st.integers(1, 8), k=st.integers(1, 4), integer=st.booleans(),
       dtype=st.sampled_from(["float32", "float64"]), variance=st.sampled_from([0.3, 0.7, 0.97]),
       seed=st.integers(0, 2**16))
def test_pruned_search_gives_the_plain_search_bits(n_bank, n_queries, n_features, rank, k,
                                                   integer, dtype, variance, seed):
    # the pruned search at any size (thresholds lowered), against the plain search and a
    # float64 brute force; integer data tie everywhere, so the bound must send queries on
    import skanomaly.functional.neighbors as module

    rng = np.random.default_rng(seed)
    if integer:
        bank = rng.integers(-1, 2, size=(n_bank, rank)) @ rng.integers(-1, 2, size=(rank,
                                                                                    n_features))
        queries = rng.integers(-1, 2, size=(n_queries, rank)) @ rng.integers(
            -1, 2, size=(rank, n_features))
    else:
        bank = _low_rank(rng, n_bank, n_features, rank, 1e-3)
        queries = _low_rank(rng, n_queries, n_features, rank, 1e-3)
    torch_dtype = getattr(torch, dtype)
    bank, queries = (torch.tensor(a, dtype=torch_dtype) for a in (bank, queries))
    plain = KNNIndex(bank).search(queries, k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "_PRUNE_MIN_BANK", 1)
        mp.setattr(module, "_PRUNE_MIN_QUERIES", 1)
        mp.setattr(module, "_PRUNE_VARIANCE", variance)
        pruned = KNNIndex(bank).search(queries, k)
    assert torch.equal(pruned[0], plain[0]) and torch.equal(pruned[1], plain[1])
    brute = _brute_sq(queries.double().numpy(), bank.double().numpy())
    ref_sq, ref_idx = _ranked(brute, k)
    np.testing.assert_allclose(pruned[0].double().numpy() ** 2, ref_sq, rtol=1e-5 if dtype ==
                               "float32" else 1e-12, atol=1e-30)
    if integer:
        np.testing.assert_array_equal(pruned[1].numpy(), ref_idx)


def test_pruned_search_is_used_and_sends_ties_on(monkeypatch):
    # PatchCore's regime (a large bank of low intrinsic dimension): the pruning projection
    # is built and settles most queries; a query with more exact ties than candidates
    # (rows 0-9 have 10 copies each) is sent on to the plain search
    import skanomaly.functional.neighbors as module

    rng = np.random.default_rng(3)
    bank = _low_rank(rng, 2600, 64, 6, 1e-2).astype(np.float32)
    bank[2500:] = np.tile(bank[:10], (10, 1))  # row 2500 + 10 m + j copies row j
    queries = np.concatenate([_low_rank(rng, 300, 64, 6, 1e-2), bank[:10]]).astype(np.float32)
    calls = {"pruned": 0, "sent on": 0}
    pruned_search, near = KNNIndex._search_pruned, KNNIndex._search_near

    def spy_pruned(self, *args, **kwargs):
        calls["pruned"] += 1
        return pruned_search(self, *args, **kwargs)

    def spy_near(self, prepared, scaled, *args, prune=True, **kwargs):
        if not prune:
            calls["sent on"] += scaled.shape[0]
        return near(self, prepared, scaled, *args, prune=prune, **kwargs)

    monkeypatch.setattr(KNNIndex, "_search_pruned", spy_pruned)
    monkeypatch.setattr(KNNIndex, "_search_near", spy_near)
    index = KNNIndex(torch.from_numpy(bank))
    for k in (1, 3):
        d, i = index.search(torch.from_numpy(queries), k)
        ref_d = NearestNeighbors(n_neighbors=k).fit(bank.astype(np.float64)).kneighbors(
            queries.astype(np.float64))[0]
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-4, atol=1e-6)
        # the rows returned are at those distances, equal distances by ascending index
        brute = _brute_sq(queries.astype(np.float64), bank.astype(np.float64))
        np.testing.assert_allclose(np.take_along_axis(brute, i.numpy(), 1), ref_d ** 2,
                                   rtol=1e-4, atol=1e-6)
        tied = d.numpy()[:, :-1] == d.numpy()[:, 1:]
        assert np.all(i.numpy()[:, :-1][tied] < i.numpy()[:, 1:][tied])
        expected = np.arange(10)[:, None] + np.array([0, 2500, 2510])[:k]
        np.testing.assert_array_equal(i.numpy()[300:], expected)
        monkeypatch.setattr(module, "_PRUNE_MIN_BANK", 10**9)
        plain = index.search(torch.from_numpy(queries), k)
        monkeypatch.setattr(module, "_PRUNE_MIN_BANK", 2048)
        assert torch.equal(plain[0], d) and torch.equal(plain[1], i)
    assert calls["pruned"] == 2
    assert 2 * 10 <= calls["sent on"] < 0.5 * 2 * len(queries)


@pytest.mark.parametrize("width", [64 * 16, 64 * 16 + 5, 64 * 64, 100])
@pytest.mark.parametrize("k", [1, 4])
def test_block_selection_matches_topk(width, k):
    # the smallest values through the groups' minima: the multiset of torch.topk, ties and
    # +inf included; the columns returned hold those values
    from skanomaly.functional.neighbors import _block_smallest

    gen = torch.Generator().manual_seed(width + k)
    block = torch.randint(0, 50, (40, width), generator=gen).float()
    block[::7, ::3] = float("inf")
    block[5] = float("inf")
    values, columns = _block_smallest(block, k)
    expected = torch.topk(block, k, dim=1, largest=False).values
    assert torch.equal(values, expected)
    assert torch.equal(block.gather(1, columns), values)
