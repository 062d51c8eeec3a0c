"""Fitted Gaussian kernel modules and the detectors' fitted modules (Gaussian, PaDiM, DFM).

References are independent: scipy's Mahalanobis distance and ``gaussian_filter``, a
numpy bilinear resize, and each estimator's own public ``score_samples`` /
``anomaly_map``. Export checks trace with ``torch.jit.trace`` and run the TorchScript
ONNX exporter's graph in onnxruntime at a batch size other than the example's.
"""

import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from skanomaly import DFMDetector, GaussianDetector, PaDiMDetector
from skanomaly.anomaly_map import AnomalyMapPostprocess, postprocess_anomaly_map
from skanomaly.datasets import load_textures
from skanomaly.functional import (
    GaussianScorer,
    WoodburyGaussianScorer,
    mahalanobis,
    mahalanobis_woodbury,
    precision_cholesky,
    regularized_cholesky,
)

maha_module = importlib.import_module("skanomaly.functional.mahalanobis")
f64 = torch.float64


def _spd(rng, p, d):
    a = rng.normal(size=(p, d, d))
    return a @ a.transpose(0, 2, 1) / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- GaussianScorer
@pytest.mark.parametrize("squared", [False, True])
def test_gaussian_scorer_matches_scipy(squared):
    rng = np.random.default_rng(0)
    p, d = 5, 7
    cov, mean = _spd(rng, p, d), rng.normal(size=(p, d))
    x = rng.normal(size=(9, p, d))
    scorer = GaussianScorer.from_covariance(torch.tensor(mean), torch.tensor(cov),
                                            squared=squared)
    out = scorer(torch.tensor(x)).numpy()
    ref = np.array([[scipy_mahalanobis(x[i, j], mean[j], np.linalg.inv(cov[j]))
                     for j in range(p)] for i in range(len(x))])
    np.testing.assert_allclose(out, ref**2 if squared else ref, rtol=1e-12)
    assert out.shape == (9, p) and scorer.U.shape == (p, d, d)


def test_gaussian_scorer_constructors_and_the_pure_function_agree(monkeypatch):
    rng = np.random.default_rng(1)
    p, d = 4, 6
    cov, mean = torch.tensor(_spd(rng, p, d)), torch.tensor(rng.normal(size=(p, d)))
    x = torch.tensor(rng.normal(size=(11, p, d)))
    chol = regularized_cholesky(cov, 0.05)
    a = GaussianScorer.from_covariance(mean, cov, reg=0.05)
    b = GaussianScorer.from_cholesky(mean, chol)
    c = GaussianScorer(mean, precision_cholesky(chol))
    assert torch.equal(a(x), b(x)) and torch.equal(b(x), c(x))
    # one kernel: the module and mahalanobis(precision_cholesky=...) give the same bits
    assert torch.equal(c(x), mahalanobis(x, mean, precision_cholesky=c.U))
    np.testing.assert_allclose(c(x).numpy(), mahalanobis(x, mean, cholesky=chol).numpy(),
                               rtol=1e-12)
    # fixed position blocks (one position each) change nothing
    monkeypatch.setattr(maha_module, "_BLOCK_FEATURES", 1)
    blocked = GaussianScorer(mean, c.U)
    assert len(blocked._blocks) == p and torch.equal(blocked(x), c(x))
    # a transposed view of channel-major maps works as (N, P, d)
    maps = x.transpose(1, 2).contiguous()
    assert torch.equal(c(maps.transpose(1, 2)), c(x))


def test_gaussian_scorer_dtype_device_and_state():
    rng = np.random.default_rng(2)
    cov, mean = torch.tensor(_spd(rng, 2, 3)), torch.tensor(rng.normal(size=(2, 3)))
    s32 = GaussianScorer.from_covariance(mean, cov, dtype=torch.float32)
    s64 = GaussianScorer.from_covariance(mean, cov)
    assert s32.U.dtype == torch.float32 and s64.U.dtype == f64
    # the factor is stored padded with zeros to aligned rows (8 float64 / 16 float32 entries)
    assert set(s64.state_dict()) == {"mean", "U_padded"}
    assert s64.U_padded.shape == (2, 8, 8) and s32.U_padded.shape == (2, 16, 16)
    assert torch.equal(s64.U_padded[:, :3, :3], s64.U) and s64.U_padded[:, 3:].eq(0).all()
    assert s64.U_padded[:, :, 3:].eq(0).all()
    x = torch.tensor(rng.normal(size=(5, 2, 3)))
    out32 = s32(x)  # float64 input is cast to the buffers' dtype
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), s64(x).numpy(), rtol=1e-5)
    # input is not modified; the buffers are copies
    mean_before = mean.clone()
    s64.U.zero_()
    assert torch.equal(mean, mean_before) and s32.U.abs().sum() > 0


def test_gaussian_scorer_validates_at_construction():
    mean, eye = torch.zeros(2, 3, dtype=f64), torch.eye(3, dtype=f64).expand(2, 3, 3)
    with pytest.raises(ValueError, match="mean must be a \\(P, d\\)"):
        GaussianScorer(torch.zeros(3), eye)
    with pytest.raises(ValueError, match="precision_cholesky must have shape"):
        GaussianScorer(mean, eye[:1])
    with pytest.raises(ValueError, match="upper-triangular"):
        GaussianScorer(mean, torch.ones(2, 3, 3, dtype=f64))
    with pytest.raises(ValueError, match="positive diagonal"):
        GaussianScorer(mean, -eye)
    with pytest.raises(ValueError, match="mean contains NaN"):
        GaussianScorer(torch.full((2, 3), float("nan")), eye)
    with pytest.raises(ValueError, match="exceed the range of torch.float32"):
        GaussianScorer(mean, eye * 1e300, dtype=torch.float32)
    with pytest.raises(ValueError, match="covariance must have shape"):
        GaussianScorer.from_covariance(mean, eye[0])
    with pytest.raises(ValueError, match="not positive-definite"):
        GaussianScorer.from_covariance(mean, torch.zeros(2, 3, 3, dtype=f64))
    with pytest.raises(TypeError, match="precision_cholesky must be a torch.Tensor"):
        GaussianScorer(mean, np.eye(3))


# ---------------------------------------------------------- WoodburyGaussianScorer
@pytest.mark.parametrize("squared", [False, True])
def test_woodbury_scorer_matches_scipy_and_the_pure_function(squared):
    rng = np.random.default_rng(3)
    p, n, d, reg = 3, 5, 12, 0.3  # N < d: the covariance alone is singular
    train = rng.normal(size=(p, n, d))
    mean = train.mean(1)
    centered = train - mean[:, None]
    x = rng.normal(size=(7, p, d))
    scorer = WoodburyGaussianScorer(torch.tensor(mean), torch.tensor(centered), reg,
                                    squared=squared)
    out = scorer(torch.tensor(x)).numpy()
    ref = np.array([[scipy_mahalanobis(
        x[i, j], mean[j], np.linalg.inv(np.cov(train[j], rowvar=False) + reg * np.eye(d)))
        for j in range(p)] for i in range(len(x))])
    np.testing.assert_allclose(out, ref**2 if squared else ref, rtol=1e-10)
    assert np.abs(scorer.W.numpy()).max() <= 1.0
    pure = mahalanobis_woodbury(torch.tensor(x), torch.tensor(mean), torch.tensor(centered),
                                None, reg, squared=squared)
    np.testing.assert_allclose(out, pure.numpy(), rtol=1e-13)
    assert set(scorer.state_dict()) == {"mean", "W_padded", "reg"}
    assert scorer.W.shape == (p, d, n) and scorer.W_padded.shape == (p, 16, 8)
    assert torch.equal(scorer.W_padded[:, :d, :n], scorer.W)
    assert scorer.W_padded[:, d:].eq(0).all() and scorer.W_padded[:, :, n:].eq(0).all()


def test_woodbury_scorer_validates_at_construction():
    mean, xc = torch.zeros(2, 4, dtype=f64), torch.randn(2, 3, 4, dtype=f64)
    with pytest.raises(ValueError, match="reg must be a finite number > 0"):
        WoodburyGaussianScorer(mean, xc, 0.0)
    with pytest.raises(ValueError, match="centered must have shape"):
        WoodburyGaussianScorer(mean, xc[:1], 0.1)
    with pytest.raises(ValueError, match="factor must have shape"):
        WoodburyGaussianScorer(mean, xc, 0.1, factor=torch.eye(3, dtype=f64))
    with pytest.raises(ValueError, match="lower-triangular"):
        WoodburyGaussianScorer(mean, xc, 0.1, factor=torch.ones(2, 3, 3, dtype=f64))
    with pytest.raises(ValueError, match="centered contains infinity"):
        WoodburyGaussianScorer(mean, xc * float("inf"), 0.1)


# ---------------------------------------------------------- AnomalyMapPostprocess
def _bilinear_numpy(maps, size):
    """align_corners=False bilinear resize, written out (torch's and anomalib's rule)."""
    def weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        m = np.zeros((n_out, n_in))
        np.add.at(m, (np.arange(n_out), i0), 1 - lam)
        np.add.at(m, (np.arange(n_out), i1), lam)
        return m
    rows, cols = weights(maps.shape[1], size[0]), weights(maps.shape[2], size[1])
    return np.einsum("ih,nhw,jw->nij", rows, maps, cols)


@pytest.mark.parametrize("sigma", [0.0, 1.5, 4.0])
def test_anomaly_map_postprocess_matches_scipy(sigma):
    maps = np.random.default_rng(4).random((3, 7, 5))
    post = AnomalyMapPostprocess(sigma, dtype=f64)
    out = post(torch.tensor(maps), (28, 20)).numpy()
    ref = _bilinear_numpy(maps, (28, 20))
    if sigma:
        ref = np.stack([gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in ref])
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    # postprocess_anomaly_map is a validated wrapper over the same code: same bits
    assert torch.equal(torch.tensor(out),
                       postprocess_anomaly_map(torch.tensor(maps), (28, 20), sigma=sigma))
    maps32 = torch.tensor(maps, dtype=torch.float32)
    assert torch.equal(AnomalyMapPostprocess(sigma)(maps32, (28, 20)),
                       postprocess_anomaly_map(maps32, (28, 20), sigma=sigma))


def test_anomaly_map_postprocess_validates_sigma():
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        AnomalyMapPostprocess(-1.0)
    with pytest.raises(TypeError, match="sigma must be a real number"):
        AnomalyMapPostprocess("4")
    assert AnomalyMapPostprocess(0.0).kernel is None
    assert set(AnomalyMapPostprocess(2.0).state_dict()) == {"kernel"}


# -------------------------------------------------------------------- detectors
def _features(images, channels=24, seed=0):
    """A random-feature stand-in for a backbone: a seeded 4x4 stride-4 conv and a ReLU."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, images.shape[1], 4, 4, generator=g) / 4.0
    with torch.no_grad():
        out = torch.relu(torch.nn.functional.conv2d(torch.as_tensor(images), weight,
                                                    stride=4))
    return out.numpy().astype(np.float64)


@pytest.fixture(scope="module")
def textures():
    data = load_textures(n_train=40, n_test=6, image_size=32)
    return _features(data.X_train), _features(data.X_test)  # (n, 24, 8, 8)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    X = load_digits().data[:400].astype(np.float64)
    return X[:300], X[300:]


def _assert_module_matches(det, X, spatial, rtol32=1e-5):
    x = torch.tensor(X)
    scores = -det.score_samples(X)
    module = det._torch_module()
    assert not module.training
    out = module(x)
    got_scores = out[0] if spatial else out
    assert got_scores.dtype == f64 and got_scores.shape == (len(X),)
    np.testing.assert_allclose(got_scores.numpy(), scores, rtol=1e-12)
    if spatial:
        np.testing.assert_allclose(out[1].numpy(), det.anomaly_map(X), rtol=1e-12)
    out32 = det._torch_module(dtype=torch.float32)(x.float())
    got32 = out32[0] if spatial else out32
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), scores, rtol=rtol32)
    if spatial:
        maps = det.anomaly_map(X)
        np.testing.assert_allclose(out32[1].double().numpy(), maps, rtol=rtol32,
                                   atol=rtol32 * np.abs(maps).max())
    assert det._torch_module() is module  # cached per fit


def test_gaussian_detector_module(digits):
    train, test = digits
    det = GaussianDetector(device="cpu").fit(train)
    _assert_module_matches(det, test, spatial=False)


@pytest.mark.parametrize("solver", ["full", "woodbury"])
def test_padim_detector_module(textures, solver):
    train, test = textures
    train = train if solver == "full" else train[:12]
    det = PaDiMDetector(n_features=16, solver=solver, random_state=0, device="cpu")
    det.fit(train)
    assert det.solver_ == solver
    _assert_module_matches(det, test, spatial=True)
    every = PaDiMDetector(solver=solver, device="cpu").fit(train)
    assert every._torch_module().feature_indices is None  # all channels: no gather
    _assert_module_matches(every, test, spatial=True)


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_dfm_detector_module(textures, score_type):
    train, test = textures
    det = DFMDetector(n_components=8, pooling_kernel_size=2, score_type=score_type,
                      device="cpu").fit(train)
    _assert_module_matches(det, test, spatial=score_type == "fre")
    if score_type == "nll":  # no anomaly map: the module returns the scores alone
        assert isinstance(det._torch_module()(torch.tensor(test)), torch.Tensor)


def test_a_refit_rebuilds_the_module(digits):
    train, test = digits
    det = GaussianDetector(device="cpu").fit(train)
    first = det._torch_module()
    det.fit(train[:150])
    assert det._torch_module() is not first
    np.testing.assert_allclose(det._torch_module()(torch.tensor(test)).numpy(),
                               -det.score_samples(test), rtol=1e-12)


# ----------------------------------------------------------------------- export
def _export_kwargs():
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters \
        else {}


def _onnx_outputs(module, example, other, tmp_path, n_outputs):
    ort = pytest.importorskip("onnxruntime")
    path = str(tmp_path / "model.onnx")
    names = [f"out{i}" for i in range(n_outputs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes on the legacy exporter
        torch.onnx.export(module, (example,), path, opset_version=17, input_names=["x"],
                          output_names=names,
                          dynamic_axes={"x": {0: "n"}, **{k: {0: "n"} for k in names}},
                          **_export_kwargs())
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": other.numpy()})


def _traced(module, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, (example,))


class _Fixed(torch.nn.Module):
    """AnomalyMapPostprocess at a fixed output size (the exported graph's constant)."""

    def __init__(self, post, size):
        super().__init__()
        self.post, self.size = post, size

    def forward(self, maps):
        return self.post(maps, self.size)


def _fitted_modules(textures, digits):
    train, test = textures
    dig_train, dig_test = digits
    padim_full = PaDiMDetector(n_features=16, random_state=0, device="cpu").fit(train)
    padim_wood = PaDiMDetector(n_features=16, random_state=0, device="cpu").fit(train[:12])
    dfm = DFMDetector(n_components=8, pooling_kernel_size=2, device="cpu").fit(train)
    dfm_nll = DFMDetector(n_components=8, pooling_kernel_size=2, score_type="nll",
                          device="cpu").fit(train)
    gauss = GaussianDetector(device="cpu").fit(dig_train)
    return {
        "gaussian": (gauss, dig_test),
        "padim-full": (padim_full, test),
        "padim-woodbury": (padim_wood, test),
        "dfm-fre": (dfm, test),
        "dfm-nll": (dfm_nll, test),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_detector_modules_trace_and_export_to_onnx(textures, digits, tmp_path, dtype):
    for name, (det, X) in _fitted_modules(textures, digits).items():
        module = det._torch_module(dtype=dtype)
        x = torch.tensor(X, dtype=torch.float32)
        example, other = x[:2], x[:5]  # another batch size than the example's
        expected = module(other)
        expected = expected if isinstance(expected, tuple) else (expected,)
        traced = _traced(module, example)(other)
        traced = traced if isinstance(traced, tuple) else (traced,)
        got = _onnx_outputs(module, example, other, tmp_path, len(expected))
        for want, t, o in zip(expected, traced, got):
            scale = 1e-6 * float(want.abs().max())
            np.testing.assert_allclose(t.numpy(), want.numpy(), rtol=1e-6, atol=scale,
                                       err_msg=name)
            np.testing.assert_allclose(o, want.numpy(), rtol=1e-6, atol=scale, err_msg=name)


@pytest.mark.parametrize("kind", ["scorer", "woodbury", "postprocess"])
def test_kernel_modules_trace_and_export_to_onnx(tmp_path, kind):
    rng = np.random.default_rng(5)
    if kind == "postprocess":
        module = _Fixed(AnomalyMapPostprocess(2.0), (24, 16))
        x = torch.tensor(rng.random((5, 6, 4)), dtype=torch.float32)
    else:
        p, d = 6, 5
        mean = torch.tensor(rng.normal(size=(p, d)))
        if kind == "scorer":
            module = GaussianScorer.from_covariance(mean, torch.tensor(_spd(rng, p, d)))
        else:
            module = WoodburyGaussianScorer(mean, torch.tensor(rng.normal(size=(p, 3, d))),
                                            0.2)
        x = torch.tensor(rng.normal(size=(5, p, d)))
    example, other = x[:2], x
    want = module(other).numpy()
    np.testing.assert_allclose(_traced(module, example)(other).numpy(), want, rtol=1e-6)
    got = _onnx_outputs(module, example, other, tmp_path, 1)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_padim_falls_back_to_the_checked_route_where_the_module_overflows():
    # tiny training variances without a ridge: U ~ 1e100, so |(x - mean) U| ~ 1e250 for
    # queries of 1e150, whose squares overflow; the checked function rescales by powers
    # of two and the distances (not squared) are finite and scale with the query
    rng = np.random.default_rng(6)
    train = rng.normal(size=(40, 3, 2, 2)) * 1e-100
    det = PaDiMDetector(reg=0.0, device="cpu").fit(train)
    query = rng.normal(size=(4, 3, 2, 2))
    assert not torch.isfinite(det._torch_module()(torch.tensor(query * 1e149))[1]).all()
    big, bigger = det.anomaly_map(query * 1e148), det.anomaly_map(query * 1e149)
    assert np.isfinite(bigger).all()
    np.testing.assert_allclose(bigger, 10 * big, rtol=1e-12)
    np.testing.assert_allclose(-det.score_samples(query * 1e149), bigger.max(axis=(1, 2)),
                               rtol=1e-15)
