"""The data path: tensor in, tensor out on its device; the fused pipeline; one pass.

The references are independent of the code under test: the numpy path of the same
estimator (tensor in must equal numpy in, bitwise, on the CPU), scikit-learn's plain
``Pipeline`` running the same steps one after the other, and each method on its own
(``score_and_map`` against ``score_samples`` and ``anomaly_map``).
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
    calibrate,
    make_anomaly_pipeline,
)
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor

pytest.importorskip("torchvision")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]

DETECTORS = {
    "gaussian": lambda device: GaussianDetector(device=device),
    "padim": lambda device: PaDiMDetector(n_features=5, random_state=0, device=device),
    "patchcore": lambda device: PatchCoreDetector(coreset_sampling_ratio=0.5, random_state=0,
                                                  device=device),
    "dfm": lambda device: DFMDetector(device=device),
    "dfkde": lambda device: DFKDEDetector(n_components=3, random_state=0, device=device),
}
SPATIAL = ("padim", "patchcore", "dfm")
PIPELINE_DETECTORS = {
    "padim": lambda: PaDiMDetector(n_features=40, random_state=0, device="cpu"),
    "patchcore": lambda: PatchCoreDetector(coreset_sampling_ratio=0.25, random_state=0,
                                           device="cpu"),
    "dfm": lambda: DFMDetector(device="cpu"),
    "dfkde": lambda: DFKDEDetector(n_components=4, random_state=0, device="cpu"),
}


def _data(name):
    rng = np.random.default_rng(0)
    shape = (8,) if name in ("gaussian",) else (8, 4, 4)
    return rng.normal(size=(40, *shape)), rng.normal(size=(11, *shape))


def _same(tensor, array, device):
    assert isinstance(tensor, torch.Tensor) and tensor.device.type == device
    assert_array_equal(tensor.cpu().numpy(), array)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_tensor_in_gives_tensor_out_equal_to_numpy(name, device):
    X, Q = _data(name)
    det = DETECTORS[name](device).fit(X)
    t = torch.as_tensor(Q, device=device)
    before = t.clone()
    _same(det.score_samples(t), det.score_samples(Q), device)
    _same(det.decision_function(t), det.decision_function(Q), device)
    labels = det.predict(t)
    _same(labels, det.predict(Q), device)
    assert labels.dtype == torch.int64
    if name in SPATIAL:
        _same(det.anomaly_map(t), det.anomaly_map(Q), device)
        _same(det.anomaly_map(t, output_size=9), det.anomaly_map(Q, output_size=9), device)
        scores, maps = det.score_and_map(t, output_size=9)
        _same(scores, det.score_samples(Q), device)
        _same(maps, det.anomaly_map(Q, output_size=9), device)
        assert scores.dtype == maps.dtype == torch.float64
    assert torch.equal(t, before)  # never mutated
    offset = clone(det).fit(X).calibrate(Q).offset_
    assert det.calibrate(t).offset_ == offset
    assert isinstance(det.offset_, float)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gaussian", "padim", "patchcore", "dfm", "dfkde"])
def test_partial_fit_takes_tensors(name, device):
    X, Q = _data(name)
    a, b = DETECTORS[name](device), DETECTORS[name](device)
    for part in np.array_split(X, 2):
        a.partial_fit(part)
        b.partial_fit(torch.as_tensor(part, device=device))
    assert a.offset_ == b.offset_
    assert_array_equal(a.score_samples(Q), b.score_samples(Q))


@pytest.mark.parametrize("name", SPATIAL)
def test_score_and_map_is_score_samples_and_anomaly_map(name):
    X, Q = _data(name)
    det = DETECTORS[name]("cpu").fit(X)
    for size in (None, 12, (10, 14)):
        scores, maps = det.score_and_map(Q, output_size=size)
        assert_array_equal(scores, det.score_samples(Q))
        assert_array_equal(maps, det.anomaly_map(Q, output_size=size))
        assert scores.dtype == maps.dtype == np.float64


@pytest.fixture(scope="module")
def textures():
    return load_textures("brick", n_train=10, n_test=10, image_size=32, random_state=0)


def _extractor(device="cpu"):
    return FeatureExtractor("resnet18", weights=None, random_state=0, batch_size=4,
                            device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_transform_tensor_in_tensor_out(textures, device):
    fe = _extractor(device).fit(textures.X_train)
    x = torch.as_tensor(textures.X_test, device=device)
    out = fe.transform(x)
    assert isinstance(out, torch.Tensor) and out.device.type == device
    assert out.dtype == torch.float32 and out.is_contiguous()
    expected = fe.transform(textures.X_test)
    assert isinstance(expected, np.ndarray)
    assert_array_equal(out.cpu().numpy(), expected)


@pytest.mark.parametrize("name", sorted(PIPELINE_DETECTORS))
def test_fused_pipeline_equals_the_steps_one_by_one(textures, name):
    X, Q = textures.X_train, textures.X_test
    plain = make_pipeline(_extractor(), PIPELINE_DETECTORS[name]()).fit(X)
    fused = make_anomaly_pipeline(_extractor(), PIPELINE_DETECTORS[name]()).fit(X)
    assert fused._fused_steps(X) is not None
    assert fused[-1].offset_ == plain[-1].offset_
    assert fused[-1].calibration_ == plain[-1].calibration_
    assert_array_equal(fused.score_samples(Q), plain.score_samples(Q))
    assert_array_equal(fused.decision_function(Q), plain.decision_function(Q))
    assert_array_equal(fused.predict(Q), plain.predict(Q))
    if name in SPATIAL:
        maps = plain[-1].anomaly_map(plain[:-1].transform(Q), output_size=32)
        assert_array_equal(fused.anomaly_map(Q), maps)
        scores, both_maps = fused.score_and_map(Q)
        assert_array_equal(scores, plain.score_samples(Q))
        assert_array_equal(both_maps, maps)
    # fitted public attributes stay CPU numpy (pickles load anywhere)
    for key, value in vars(fused[-1]).items():
        if key.endswith("_") and not key.startswith("_"):
            assert not isinstance(value, torch.Tensor), key
    assert fused.calibrate(Q)[-1].offset_ == calibrate(plain, Q)[-1].offset_


def test_fused_padim_computes_only_the_kept_channels(textures, monkeypatch):
    from skanomaly.features import extractor as extractor_module
    from skanomaly.features import layers as layers_module

    widths = []
    original = layers_module.embed

    def spy(outputs, layers, selection=None, out=None):
        out = original(outputs, layers, selection, out)
        widths.append(out.shape[1])
        return out

    # the feature module embeds batches, the extractor's fit its probe
    monkeypatch.setattr(layers_module, "embed", spy)
    monkeypatch.setattr(extractor_module, "embed", spy)
    model = make_anomaly_pipeline(_extractor(), PIPELINE_DETECTORS["padim"]())
    model.fit(textures.X_train)
    # fit's probes of one image see all 448 channels; the 3 batches of 4 images only 40
    assert widths.count(40) == 3 and set(widths) == {40, 448}
    widths.clear()
    model.score_and_map(textures.X_test)
    assert widths == [40, 40, 40]


@pytest.mark.parametrize("name", SPATIAL)
def test_fused_pipeline_scores_without_numpy(textures, name, monkeypatch):
    model = make_anomaly_pipeline(_extractor(), PIPELINE_DETECTORS[name]())
    model.fit(textures.X_train)
    x = torch.from_numpy(textures.X_test.copy())
    expected = model.score_and_map(textures.X_test)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor went through numpy on the hot path")

    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    monkeypatch.setattr(torch.Tensor, "__array__", refuse)
    scores, maps = model.score_and_map(x)
    labels = model.predict(x)
    monkeypatch.undo()
    assert isinstance(scores, torch.Tensor) and isinstance(labels, torch.Tensor)
    assert_array_equal(scores.numpy(), expected[0])
    assert_array_equal(maps.numpy(), expected[1])


@pytest.mark.cuda
@CUDA
def test_fused_pipeline_on_cuda_syncs_little(textures):
    model = make_anomaly_pipeline(_extractor("cuda"), PaDiMDetector(
        n_features=40, random_state=0, device="cuda")).fit(textures.X_train)
    x = torch.as_tensor(textures.X_test, device="cuda")
    model.score_and_map(x)  # warm-up: caches and modules built
    reference = make_anomaly_pipeline(_extractor(), PIPELINE_DETECTORS["padim"]()).fit(
        textures.X_train).score_and_map(textures.X_test)
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores, maps = model.score_and_map(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    # the extractor's finiteness flag, the detector's per-block check: a few per call,
    # not one per position block or per image
    assert len(syncs) <= 8, [str(w.message) for w in syncs]
    assert scores.device.type == maps.device.type == "cuda"
    np.testing.assert_allclose(scores.cpu().numpy(), reference[0], rtol=1e-5)
    np.testing.assert_allclose(maps.cpu().numpy(), reference[1], rtol=1e-5,
                               atol=1e-5 * np.abs(reference[1]).max())


def _this_checkout() -> dict:
    """The environment with this checkout's skanomaly first on the path of a child
    interpreter (which imports the installed copy otherwise)."""
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


ARRAY_API_SCRIPT = """
import numpy as np, torch
from sklearn import config_context
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skanomaly import GaussianDetector
rng = np.random.default_rng(0)
X, Q = rng.normal(size=(60, 6)), rng.normal(size=(5, 6))
plain = make_pipeline(StandardScaler(), PCA(4), GaussianDetector(device="cpu")).fit(X)
try:  # scikit-learn's own array-API support with this torch, before any detector
    with config_context(array_api_dispatch=True):
        steps = make_pipeline(StandardScaler(), PCA(4)).fit(torch.from_numpy(X))
        assert isinstance(steps.transform(torch.from_numpy(Q)), torch.Tensor)
except Exception as exc:
    print("unsupported:", type(exc).__name__, exc)
    raise SystemExit(0)
with config_context(array_api_dispatch=True):
    model = make_pipeline(StandardScaler(), PCA(4), GaussianDetector(device="cpu"))
    model.fit(torch.from_numpy(X))
    scores = model.score_samples(torch.from_numpy(Q))
assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float64, type(scores)
np.testing.assert_allclose(scores.numpy(), plain.score_samples(Q), rtol=1e-10)
print("ok")
"""


def test_array_api_dispatch_keeps_tensors(tmp_path):
    # scikit-learn's array-API estimators before a detector keep torch tensors as
    # tensors, and the detector takes and returns them. SciPy reads SCIPY_ARRAY_API at
    # import, hence a fresh interpreter.
    pytest.importorskip("array_api_compat")
    import subprocess
    import sys

    script = tmp_path / "array_api.py"
    script.write_text(ARRAY_API_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600, env={**_this_checkout(), "SCIPY_ARRAY_API": "1"})
    if out.stdout.startswith("unsupported:"):
        pytest.skip(f"this scikit-learn / torch pair has no array API support: {out.stdout}")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


PEAK_SCRIPT = """
import resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from skanomaly import PaDiMDetector, make_anomaly_pipeline
from skanomaly.features import FeatureExtractor
n = int(sys.argv[1])
X = np.random.default_rng(0).random((n, 3, 32, 32), dtype=np.float32)
model = make_anomaly_pipeline(
    FeatureExtractor("resnet18", weights=None, random_state=0, batch_size=16, device="cpu"),
    PaDiMDetector(n_features=100, random_state=0, device="cpu"))
model.fit(X[:2])  # every one-time cost (imports, backbone, allocator pools) paid
del X
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
X = np.random.default_rng(1).random((n, 3, 32, 32), dtype=np.float32)
model.fit(X)
state = sum(v.nbytes for v in vars(model[-1]).values() if isinstance(v, np.ndarray))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, state, X.nbytes)
"""


@pytest.mark.slow
def test_fused_padim_fit_memory_does_not_grow_with_images(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)

    def run(n):
        out = subprocess.run([sys.executable, str(script), str(n)], capture_output=True,
                             text=True, check=True, timeout=600, env=_this_checkout())
        return [int(v) for v in out.stdout.split()]

    # from about 100 images on, the fit's working blocks are at their bound (16 MiB of
    # float64 per block of positions): what is left to grow is what N itself makes
    small, large = run(256), run(1024)
    grown = large[0] - small[0]
    images = large[2] - small[2]  # the larger input itself
    # features of the kept channels held for the leave-one-out scores: 100 x 8 x 8
    # float32 per image; everything else is the detector's state, the same at any N
    held = (1024 - 256) * 100 * 8 * 8 * 4
    # allocator noise: a run's peak moves by up to two of the fit's 16 MiB working blocks
    # (seen under parallel test runs), which do not grow with N
    slack = 2 * 16 * 2**20
    assert grown <= images + held + large[1] + slack, (grown, images, held, large[1])
