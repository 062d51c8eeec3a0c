"""Fuzz every public kernel: finite output or a ValueError/TypeError, input never modified.

Inputs span scales from 1e-300 to 1e300 (clipped to each dtype's range, so that they
stay finite), zero-length axes, float16/bfloat16/float32/float64, integer and boolean
dtypes. A kernel may refuse an input with ValueError or TypeError; anything else it
raises, any NaN or infinity it returns, and any change to its input fail the test.

``test_every_public_kernel_is_fuzzed`` at the end keeps the list honest.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skanomaly import functional as F
from skanomaly import metrics
from skanomaly.anomaly_map import postprocess_anomaly_map

# SKANOMALY_FUZZ_EXAMPLES=500 for a longer hunt; 40 keeps each test to a few seconds
FUZZ = settings(max_examples=int(os.environ.get("SKANOMALY_FUZZ_EXAMPLES", 40)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPES = [*FLOATS, torch.int64, torch.int32, torch.uint8, torch.bool]


# --------------------------------------------------------------------------- inputs

def _values(rng, shape, kind: str, exponent: int) -> np.ndarray:
    """float64 values of a kind (normal, constant, duplicated rows, few levels, sparse)."""
    if kind == "constant":
        out = np.full(shape, rng.normal())
    elif kind == "duplicates" and len(shape) >= 1 and shape[0] > 0:
        base = rng.normal(size=(max(1, shape[0] // 3), *shape[1:]))
        out = base[rng.integers(0, len(base), size=shape[0])]
    elif kind == "levels":
        out = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif kind == "sparse":
        out = rng.normal(size=shape) * (rng.random(size=shape) < 0.2)
    else:
        out = rng.normal(size=shape)
    return out * 10.0**exponent


def _to_tensor(values: np.ndarray, dtype: torch.dtype, rng) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.from_numpy(rng.random(size=values.shape) < 0.5)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        ints = rng.integers(max(info.min, -1000), min(info.max, 1000) + 1, size=values.shape)
        return torch.from_numpy(ints).to(dtype)
    top = float(torch.finfo(dtype).max)
    return torch.from_numpy(np.clip(values, -top, top)).to(dtype)


@st.composite
def tensors(draw, shape=None, *, ndim=2, max_side=5, min_side=0, dtypes=DTYPES,
            exponent=None):
    """A finite tensor of a drawn shape, dtype, kind and scale (10**-300 .. 10**300)."""
    if shape is None:
        shape = tuple(draw(st.integers(min_side, max_side)) for _ in range(ndim))
    dtype = draw(st.sampled_from(dtypes))
    if exponent is None:
        exponent = draw(st.one_of(st.integers(-300, 300), st.sampled_from([-40, -20, 0, 20, 40])))
    kind = draw(st.sampled_from(["normal", "constant", "duplicates", "levels", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return _to_tensor(_values(rng, shape, kind, exponent), dtype, rng)


def _psd(draw, batch: tuple, d: int, dtypes=DTYPES) -> torch.Tensor:
    """Symmetric positive-(semi)definite matrices A A^T / d at a drawn scale."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rank = draw(st.integers(1, max(1, d)))
    a = rng.normal(size=(*batch, d, rank))
    exponent = draw(st.integers(-300, 300))
    m = a @ np.swapaxes(a, -1, -2) / max(1, rank) * 10.0**exponent
    m = (m + np.swapaxes(m, -1, -2)) / 2
    dtype = draw(st.sampled_from(dtypes))
    return _to_tensor(m, dtype, rng)


# --------------------------------------------------------------------------- checks

def _snapshot(obj):
    """Copies of the tensors and arrays in ``obj`` (other objects kept as they are: torch
    < 2.2 cannot deepcopy a Generator, and only tensors and arrays are compared)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple (PCAFit)
        return type(obj)(*(_snapshot(x) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a, b)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True  # scalars, generators, modules: compared elsewhere if at all


def _finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind not in "fc" or bool(np.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, (list, tuple)):
        return all(_finite(x) for x in obj)
    return True


def check(fn, *args, select=None, **kwargs):
    """Call ``fn``; assert finite output (or ValueError/TypeError) and unchanged inputs.

    Returns the output, or None when ``fn`` refused the input.
    """
    before = _snapshot((args, kwargs))
    try:
        out = fn(*args, **kwargs)
    except (ValueError, TypeError):
        out = None
    else:
        shown = out if select is None else select(out)
        assert _finite(shown), f"{getattr(fn, '__name__', fn)} returned NaN or infinity"
    assert _same(before, (args, kwargs)), f"{getattr(fn, '__name__', fn)} modified its input"
    return out


# --------------------------------------------------------------------------- covariance

@FUZZ
@given(m=tensors(ndim=2), rowvar=st.booleans(), bias=st.booleans(),
       ddof=st.sampled_from([None, 0, 1, 2]), weighted=st.sampled_from([None, "f", "a"]),
       data=st.data())
def test_cov(m, rowvar, bias, ddof, weighted, data):
    n_obs = m.shape[1] if rowvar else m.shape[0]
    kwargs = {}
    if weighted == "f":
        kwargs["fweights"] = torch.from_numpy(
            np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, 4, size=n_obs))
    elif weighted == "a":
        kwargs["aweights"] = data.draw(tensors((n_obs,), dtypes=FLOATS)).abs()
    check(F.cov, m, rowvar=rowvar, bias=bias, ddof=ddof, **kwargs)


@FUZZ
@given(data=st.data(), d=st.integers(1, 4), p=st.sampled_from([(), (2,)]))
def test_moment_accumulator(data, d, p):
    acc = F.MomentAccumulator(d, p)
    for _ in range(data.draw(st.integers(1, 3))):
        x = data.draw(tensors((*p, data.draw(st.integers(0, 5)), d)))
        if check(acc.update, x) is None:
            break
    check(acc.covariance, data.draw(st.sampled_from([0, 1])))
    other = F.MomentAccumulator(d, p)
    check(other.update, data.draw(tensors((*p, 3, d))))
    check(acc.merge, other)
    assert _finite(acc.mean) and _finite(acc.scatter)


# --------------------------------------------------------------------------- mahalanobis

@FUZZ
@given(data=st.data(), d=st.integers(0, 4), p=st.sampled_from([(), (3,)]),
       n=st.integers(0, 4), how=st.sampled_from(["covariance", "cholesky", "precision"]),
       reg=st.sampled_from([0.0, 1e-300, 1e-6, 1.0, 1e300]), squared=st.booleans())
def test_mahalanobis(data, d, p, n, how, reg, squared):
    x = data.draw(tensors((n, *p, d)))
    mean = data.draw(tensors((*p, d)))
    cov = _psd(data.draw, p, d)
    # the fitted module (P, d) validates at construction only (its forward is unchecked)
    positions = (lambda t: t) if p else (lambda t: t[None])
    if how == "covariance":
        check(F.mahalanobis, x, mean, covariance=cov, reg=reg, squared=squared)
        check(F.GaussianScorer.from_covariance, positions(mean), positions(cov), reg=reg,
              squared=squared)
        return
    factor = check(F.regularized_cholesky, cov, reg=reg)
    if factor is None:
        factor = data.draw(tensors((*p, d, d)))  # not triangular in general: must refuse
    if how == "cholesky":
        check(F.mahalanobis, x, mean, cholesky=factor, squared=squared)
        check(F.GaussianScorer.from_cholesky, positions(mean), positions(factor))
        return
    check(F.tril_inverse, factor)
    upper = check(F.precision_cholesky, factor)
    if upper is not None:
        check(F.mahalanobis, x, mean, precision_cholesky=upper, squared=squared)
        check(F.GaussianScorer, positions(mean), positions(upper), squared=squared)


@FUZZ
@given(data=st.data(), d=st.integers(0, 5), n=st.integers(0, 4), p=st.sampled_from([(), (2,)]),
       reg=st.sampled_from([1e-300, 1e-3, 1.0, 1e300]), ddof=st.sampled_from([0, 1]),
       given_factor=st.booleans())
def test_woodbury(data, d, n, p, reg, ddof, given_factor):
    centered = data.draw(tensors((*p, n, d)))
    x = data.draw(tensors((2, *p, d)))
    mean = data.draw(tensors((*p, d)))
    factor = check(F.woodbury_factor, centered, reg, ddof=ddof) if given_factor else None
    check(F.mahalanobis_woodbury, x, mean, centered, factor, reg, ddof=ddof)
    positions = (lambda t: t) if p else (lambda t: t[None])
    check(F.WoodburyGaussianScorer, positions(mean), positions(centered), reg,
          factor=None if factor is None else positions(factor), ddof=ddof)


# --------------------------------------------------------------------------- decomposition

@FUZZ
@given(x=tensors(ndim=2, max_side=6), n_components=st.sampled_from([None, 1, 2, 0.5, 0.99]),
       data=st.data())
def test_pca(x, n_components, data):
    fit = check(F.pca_fit, x, n_components)
    if fit is None:
        return
    q = data.draw(tensors((data.draw(st.integers(0, 4)), x.shape[1])))
    z = check(F.pca_transform, q, fit)
    check(F.pca_inverse_transform, data.draw(tensors((3, fit.n_components))), fit)
    if z is not None:
        check(F.pca_inverse_transform, z, fit)
    # the fitted module validates at construction only (its forward is unchecked)
    check(F.PCAProjection.from_fit, fit, whiten=data.draw(st.booleans()))
    check(F.PCAProjection, data.draw(tensors((fit.n_components, x.shape[1]))),
          data.draw(tensors((data.draw(st.sampled_from([0, x.shape[1]])),))),
          data.draw(st.sampled_from([None, fit.explained_variance])),
          whiten=data.draw(st.booleans()))


# --------------------------------------------------------------------------- neighbours

@FUZZ
@given(bank=tensors(ndim=2, max_side=7), data=st.data(), k=st.integers(1, 4),
       squared=st.booleans(), grouped=st.booleans())
def test_knn(bank, data, k, squared, grouped):
    queries = data.draw(tensors((data.draw(st.integers(0, 6)), bank.shape[1])))
    groups = torch.from_numpy(np.arange(bank.shape[0]) % 2) if grouped else None
    index = check(F.KNNIndex, bank, groups=groups)
    if index is not None:
        labels = torch.from_numpy(np.arange(queries.shape[0]) % 3) if grouped else None
        out = check(index.search, queries, k, squared=squared, query_groups=labels)
        if out is not None:
            dist, idx = out
            assert bool((dist >= 0).all()) and bool((idx >= 0).all())
            assert bool((idx < bank.shape[0]).all())
    check(F.knn_distances, queries, bank, k, squared=squared)
    check(F.pairwise_sq_distances, queries, bank)


# --------------------------------------------------------------------------- sampling

@FUZZ
@given(x=tensors(ndim=2, max_side=8), data=st.data(), project=st.booleans())
def test_k_center_greedy(x, data, project):
    n = data.draw(st.integers(1, max(1, x.shape[0])))
    projection = data.draw(tensors((data.draw(st.integers(0, 3)), x.shape[1]))) if project \
        else None
    out = check(F.k_center_greedy, x, n, generator=torch.Generator().manual_seed(0),
                projection=projection)
    if out is not None:
        assert len(set(out.tolist())) == n and bool((out < x.shape[0]).all())


@FUZZ
@given(n=st.one_of(st.integers(-2, 10**12), st.lists(st.integers(1, 10**6), max_size=3)),
       eps=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([1e-300, 1e-160, 1e-150, 0.5, 0.999999])),
       n_components=st.integers(0, 6), n_features=st.integers(0, 6),
       density=st.one_of(st.sampled_from(["auto", 1e-300, 1e-30, 1.0]),
                         st.floats(allow_nan=True)),
       dtype=st.sampled_from(FLOATS))
def test_projection_and_jl_bound(n, eps, n_components, n_features, density, dtype):
    check(F.johnson_lindenstrauss_min_dim, n, eps)
    check(F.sparse_random_projection_matrix, n_components, n_features, density,
          generator=torch.Generator().manual_seed(0), dtype=dtype)


# --------------------------------------------------------------------------- spatial

SIGMAS = st.one_of(st.floats(min_value=1e-3, max_value=30.0),
                   st.sampled_from([1e-300, 1e6, 1e300, 0.0, -1.0, math.nan, math.inf]))


@FUZZ
@given(x=tensors(ndim=3, max_side=6), sigma=SIGMAS,
       truncate=st.sampled_from([0.0, 1.0, 4.0, 1e300]),
       size=st.tuples(st.integers(0, 9), st.integers(1, 9)))
def test_spatial(x, sigma, truncate, size):
    check(F.gaussian_kernel1d, sigma, truncate)
    check(F.gaussian_blur2d, x, sigma, truncate=truncate)
    check(F.upsample_bilinear, x, size)
    check(postprocess_anomaly_map, x, size, sigma=sigma)


@FUZZ
@given(x=tensors(ndim=4, max_side=6), tile=st.tuples(st.integers(0, 7), st.integers(0, 7)),
       stride=st.one_of(st.none(), st.tuples(st.integers(0, 7), st.integers(0, 7))),
       merge=st.sampled_from(["mean", "max", "median"]),
       resize=st.tuples(st.integers(0, 9), st.integers(0, 9)))
def test_tiling(x, tile, stride, merge, resize):
    check(F.tile_grid, tuple(x.shape[-2:]), tile, stride)
    check(F.resize_tiles, x, resize)
    tiles = check(F.tile, x, tile, stride)
    if tiles is not None and tiles.is_floating_point() and tiles.shape[1] > 0:
        check(F.untile, tiles[:, 0], tuple(x.shape[-2:]), stride, merge)
        check(F.untile, tiles, tuple(x.shape[-2:]), stride, merge)


# --------------------------------------------------------------------------- metrics

@FUZZ
@given(scores=tensors(ndim=1, max_side=8), data=st.data(), as_numpy=st.booleans())
def test_image_metrics(scores, data, as_numpy):
    n = scores.shape[0]
    labels = np.where(np.random.default_rng(data.draw(st.integers(0, 99))).random(n) < 0.4,
                      -1, 1)
    if as_numpy and scores.dtype != torch.bfloat16:
        scores = scores.numpy()
    check(metrics.image_auroc, labels, scores)
    check(metrics.average_precision_anomaly, labels, scores)


@FUZZ
@given(maps=tensors(ndim=3, max_side=6), data=st.data(),
       max_fpr=st.sampled_from([1e-300, 0.01, 0.3, 1.0, 0.0, math.nan]))
def test_pixel_metrics(maps, data, max_fpr):
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    masks = rng.random(tuple(maps.shape)) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    check(metrics.pixel_auroc, masks, maps)
    # thresholds run from +inf to -inf by definition: only fpr and pro must be finite
    check(metrics.pro_curve, masks, maps, select=lambda out: out[:2])
    check(metrics.pro_score, masks, maps, max_fpr=max_fpr)


# --------------------------------------------------------------------------- features

@pytest.fixture(scope="module")
def tiny_extractor():
    from skanomaly.features import FeatureExtractor

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 5, 3, stride=2, padding=1))
    return FeatureExtractor(net, layers=["0", "2"], normalize=False, batch_size=2).fit(
        np.zeros((1, 3, 8, 8), dtype=np.float32))


@FUZZ
@given(data=st.data(), n=st.integers(0, 3), h=st.integers(0, 9), w=st.integers(1, 9),
       as_numpy=st.booleans())
def test_feature_extractor_transform(tiny_extractor, data, n, h, w, as_numpy):
    x = data.draw(tensors((n, 3, h, w)))
    if as_numpy and x.dtype != torch.bfloat16:
        x = x.numpy()
    out = check(tiny_extractor.transform, x)
    if out is not None:  # tensor in, tensor out (on its device); else numpy
        expected = torch.float32 if isinstance(x, torch.Tensor) else np.float32
        assert out.shape[0] == n and out.dtype == expected
        assert isinstance(out, torch.Tensor) == isinstance(x, torch.Tensor)


@FUZZ
@given(dataset=tensors(ndim=2, max_side=7), data=st.data(), leave_one_out=st.booleans(),
       bandwidth=st.sampled_from(["scott", "silverman", 0.5, 1e-300, 1e300]),
       weighted=st.booleans())
def test_kde(dataset, data, leave_one_out, bandwidth, weighted):
    weights = None
    if weighted and dataset.ndim == 2:
        weights = data.draw(tensors((dataset.shape[0],), dtypes=FLOATS)).abs()
    if leave_one_out:
        points = dataset
    else:
        points = data.draw(tensors((data.draw(st.integers(0, 4)), dataset.shape[1])))
    check(F.gaussian_kde_logpdf, points, dataset, bandwidth, weights,
          leave_one_out=leave_one_out)
    check(F.kde_covariance, dataset, bandwidth, weights)
    kde = check(F.GaussianKDE, dataset, bandwidth, weights)
    if kde is not None:
        check(kde.logpdf, points, leave_one_out=leave_one_out)


@FUZZ
@given(x=tensors(ndim=2, max_side=6, dtypes=FLOATS), data=st.data(),
       ddof=st.sampled_from([0, 1]), shrinkage=st.sampled_from([0.0, 0.3, 1.0]),
       reg=st.sampled_from([0.0, 1e-3, 1e300]), squared=st.booleans())
def test_leave_one_out_mahalanobis(x, data, ddof, shrinkage, reg, squared):
    x64 = x.to(torch.float64)
    mean = x64.mean(0) if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64)
    r = x64 - mean
    scatter = r.T @ r
    target = data.draw(st.sampled_from([0.0, 1.0, 1e-300]))
    n = data.draw(st.sampled_from([x.shape[0], x.shape[0] + 5, 1]))
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(scatter).all())):
        return  # the moments themselves overflow: cov and MomentAccumulator report that
    check(F.leave_one_out_mahalanobis, x, mean, scatter, n, ddof=ddof, shrinkage=shrinkage,
          target=target, reg=reg, squared=squared)
    # the fit's unvalidated variant, on the same (finite) moments of one problem
    check(F.leave_one_out_from_residuals, r[None], scatter[None], n, ddof=ddof, reg=reg,
          squared=squared)


def test_every_public_kernel_is_fuzzed():
    # any new public kernel must be fuzzed in this file and named here
    fuzzed = {"cov", "MomentAccumulator", "regularized_cholesky", "precision_cholesky",
              "tril_inverse",
              "mahalanobis", "woodbury_factor", "mahalanobis_woodbury", "PCAFit", "PCAProjection",
              "pca_fit", "pca_transform", "pca_inverse_transform", "KNNIndex",
              "knn_distances", "pairwise_sq_distances", "k_center_greedy",
              "johnson_lindenstrauss_min_dim", "sparse_random_projection_matrix",
              "gaussian_kernel1d", "gaussian_blur2d", "upsample_bilinear",
              "gaussian_kde_logpdf", "kde_covariance", "GaussianKDE",
              "leave_one_out_mahalanobis", "leave_one_out_from_residuals", "GaussianScorer",
              "WoodburyGaussianScorer",
              "tile", "tile_grid", "resize_tiles", "untile"}
    assert set(F.__all__) <= fuzzed, set(F.__all__) - fuzzed
