"""skanomaly.functional.cov against numpy.cov, and MomentAccumulator against one-shot numpy."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from skanomaly.functional import MomentAccumulator, cov

RTOL = {np.float32: 1e-5, np.float64: 1e-10}
DOF_WARNING = "Degrees of freedom <= 0"


def _run_both(fn_np, fn_torch):
    """Call both: numpy warns where the normalisation is <= 0, skanomaly then raises.

    Returns numpy's result, skanomaly's (None where it raised) and whether each
    refused (numpy by its degrees-of-freedom warning).
    """
    with warnings.catch_warnings(record=True) as rec_np:
        warnings.simplefilter("always")
        ref = fn_np()
    try:
        out = fn_torch()
    except ValueError as exc:
        assert "degrees of freedom <= 0" in str(exc)
        out = None
    warned = [any(DOF_WARNING in str(w.message) for w in rec_np), out is None]
    return ref, out, warned


@st.composite
def cov_problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n_obs = draw(st.integers(0, 7))
    n_vars = draw(st.integers(1, 4))
    values = st.floats(-100, 100, width=32)
    data = draw(hnp.arrays(dtype, (n_vars, n_obs), elements=values))
    one_d = n_vars == 1 and draw(st.booleans())
    y = None
    if draw(st.booleans()):
        y = draw(hnp.arrays(dtype, (draw(st.integers(1, 3)), n_obs), elements=values))
        if y.shape[0] == 1 and draw(st.booleans()):
            y = y[0]
    weight = st.integers(0, 3)
    fw = draw(st.none() | hnp.arrays(np.int64, n_obs, elements=weight))
    # Dyadic observation weights keep the normalisation exact, so fact <= 0 is decided the
    # same way in both libraries.
    aw = draw(st.none() | hnp.arrays(np.float64, n_obs, elements=weight.map(lambda k: k / 4)))
    return dict(
        data=data[0] if one_d else data, y=y, rowvar=draw(st.booleans()),
        bias=draw(st.booleans()), ddof=draw(st.none() | st.integers(0, 3)), fweights=fw,
        aweights=aw)


def _layout(a, rowvar):
    return a if (a is None or a.ndim == 1 or rowvar) else a.T


@settings(max_examples=60, deadline=None)
@given(cov_problems())
def test_cov_matches_numpy(p):
    m, y = _layout(p["data"], p["rowvar"]), _layout(p["y"], p["rowvar"])
    kw = dict(rowvar=p["rowvar"], bias=p["bias"], ddof=p["ddof"])
    weights = {k: p[k] for k in ("fweights", "aweights") if p[k] is not None}
    dtype = p["data"].dtype.type
    tm = torch.from_numpy(m)
    ty = None if y is None else torch.from_numpy(y)
    tw = {k: torch.from_numpy(v) for k, v in weights.items()}
    before = [t.clone() for t in (tm, ty, *tw.values()) if t is not None]

    if weights and sum(np.prod(list(weights.values()), axis=0)) == 0:
        with pytest.raises(ValueError, match="weights sum to zero"):
            cov(tm, ty, **kw, **tw)
        return
    # numpy (uniquely) reads a (1, k) ``y`` with rowvar=False as one variable, and before
    # numpy 2.2 a (1, k) ``m`` too; the reference stacks the variables itself so that it
    # reads them as ``cov`` does.
    quirk = not p["rowvar"] and (
        (y is not None and y.ndim == 2 and y.shape[0] == 1)
        or (m.ndim == 2 and m.shape[0] == 1
            and np.lib.NumpyVersion(np.__version__) < "2.2.0"))
    ref_args = (np.vstack([np.atleast_2d(a) for a in (p["data"], p["y"]) if a is not None]),
                None) if quirk else (m, y)
    ref_kw = dict(kw, rowvar=True) if quirk else kw
    # Reference in float64 from the same (float32 or float64) data.
    ref, out, warned = _run_both(
        lambda: np.cov(*ref_args, **ref_kw, **weights, dtype=np.float64),
        lambda: cov(tm, ty, **kw, **tw))

    assert warned[0] == warned[1]
    if warned[0]:  # normalisation <= 0: numpy's result is all inf or nan, ours an error
        assert not np.isfinite(ref).any()
    else:
        assert out.dtype == tm.dtype
        assert tuple(out.shape) == ref.shape
        values = [np.abs(a).max(initial=0) for a in (p["data"], p["y"]) if a is not None]
        scale = max(1.0, float(max(values)) ** 2)
        np.testing.assert_allclose(out.numpy(), ref, rtol=RTOL[dtype],
                                   atol=RTOL[dtype] * scale * 4)
    for b, t in zip(before, [t for t in (tm, ty, *tw.values()) if t is not None]):
        assert torch.equal(b, t)


def test_cov_single_variable_is_0d_like_numpy():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    out = cov(torch.from_numpy(x))
    assert out.ndim == 0
    np.testing.assert_allclose(out.item(), np.cov(x), rtol=1e-14)


def test_cov_single_observation_raises_where_numpy_gives_nan():
    x = np.array([[1.0], [2.0]])
    with pytest.raises(ValueError, match="degrees of freedom <= 0 \\(0\\): 1 observation"):
        cov(torch.from_numpy(x))
    with pytest.warns(RuntimeWarning, match=DOF_WARNING), np.errstate(all="ignore"):
        ref = np.cov(x)
    assert np.isnan(ref).all()
    with pytest.raises(ValueError, match="degrees of freedom"):
        cov(torch.zeros(3, 0))  # no observation at all


def test_cov_empty_variables_and_integer_dtype():
    assert cov(torch.zeros(0, 5)).shape == (0, 0)
    x = np.array([[1, 5, 2, 8], [3, 3, 9, 1]])
    out = cov(torch.from_numpy(x))
    assert out.dtype == torch.get_default_dtype()
    np.testing.assert_allclose(out.numpy(), np.cov(x), rtol=1e-6)
    out64 = cov(torch.from_numpy(x), dtype=torch.float64)
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), np.cov(x), rtol=1e-14)


def test_cov_float32_is_accurate_for_offset_data():
    g = np.random.default_rng(0)
    x = (1e3 + g.standard_normal((3, 5000))).astype(np.float32)
    out = cov(torch.from_numpy(x))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), np.cov(x.astype(np.float64)), rtol=1e-5,
                               atol=1e-5)


def _scatter_ref(x, w=None):
    """Centred (weighted) scatter by numpy in float64."""
    x = x.astype(np.float64)
    w = np.ones(len(x)) if w is None else w
    xc = (x - w @ x / w.sum()) * np.sqrt(w)[:, None]
    return xc.T @ xc


def _layouts(x):
    """The same (n, d) data C-contiguous, Fortran-ordered and as a strided view."""
    wide = np.repeat(x, 2, axis=1)
    return {"c": x, "fortran": np.asfortranarray(x), "strided": wide[:, ::2]}


@pytest.mark.parametrize("layout", ["c", "fortran", "strided"])
@pytest.mark.parametrize("offset", [0.0, 3.0, 1e6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_paths_match_numpy(layout, offset, dtype):
    # BLAS syrk (uncentred where safe, else centred blocks) and the torch GEMM path
    from skanomaly.functional.covariance import _scatter, _scatter_blas, _scatter_torch

    g = np.random.default_rng(1)
    x = (offset + g.standard_normal((3000, 7)) * np.arange(1, 8)).astype(dtype)
    ref = _scatter_ref(x)
    t = torch.from_numpy(_layouts(x)[layout])
    mean = t.mean(0, dtype=torch.float64)
    for fn in (_scatter, _scatter_blas, _scatter_torch):
        got = fn(t, mean).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-9 if dtype == np.float64 else 1e-6,
                                   atol=1e-9 * np.abs(ref).max())
        if fn is not _scatter_torch:  # syrk fills one half: mirrored exactly
            np.testing.assert_array_equal(got, got.T)
    w = g.uniform(0, 2, size=len(x))
    got = _scatter_blas(t, torch.from_numpy(w @ x.astype(np.float64) / w.sum()),
                        torch.from_numpy(np.sqrt(w))).numpy()
    np.testing.assert_allclose(got, _scatter_ref(x, w), rtol=1e-9,
                               atol=1e-9 * np.abs(ref).max())


def test_uncentred_product_only_where_accurate(monkeypatch):
    from skanomaly.functional import covariance as module

    g = np.random.default_rng(2)
    spread = g.standard_normal((4000, 5))
    mean_of = lambda a: a.mean(0)  # noqa: E731
    # within 4 standard deviations of zero: the uncentred product, as accurate as numpy
    near = spread + 2.0
    got = module._scatter_uncentred(near, mean_of(near))
    assert got is not None
    np.testing.assert_allclose(np.triu(got), np.triu(_scatter_ref(near)), rtol=1e-12,
                               atol=1e-12 * len(near))
    # far from zero, or a constant feature with a non-zero mean: refused
    far = spread + 50.0
    assert module._scatter_uncentred(far, mean_of(far)) is None
    constant = spread.copy()
    constant[:, 3] = 7.0
    assert module._scatter_uncentred(constant, mean_of(constant)) is None
    # a first block that looks spread out, the rest tightly around a large mean: the
    # sample lets it through, the product's own variances refuse it
    monkeypatch.setattr(module, "_RAW_SAMPLE_ROWS", 100)
    tricky = np.full((4000, 2), 1e4) + 1e-3 * spread[:, :2]
    tricky[:100] += 1e4 * spread[:100, :2]  # sample: mean^2 / var ~ 1; all: ~ 40
    calls = []
    syrk = module._syrk
    monkeypatch.setattr(module, "_syrk", lambda *a: calls.append(1) or syrk(*a))
    assert module._scatter_uncentred(tricky, mean_of(tricky)) is None
    assert calls == [1]  # tried, then refused
    monkeypatch.setattr(module, "_syrk", syrk)
    np.testing.assert_allclose(cov(torch.from_numpy(tricky), rowvar=False).numpy(),
                               np.cov(tricky, rowvar=False), rtol=1e-9)
    # huge but finite values overflow the test, not the result
    huge = np.full((10, 2), 1e300)
    assert module._scatter_uncentred(huge, mean_of(huge)) is None
    np.testing.assert_array_equal(cov(torch.from_numpy(huge), rowvar=False).numpy(), 0.0)


def test_cov_names_the_non_finite_input_only_when_there_is_one():
    x = torch.randn(50, 3, dtype=torch.float64)
    bad = x.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="m contains NaN"):
        cov(bad, rowvar=False)
    with pytest.raises(ValueError, match="y contains NaN"):
        cov(x, bad, rowvar=False)
    both = x.clone()
    both[0, 0], both[1, 0] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="infinity"):
        cov(both, rowvar=False, aweights=torch.ones(50, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fweights=torch.tensor([1.0, 2.5, 1.0])), "integer"),
        (dict(fweights=torch.tensor([1, -1, 1])), "negative"),
        (dict(fweights=torch.tensor([[1, 1, 1]])), "1-D"),
        (dict(fweights=torch.tensor([1, 1])), "incompatible"),
        (dict(aweights=torch.tensor([1.0, -0.5, 1.0])), "negative"),
        (dict(aweights=torch.tensor([1.0, 1.0, 1.0, 1.0])), "incompatible"),
        (dict(aweights=torch.tensor([1.0, float("nan"), 1.0])), "NaN"),
        (dict(fweights=torch.tensor([0, 0, 0])), "sum to zero"),
        (dict(ddof=1.5), "ddof"),
    ],
)
def test_cov_invalid_weights(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cov(torch.ones(2, 3), **kwargs)


def test_cov_invalid_data():
    with pytest.raises(ValueError, match="NaN"):
        cov(torch.tensor([[1.0, float("nan"), 2.0]]))
    with pytest.raises(ValueError, match="infinity"):
        cov(torch.ones(2, 3), torch.tensor([1.0, float("inf"), 2.0]))
    with pytest.raises(ValueError, match="more than 2 dimensions"):
        cov(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="more than 2 dimensions"):
        cov(torch.ones(2, 3), torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="observation"):
        cov(torch.ones(2, 3), torch.ones(2, 4))
    # y of shape (1, k) with rowvar=False is one observation of k variables, like m
    with pytest.raises(ValueError, match="observation"):
        cov(torch.ones(3, 2), torch.ones(1, 3), rowvar=False)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cov(np.ones((2, 3)))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cov(torch.ones(2, 3), fweights=[1, 1, 1])
    with pytest.raises(TypeError, match="floating"):
        cov(torch.ones(2, 3), dtype=torch.int64)


# ---------------------------------------------------------------- MomentAccumulator


def _np_cov_batched(x, ddof):
    """numpy.cov per leading index of x (P, n, d)."""
    d = x.shape[-1]
    return np.stack([np.cov(xi, rowvar=False, ddof=ddof).reshape(d, d) for xi in x])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 30), d=st.integers(1, 4), p=st.integers(1, 3), ddof=st.integers(0, 1),
    cuts=st.lists(st.integers(0, 30), max_size=5), seed=st.integers(0, 2**16),
)
def test_accumulator_any_split_matches_numpy(n, d, p, ddof, cuts, seed):
    x = np.random.default_rng(seed).normal(3.0, 2.0, size=(p, n, d))
    acc = MomentAccumulator(d, (p,))
    bounds = [0, *sorted(min(c, n) for c in cuts), n]  # repeated bounds: empty batches
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert acc.update(torch.from_numpy(x[:, lo:hi])) is acc
    assert acc.n_samples_ == n
    assert acc.covariance(ddof).dtype == torch.float64
    np.testing.assert_allclose(acc.mean.numpy(), x.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.covariance(ddof).numpy(), _np_cov_batched(x, ddof),
                               rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=7), data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_accumulator_any_merge_tree_matches_numpy(sizes, data, seed):
    d, p = 3, 2
    x = np.random.default_rng(seed).normal(-1.0, 0.5, size=(p, sum(sizes), d))
    bounds = np.cumsum([0, *sizes])
    accs = [MomentAccumulator(d, (p,)).update(torch.from_numpy(x[:, lo:hi]))
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    while len(accs) > 1:  # merge an arbitrary neighbour pair until one is left
        i = data.draw(st.integers(0, len(accs) - 2))
        accs[i].merge(accs.pop(i + 1))
    (acc,) = accs
    assert acc.n_samples_ == sum(sizes)
    if sum(sizes) >= 2:
        np.testing.assert_allclose(acc.covariance().numpy(), _np_cov_batched(x, 1),
                                   rtol=1e-10, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="sample"):
            acc.covariance()


def test_accumulator_large_offset_is_stable():
    g = np.random.default_rng(1)
    x = 1e6 + g.standard_normal((2000, 3))
    acc = MomentAccumulator(3)
    for chunk in np.array_split(x, 7):
        acc.update(torch.from_numpy(chunk))
    ref = np.cov(x, rowvar=False)
    np.testing.assert_allclose(acc.covariance().numpy(), ref, rtol=1e-9, atol=1e-9)
    # The test discriminates: raw sums of squares lose most digits on this data.
    naive = (x.T @ x - len(x) * np.outer(x.mean(0), x.mean(0))) / (len(x) - 1)
    assert np.abs(naive - ref).max() > 1e-6


def test_accumulator_float32_input_padim_layout_and_no_mutation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, 6, generator=g)  # P=5 positions, 40 samples, 6 features
    before = x.clone()
    acc = MomentAccumulator(6, (5,)).update(x[:, :25]).update(x[:, 25:])
    assert torch.equal(x, before)
    assert acc.mean.dtype == torch.float64 and acc.scatter.shape == (5, 6, 6)
    np.testing.assert_allclose(acc.covariance(0).numpy(),
                               _np_cov_batched(x.double().numpy(), 0), rtol=1e-10)


def test_accumulator_merge_leaves_other_unchanged_and_pickles():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    a, b = MomentAccumulator(4).update(x[:10]), MomentAccumulator(4).update(x[10:])
    b_cov = b.covariance()
    a.merge(b)
    assert b.n_samples_ == 20 and torch.equal(b.covariance(), b_cov)
    assert a.to("cpu") is a
    a2 = pickle.loads(pickle.dumps(a))
    assert a2.n_samples_ == 30
    torch.testing.assert_close(a2.covariance(), a.covariance(), rtol=0, atol=0)
    a2.update(x)
    np.testing.assert_allclose(a2.covariance().numpy(),
                               np.cov(np.vstack([x.numpy(), x.numpy()]), rowvar=False),
                               rtol=1e-12)
    empty = MomentAccumulator(4).merge(MomentAccumulator(4))
    assert empty.n_samples_ == 0
    np.testing.assert_allclose(empty.merge(a).covariance().numpy(), a.covariance().numpy())


def test_accumulator_errors():
    acc = MomentAccumulator(3, (2,))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.ones(3, 5, 3))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.ones(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((2, 4, 3), float("nan")))
    with pytest.raises(TypeError):
        acc.update(np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="different shapes"):
        acc.merge(MomentAccumulator(3, (3,)))
    with pytest.raises(ValueError, match="different shapes"):
        acc.merge(MomentAccumulator(4, (2,)))
    with pytest.raises(TypeError):
        acc.merge("not an accumulator")
    acc.update(torch.ones(2, 1, 3))
    with pytest.raises(ValueError, match="sample"):
        acc.covariance(ddof=1)
    with pytest.raises(ValueError, match="positive"):
        MomentAccumulator(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 6, generator=g)
    ref = MomentAccumulator(6, (4,)).update(x)
    acc = MomentAccumulator(6, (4,)).update(x[:, :20].cuda())
    acc.merge(MomentAccumulator(6, (4,)).update(x[:, 20:].cuda()))
    assert acc.scatter.is_cuda and acc.scatter.dtype == torch.float64
    torch.testing.assert_close(acc.covariance().cpu(), ref.covariance())
    out = cov(x[0].cuda(), rowvar=False, aweights=torch.rand(50, generator=g).cuda())
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(cov(x[0], rowvar=False), cov(x[0].cuda(), rowvar=False).cpu())


# ------------------------------------------------------------------ finite in, finite out

@pytest.mark.parametrize("scale", [1e-150, 1e-100, 1e100, 1e150, 1e154])
def test_cov_any_representable_float64_scale(scale):
    # the sum of squares of forty 1e154 overflows float64; the covariance does not
    x = np.random.default_rng(30).normal(size=(40, 3))
    ref = np.cov(x, rowvar=False)
    out = cov(torch.from_numpy(x * scale), rowvar=False)
    np.testing.assert_allclose(out.numpy() / scale / scale, ref, rtol=1e-12)
    w = torch.arange(40, dtype=torch.float64) % 3
    out_w = cov(torch.from_numpy(x * scale), rowvar=False, aweights=w)
    np.testing.assert_allclose(out_w.numpy() / scale / scale,
                               np.cov(x, rowvar=False, aweights=w.numpy()), rtol=1e-12)


def test_cov_reports_overflow_of_the_result():
    x = torch.tensor([[-1e20, 1e20, 3e20]])  # float32 data, variance 4e40
    with pytest.raises(ValueError, match="exceeds the range of torch.float32.*float64"):
        cov(x)
    np.testing.assert_allclose(cov(x, dtype=torch.float64).item(), np.cov(x.double().numpy()),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="exceeds the range of torch.float64"):
        cov(torch.tensor([-1e300, 1e300], dtype=torch.float64))
    with pytest.raises(ValueError, match="weights sum beyond"):
        cov(torch.ones(2, 3), fweights=torch.tensor([1, 1, 1]),
            aweights=torch.tensor([1e300, 1e300, 1e300], dtype=torch.float64) * 1e8)


def test_cov_half_precision_gives_float32():
    x = torch.tensor([[0.0, 300.0, 600.0]], dtype=torch.float16)  # variance 9e4 > 65504
    out = cov(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.item(), 90000.0)
    assert cov(x.to(torch.bfloat16), dtype=torch.float64).dtype == torch.float64


def test_accumulator_reports_overflow_and_keeps_its_state():
    acc = MomentAccumulator(1).update(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="overflow torch.float64; rescale"):
        acc.update(torch.tensor([[1e200], [-1e200]], dtype=torch.float64))
    fresh = MomentAccumulator(1).update(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    assert acc.n_samples_ == 2 and torch.equal(acc.scatter, fresh.scatter)
    far = MomentAccumulator(1).update(torch.tensor([[1.5e154], [1.6e154]], dtype=torch.float64))
    with pytest.raises(ValueError, match="merged moments overflow"):
        acc.merge(far)  # each is finite; the shift between their means squared is not
    assert acc.n_samples_ == 2 and torch.equal(acc.scatter, fresh.scatter)
    assert torch.equal(acc.mean, fresh.mean)
    # float32 data of any finite scale accumulate in float64
    x = torch.tensor([[3e38], [-3e38], [1e38]])
    got = MomentAccumulator(1).update(x).covariance()
    np.testing.assert_allclose(got.numpy(), np.cov(x.double().numpy().T).reshape(1, 1))
