"""Fitted kernel modules for nearest neighbours, KDE and PCA; PatchCore's and DFKDE's modules.

References are independent: scikit-learn's ``NearestNeighbors`` and ``PCA``,
``scipy.stats.gaussian_kde``, numpy, and each estimator's own public ``score_samples`` /
``anomaly_map``. Export checks trace with ``torch.jit.trace`` and run the TorchScript
ONNX exporter's graph (opset 17, dynamic batch axis) in onnxruntime at a batch size
other than the example's.
"""

import inspect
import io
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from skanomaly import DFKDEDetector, PatchCoreDetector
from skanomaly.functional import GaussianKDE, KNNIndex, PCAProjection, pca_fit, pca_transform

f64 = torch.float64


def _onnx_bytes(module, example, n_outputs=1):
    """The module exported by the TorchScript-based exporter, opset 17, dynamic batch."""
    onnx = pytest.importorskip("onnx")
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters \
        else {}
    names = [f"out{i}" for i in range(n_outputs)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), buffer, opset_version=17, input_names=["x"],
                          output_names=names,
                          dynamic_axes={"x": {0: "n"}, **{name: {0: "n"} for name in names}},
                          **kwargs)
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def _run_onnx(data, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})


def _traced(module, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in recent torch
        warnings.simplefilter("error", torch.jit.TracerWarning)  # a value baked in: a bug
        return torch.jit.trace(module, (example,))


def _close(got, want, rtol):
    """Relative agreement, measured against the largest magnitude (scores near 0)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def _check_export(module, example, x, n_outputs=1, rtol=1e-6):
    """Traced and ONNX forms of ``module`` agree with it on ``x`` (another batch size)."""
    assert x.shape[0] != example.shape[0]
    eager = module(x)
    eager = eager if isinstance(eager, tuple) else (eager,)
    traced = _traced(module, example)(x)
    traced = traced if isinstance(traced, tuple) else (traced,)
    data = _onnx_bytes(module, example, n_outputs)
    for want, a, b in zip(eager, traced, _run_onnx(data, x)):
        assert a.shape == want.shape and b.shape == tuple(want.shape)
        if want.is_floating_point():
            _close(a.numpy(), want.numpy(), rtol)
            _close(b, want.numpy(), rtol)
        else:
            np.testing.assert_array_equal(b, want.numpy())
            assert torch.equal(a, want)
    return data


# ----------------------------------------------------------------------- KNNIndex
def _features(rng, n, d, dtype=np.float64):
    """ReLU-like patch features: non-negative, correlated, far from the origin."""
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return (np.maximum(rng.normal(size=(n, d)) @ mixing, 0) + 0.5).astype(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, chunk", [(1, 64), (3, 100), (5, 9), (4, 5000)])
def test_knn_forward_matches_search_and_sklearn(dtype, k, chunk):
    rng = np.random.default_rng(k)
    bank, queries = _features(rng, 600, 24), _features(rng, 150, 24)
    index = KNNIndex(torch.tensor(bank, dtype=dtype), forward_chunk=chunk)
    q = torch.tensor(queries, dtype=dtype)
    dist, idx = index(q, k)
    ref_dist, ref_idx = index.search(q, k)
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(dist, ref_dist, rtol=0, atol=0)  # the same exact differences
    sk_dist, sk_idx = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(queries)
    np.testing.assert_array_equal(idx.numpy(), sk_idx)
    np.testing.assert_allclose(dist.numpy(), sk_dist, rtol=1e-5 if dtype == torch.float32
                               else 1e-12)
    sq, sq_idx = index(q, k, squared=True)
    assert torch.equal(sq_idx, idx)
    torch.testing.assert_close(sq, index.search(q, k, squared=True)[0], rtol=0, atol=0)


def test_knn_forward_ties_take_the_smaller_index_and_far_scales_work():
    bank = torch.tensor([[0.0], [1.0], [1.0], [0.0], [2.0]], dtype=f64).repeat(3, 1)
    queries = torch.tensor([[0.2], [0.5], [1.7], [1.0]], dtype=f64)
    index = KNNIndex(bank, forward_chunk=4)
    for k in (1, 4, 7):
        dist, idx = index(queries, k)
        ref_dist, ref_idx = index.search(queries, k)
        assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    for scale in (1e-200, 1e200):  # the bank's power-of-two scaling, undone exactly
        index = KNNIndex(bank * scale, forward_chunk=4)
        dist, idx = index(queries * scale, 3)
        ref_dist, ref_idx = index.search(queries * scale, 3)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(dist, ref_dist, rtol=1e-15, atol=0)


def test_knn_is_a_module_with_its_bank_as_buffers():
    bank = torch.tensor(_features(np.random.default_rng(0), 50, 4))
    index = KNNIndex(bank, groups=torch.arange(50) % 5)
    state = index.state_dict()
    assert {"bank", "centre", "sq_norms", "bank_groups"} <= set(state)
    assert not any(p.requires_grad for p in index.parameters())
    assert index.bank.data_ptr() != bank.data_ptr()
    moved = KNNIndex(bank.float()).to(f64)  # a moved module re-prepares its search
    torch.testing.assert_close(moved.search(bank[:3], 2)[0], index.search(bank[:3], 2)[0])
    for bad, error in [({"forward_chunk": 0}, ValueError), ({"forward_chunk": 2.0}, TypeError),
                       ({"forward_extra": -1}, ValueError), ({"forward_extra": None}, TypeError)]:
        with pytest.raises(error):
            KNNIndex(bank, **bad)


def test_knn_forward_exports_with_the_bank_once_and_queries_x_chunk_intermediates():
    onnx = pytest.importorskip("onnx")
    rng = np.random.default_rng(3)
    n_bank, d, chunk = 6000, 32, 1024
    bank = torch.tensor(_features(rng, n_bank, d, np.float32))
    index = KNNIndex(bank, forward_chunk=chunk).eval()

    class Search(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.index = index

        def forward(self, x):
            return self.index(x, 3)

    queries = torch.tensor(_features(rng, 37, d, np.float32))
    data = _check_export(Search(), queries[:5], queries, n_outputs=2)
    # the file holds the bank once (not once per chunk, not queries x bank)
    assert bank.numel() * 4 <= len(data) < 1.15 * bank.numel() * 4 + 100_000
    # every intermediate with the dynamic query axis is at most queries x chunk wide
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
    widths = []
    for value in model.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if any(dim.dim_param for dim in dims):
            widths.append(int(np.prod([dim.dim_value for dim in dims if not dim.dim_param])))
    assert widths and max(widths) <= max(chunk, 2 * (3 + index.forward_extra) * d)
    assert n_bank not in widths


# ----------------------------------------------------------------------- GaussianKDE
@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.3])
def test_kde_module_matches_scipy_and_logpdf(bandwidth):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 3)) * [1.0, 30.0, 0.01] + 100.0
    points = data[:60] + rng.normal(size=(60, 3)) * data.std(0)
    kde = GaussianKDE(torch.tensor(data), bandwidth)
    got = kde(torch.tensor(points))
    ref = gaussian_kde(data.T, bw_method=bandwidth).logpdf(points.T)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    assert torch.equal(got, kde.logpdf(torch.tensor(points), chunk_size=60))  # one kernel
    # a float64 fit evaluated in float32, at the float32 points (their own rounding is
    # 1e-3 of the narrow feature's spread here)
    rounded = points.astype(np.float32)
    ref32 = gaussian_kde(data.T, bw_method=bandwidth).logpdf(rounded.astype(np.float64).T)
    _close(kde.to(torch.float32)(torch.tensor(rounded)).numpy(), ref32, rtol=1e-5)


def test_kde_module_buffers_and_export():
    rng = np.random.default_rng(1)
    data = torch.tensor(rng.normal(size=(300, 4)) * [1.0, 2.0, 3.0, 4.0] - 7.0)
    kde = GaussianKDE(data).eval()
    assert {"centres_padded", "precision_factor_padded", "mean", "scale",
            "log_norm"} == set(kde.state_dict())
    # padded to aligned rows: 8 float64 columns, kernels of weight zero to 16 rows
    assert kde.centres_padded.shape == (304, 8) and kde.centres.shape == (300, 5)
    assert kde.centres_padded[300:, 4].eq(-np.inf).all() and kde.centres_padded[:, 5:].eq(0).all()
    u = kde.precision_factor  # U U^T is the inverse kernel covariance (scaled units)
    cov = kde.covariance() * (kde.scale[:, None] * kde.scale[None, :])
    torch.testing.assert_close(u @ u.T @ cov, torch.eye(4, dtype=f64), rtol=0, atol=1e-12)
    points = data[:23] * 1.5
    _check_export(kde, points[:4], points)


# ----------------------------------------------------------------------- PCAProjection
@pytest.mark.parametrize("whiten", [False, True])
def test_pca_projection_matches_sklearn(whiten):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 6)) @ rng.normal(size=(6, 6)) + 3.0
    new = rng.normal(size=(15, 6)) * 2.0
    sk = PCA(n_components=3, svd_solver="full", whiten=whiten).fit(x)
    fit = pca_fit(torch.tensor(x), 3)
    proj = PCAProjection.from_fit(fit, whiten=whiten)
    z = proj(torch.tensor(new))
    signs = np.sign((fit.components.numpy() * sk.components_).sum(1))
    np.testing.assert_allclose(z.numpy(), sk.transform(new) * signs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(proj.inverse(z).numpy(), sk.inverse_transform(sk.transform(new)),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(proj.residual(torch.tensor(new)).numpy(),
                               new - sk.inverse_transform(sk.transform(new)), atol=1e-11)
    if not whiten:  # the checked function computes the same expression, bit for bit
        assert torch.equal(z, pca_transform(torch.tensor(new), fit))
    _check_export(proj, torch.tensor(new[:4]), torch.tensor(new))


def test_pca_projection_validates_at_construction():
    fit = pca_fit(torch.tensor(np.random.default_rng(0).normal(size=(10, 3))), 2)
    with pytest.raises(ValueError, match="mean has 2 entries"):
        PCAProjection(fit.components, fit.mean[:2])
    with pytest.raises(ValueError, match="explained_variance"):
        PCAProjection(fit.components, fit.mean, whiten=True)
    with pytest.raises(ValueError, match="positive"):
        PCAProjection(fit.components, fit.mean, torch.zeros(2, dtype=f64), whiten=True)
    with pytest.raises(ValueError, match="NaN"):
        PCAProjection(fit.components * np.nan, fit.mean)
    with pytest.raises(TypeError):
        PCAProjection(fit.components.numpy(), fit.mean)
    proj = PCAProjection.from_fit(fit, dtype=torch.float32)
    assert proj.components.dtype == torch.float32 and set(proj.state_dict()) == {
        "components_padded", "mean", "scale"}
    assert proj.components_padded.shape == (16, 16) and proj.components.shape == (2, 3)


# ----------------------------------------------------------------------- detectors
@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(16, 16)) / 4
    train = np.maximum(np.einsum("nchw,cd->ndhw", rng.normal(size=(24, 16, 6, 6)), mixing), 0)
    test = np.maximum(np.einsum("nchw,cd->ndhw", rng.normal(size=(9, 16, 6, 6)), mixing), 0)
    test[0, :, 2:4, 2:4] += 3.0  # an anomaly
    return train.astype(np.float32), test.astype(np.float32)


@pytest.mark.parametrize("n_neighbors, patch_size", [(9, 3), (1, 1), (4, 3)])
def test_patchcore_module_equals_the_estimator(maps, n_neighbors, patch_size):
    train, test = maps
    det = PatchCoreDetector(coreset_sampling_ratio=0.25, n_neighbors=n_neighbors,
                            patch_size=patch_size, random_state=0, device="cpu").fit(train)
    want_scores, want_maps = -det.score_samples(test), det.anomaly_map(test)
    for dtype, rtol in [(f64, 1e-12), (torch.float32, 1e-5)]:
        module = det._torch_module(dtype=dtype)
        assert not module.training and det._torch_module(dtype=dtype) is module  # cached
        scores, got_maps = module(torch.tensor(test, dtype=f64))
        assert scores.dtype == dtype and got_maps.dtype == dtype
        assert scores.shape == (9,) and got_maps.shape == (9, 6, 6)
        np.testing.assert_allclose(scores.numpy(), want_scores, rtol=rtol)
        np.testing.assert_allclose(got_maps.numpy(), want_maps, rtol=rtol)


def test_patchcore_module_exports(maps):
    train, test = maps
    det = PatchCoreDetector(coreset_sampling_ratio=0.5, random_state=0, device="cpu").fit(train)
    module = det._torch_module(dtype=torch.float32)
    x = torch.tensor(test)
    data = _check_export(module, x[:2], x, n_outputs=2)
    scores, got_maps = _run_onnx(data, x)
    np.testing.assert_allclose(scores, -det.score_samples(test), rtol=1e-5)
    np.testing.assert_allclose(got_maps, det.anomaly_map(test), rtol=1e-5)


@pytest.mark.parametrize("scaling", ["scale", "norm", None])
def test_dfkde_module_equals_the_estimator(maps, scaling):
    train, test = maps
    train = np.concatenate([train, train[:, :, ::-1], train[:, :, :, ::-1]])  # 72 samples
    det = DFKDEDetector(n_components=4, feature_scaling=scaling, device="cpu").fit(train)
    want = -det.score_samples(test)
    for dtype, rtol in [(f64, 1e-12), (torch.float32, 1e-5)]:
        module = det._torch_module(dtype=dtype)
        got = module(torch.tensor(test))
        assert got.dtype == dtype and got.shape == (9,)
        _close(got.numpy(), want, rtol)
    x = torch.tensor(test, dtype=f64)
    _check_export(det._torch_module(dtype=f64), x[:3], x)
    _check_export(det._torch_module(dtype=torch.float32), x[:3].float(), x.float())


def test_dfkde_scores_through_cached_modules(maps, monkeypatch):
    train, test = maps
    det = DFKDEDetector(n_components=3, device="cpu").fit(train)
    first = det.score_samples(test)
    kde_module = __import__("skanomaly.functional.kde", fromlist=["GaussianKDE"])
    built = []
    monkeypatch.setattr(kde_module.GaussianKDE, "__init__",
                        lambda *a, **k: built.append(1) or pytest.fail("KDE refitted"))
    np.testing.assert_array_equal(det.score_samples(test), first)
    assert not built
