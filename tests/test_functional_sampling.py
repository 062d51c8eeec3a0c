"""Sampling kernels: JL bound and sparse projection vs scikit-learn, k-center greedy vs numpy."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import sparse
from sklearn.random_projection import SparseRandomProjection
from sklearn.random_projection import johnson_lindenstrauss_min_dim as sk_jl_min_dim

from skanomaly.functional import (
    johnson_lindenstrauss_min_dim,
    k_center_greedy,
    sparse_random_projection_matrix,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------- JL bound

@pytest.mark.parametrize("n_samples", [1, 2, 10, 1000, 219_520, 10**9])
@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5, 0.9, 0.999])
def test_jl_min_dim_matches_sklearn(n_samples, eps):
    got = johnson_lindenstrauss_min_dim(n_samples, eps=eps)
    assert isinstance(got, int) and got == int(sk_jl_min_dim(n_samples, eps=eps))


def test_jl_min_dim_sequences_match_sklearn():
    counts, epsilons = [5, 100, 10_000], [0.2, 0.5, 0.7]
    assert johnson_lindenstrauss_min_dim(counts, 0.3) == sk_jl_min_dim(counts, eps=0.3).tolist()
    assert johnson_lindenstrauss_min_dim(100, epsilons) == sk_jl_min_dim(100, eps=epsilons).tolist()
    assert (johnson_lindenstrauss_min_dim(counts, epsilons)
            == sk_jl_min_dim(counts, eps=epsilons).tolist())
    assert (johnson_lindenstrauss_min_dim(np.array(counts), torch.tensor([0.5]))
            == sk_jl_min_dim(np.array(counts), eps=np.array([0.5])).tolist())
    assert johnson_lindenstrauss_min_dim([], 0.5) == []
    scalar = johnson_lindenstrauss_min_dim(np.int64(50), np.float64(0.5))
    assert isinstance(scalar, int) and scalar == sk_jl_min_dim(50, eps=0.5)


@pytest.mark.parametrize(("n_samples", "eps"), [(0, 0.1), (-3, 0.1), (10, 0.0), (10, 1.0),
                                                ([10, 0], 0.5), (10, [0.5, 1.5])])
def test_jl_min_dim_errors_as_sklearn(n_samples, eps):
    with pytest.raises(ValueError):
        sk_jl_min_dim(n_samples, eps=eps)
    with pytest.raises(ValueError, match="JL bound"):
        johnson_lindenstrauss_min_dim(n_samples, eps)


def test_jl_min_dim_type_and_length_errors():
    with pytest.raises(TypeError, match="n_samples"):
        johnson_lindenstrauss_min_dim(10.5)
    with pytest.raises(TypeError, match="eps"):
        johnson_lindenstrauss_min_dim(10, "0.1")
    with pytest.raises(ValueError, match="lengths"):
        johnson_lindenstrauss_min_dim([10, 20, 30], [0.1, 0.2])


# ------------------------------------------------------------ sparse projection

@pytest.mark.parametrize("density", ["auto", 0.05, 1.0])
def test_projection_values_match_sklearn_scale(density):
    n_components, n_features = 40, 400
    m = sparse_random_projection_matrix(n_components, n_features, density, generator=_gen(0))
    assert m.shape == (n_components, n_features) and m.dtype == torch.get_default_dtype()
    ref = SparseRandomProjection(n_components, density=density, dense_output=True,
                                 random_state=0).fit(np.zeros((2, n_features)))
    ref = ref.components_.toarray() if sparse.issparse(ref.components_) else ref.components_
    scale = np.abs(ref[ref != 0])
    np.testing.assert_allclose(scale, scale[0])  # scikit-learn's one non-zero magnitude
    got = m.numpy()
    np.testing.assert_allclose(np.abs(got[got != 0]), scale[0], rtol=1e-6)


def test_projection_frequencies_are_binomial():
    n_components, n_features, density = 200, 2500, 0.1
    m = sparse_random_projection_matrix(n_components, n_features, density, generator=_gen(1))
    total = n_components * n_features
    nonzero, positive = int((m != 0).sum()), int((m > 0).sum())
    # Six standard deviations of the binomial counts.
    assert abs(nonzero - total * density) < 6 * math.sqrt(total * density * (1 - density))
    assert abs(positive - nonzero / 2) < 6 * math.sqrt(nonzero / 4)
    auto = sparse_random_projection_matrix(n_components, n_features, generator=_gen(2))
    p = 1 / math.sqrt(n_features)
    assert abs(int((auto != 0).sum()) - total * p) < 6 * math.sqrt(total * p * (1 - p))


def test_projection_is_reproducible_and_dtype_independent():
    a = sparse_random_projection_matrix(10, 50, generator=_gen(3))
    b = sparse_random_projection_matrix(10, 50, generator=_gen(3), dtype=torch.float64)
    c = sparse_random_projection_matrix(10, 50, generator=_gen(4))
    assert b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b)
    assert not torch.equal(a, c)


def test_projection_preserves_distances_within_jl_bound():
    eps, n = 0.5, 40
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(n, 3000)))
    k = johnson_lindenstrauss_min_dim(n, eps)
    m = sparse_random_projection_matrix(k, 3000, generator=_gen(6), dtype=torch.float64)
    before = torch.pdist(x) ** 2
    after = torch.pdist(x @ m.T) ** 2
    ratio = after / before
    assert float(ratio.min()) > 1 - eps and float(ratio.max()) < 1 + eps


def test_projection_errors():
    with pytest.raises(ValueError, match="density"):
        sparse_random_projection_matrix(3, 10, 0.0)
    with pytest.raises(ValueError, match="density"):
        sparse_random_projection_matrix(3, 10, 1.5)
    with pytest.raises(ValueError, match="density"):
        sparse_random_projection_matrix(3, 10, "sqrt")
    with pytest.raises(TypeError, match="density"):
        sparse_random_projection_matrix(3, 10, None)
    with pytest.raises(ValueError, match="n_components"):
        sparse_random_projection_matrix(0, 10)
    with pytest.raises(TypeError, match="n_features"):
        sparse_random_projection_matrix(3, 10.0)
    with pytest.raises(TypeError, match="generator"):
        sparse_random_projection_matrix(3, 10, generator=0)


# --------------------------------------------------------------- k-center greedy

def _reference_k_center(x, n_centers, first):
    """Textbook greedy farthest-point selection with exact distances."""
    selected = [first]
    min_dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(n_centers - 1):
        candidates = np.where(np.isin(np.arange(len(x)), selected), -np.inf, min_dist)
        nxt = int(np.argmax(candidates))
        selected.append(nxt)
        min_dist = np.minimum(min_dist, ((x - x[nxt]) ** 2).sum(1))
    return np.array(selected)


def _covering_radius(x, centers):
    return float(np.sqrt(((x[:, None, :] - x[centers][None]) ** 2).sum(-1).min(1).max()))


@pytest.fixture
def points():
    return np.random.default_rng(0).normal(size=(300, 8))


def test_k_center_matches_reference(points):
    got = k_center_greedy(torch.tensor(points), 40, generator=_gen(7)).numpy()
    first = int(torch.randint(300, (1,), generator=_gen(7)))
    assert got[0] == first
    np.testing.assert_array_equal(got, _reference_k_center(points, 40, first))


def test_k_center_with_projection_matches_reference(points):
    proj = sparse_random_projection_matrix(5, 8, 0.5, generator=_gen(8), dtype=torch.float64)
    got = k_center_greedy(torch.tensor(points), 30, generator=_gen(9), projection=proj).numpy()
    reference = _reference_k_center(points @ proj.numpy().T, 30, int(got[0]))
    np.testing.assert_array_equal(got, reference)


def test_k_center_covering_radius_shrinks(points):
    x = torch.tensor(points)
    full = k_center_greedy(x, 60, generator=_gen(10)).numpy()
    radii = [_covering_radius(points, full[:k]) for k in (1, 5, 20, 60)]
    assert all(a >= b for a, b in zip(radii, radii[1:]))
    # The selection with fewer centres is a prefix of the longer one.
    np.testing.assert_array_equal(k_center_greedy(x, 20, generator=_gen(10)).numpy(), full[:20])
    # The greedy covering radius is the distance of the next point it would pick.
    min_dist = ((points[:, None, :] - points[full[:59]][None]) ** 2).sum(-1).min(1)
    assert math.isclose(math.sqrt(min_dist[full[59]]), _covering_radius(points, full[:59]))


def test_k_center_is_a_two_approximation():
    x = np.random.default_rng(11).normal(size=(12, 2))
    optimum = min(_covering_radius(x, list(c)) for c in itertools.combinations(range(12), 3))
    for seed in range(5):
        centers = k_center_greedy(torch.tensor(x), 3, generator=_gen(seed)).numpy()
        assert _covering_radius(x, centers) <= 2 * optimum + 1e-12


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_k_center_chunking_does_not_change_result(points, chunk_size):
    x = torch.tensor(points)
    torch.testing.assert_close(
        k_center_greedy(x, 25, generator=_gen(12), chunk_size=chunk_size),
        k_center_greedy(x, 25, generator=_gen(12)),
    )


def test_k_center_reproducible_unique_and_complete(points):
    x = torch.tensor(points[:50])
    a = k_center_greedy(x, 50, generator=_gen(13))
    assert torch.equal(a, k_center_greedy(x, 50, generator=_gen(13)))
    assert sorted(a.tolist()) == list(range(50))
    assert a.dtype == torch.long


def test_k_center_duplicates_are_not_reselected():
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0], [5.0]]).repeat(3, 1)
    got = k_center_greedy(x, 15, generator=_gen(0)).tolist()
    assert len(set(got)) == 15
    # Ties go to the lowest index: after the three distinct values, index order.
    assert sorted(x[got[:3], 0].tolist()) == [0.0, 1.0, 5.0]


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_k_center_torch_and_numpy_loops_agree(points, chunk):
    # The CPU runs the numpy loop; the torch loop (accelerators) is checked here too.
    from skanomaly.functional.sampling import _k_center_greedy_numpy, _k_center_greedy_torch

    x = torch.as_tensor(points)
    x = x - x.mean(0)
    xt, sq = x.T.contiguous(), x.square().sum(1)
    want = _reference_k_center(points, 12, 5)
    got_np = _k_center_greedy_numpy(xt.numpy(), sq.numpy(), 12, 5, chunk)
    got_torch = _k_center_greedy_torch(xt, sq, 12, torch.tensor([5]), chunk)
    np.testing.assert_array_equal(got_np, want)
    np.testing.assert_array_equal(got_torch.numpy(), want)


def test_k_center_float32(points):
    x = torch.tensor(points, dtype=torch.float32)
    got = k_center_greedy(x, 20, generator=_gen(14)).numpy()
    np.testing.assert_array_equal(got, _reference_k_center(points, 20, int(got[0])))


def test_k_center_input_not_mutated(points):
    x = torch.tensor(points)
    copy = x.clone()
    k_center_greedy(x, 10, generator=_gen(0))
    assert torch.equal(x, copy)


def test_k_center_errors(points):
    x = torch.tensor(points[:10])
    with pytest.raises(ValueError, match="n_centers"):
        k_center_greedy(x, 0)
    with pytest.raises(ValueError, match="exceeds"):
        k_center_greedy(x, 11)
    with pytest.raises(TypeError, match="n_centers"):
        k_center_greedy(x, 2.0)
    bad = x.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(bad, 2)
    with pytest.raises(ValueError, match="2-D"):
        k_center_greedy(x[None], 2)
    with pytest.raises(ValueError, match="columns"):
        k_center_greedy(x, 2, projection=torch.ones(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        k_center_greedy(x, 2, chunk_size=0)
    with pytest.raises(TypeError, match="generator"):
        k_center_greedy(x, 2, generator=42)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(points):
    x = torch.tensor(points)
    proj = sparse_random_projection_matrix(5, 8, generator=_gen(1), dtype=torch.float64)
    proj_gpu = sparse_random_projection_matrix(5, 8, generator=_gen(1), dtype=torch.float64,
                                               device="cuda")
    assert proj_gpu.is_cuda and torch.equal(proj_gpu.cpu(), proj)
    got = k_center_greedy(x.cuda(), 30, generator=_gen(2), projection=proj_gpu)
    assert got.is_cuda
    assert torch.equal(got.cpu(), k_center_greedy(x, 30, generator=_gen(2), projection=proj))


# ------------------------------------------------------------- any finite scale

@pytest.mark.parametrize("scale", [1e-300, 1e-30, 1e-6, 1e6, 1e19, 1e30, 1e300])
def test_k_center_any_finite_scale_float64(points, scale):
    # a power-of-two rescaling changes no comparison: the unit-scale reference holds
    x = torch.tensor(points * scale)
    got = k_center_greedy(x, 40, generator=_gen(7)).numpy()
    np.testing.assert_array_equal(got, _reference_k_center(points, 40, int(got[0])))


@pytest.mark.parametrize("scale", [1e-30, 1e19, 1e37])
def test_k_center_any_finite_scale_float32(scale):
    # the probe: 1e19 used to overflow the squares and repeat indices
    x = torch.randn(20, 5, generator=_gen(0))
    got = k_center_greedy(x * scale, 8, generator=_gen(1))
    assert len(set(got.tolist())) == 8
    assert torch.equal(got, k_center_greedy(x, 8, generator=_gen(1)))
    proj = sparse_random_projection_matrix(3, 5, generator=_gen(2), dtype=torch.float32)
    with_proj = k_center_greedy(x * scale, 8, generator=_gen(1), projection=proj * 1e-20)
    assert torch.equal(with_proj, k_center_greedy(x, 8, generator=_gen(1), projection=proj))


def test_k_center_all_duplicates_in_index_order():
    got = k_center_greedy(torch.full((7, 3), 1e30), 7, generator=_gen(3)).tolist()
    assert got == [got[0]] + [i for i in range(7) if i != got[0]]


def test_k_center_half_is_computed_in_float32(points):
    x16 = torch.tensor(points, dtype=torch.float16)
    got = k_center_greedy(x16, 20, generator=_gen(14)).numpy()
    np.testing.assert_array_equal(got, _reference_k_center(x16.double().numpy(), 20,
                                                           int(got[0])))


def test_sampling_edge_errors():
    with pytest.raises(ValueError, match="0 features \\(axis 1"):
        k_center_greedy(torch.zeros(4, 0), 2)
    with pytest.raises(ValueError, match="0 samples of x \\(axis 0\\)"):
        k_center_greedy(torch.zeros(0, 3), 1)
    with pytest.raises(ValueError, match="0 rows"):
        k_center_greedy(torch.zeros(4, 3), 2, projection=torch.zeros(0, 3))
    with pytest.raises(ValueError, match="too small"):
        johnson_lindenstrauss_min_dim(10, 1e-200)
    with pytest.raises(ValueError, match="beyond the range of torch.float32"):
        sparse_random_projection_matrix(3, 10, 1e-300, dtype=torch.float32)
    with pytest.raises(TypeError, match="floating"):
        sparse_random_projection_matrix(3, 10, dtype=torch.int64)
    huge = sparse_random_projection_matrix(3, 10, 1e-300, dtype=torch.float64)
    assert bool(torch.isfinite(huge).all())
