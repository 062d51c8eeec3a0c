"""The deployment guide's examples run: docs/user_guide/deployment.rst as a doctest.

It fits, saves, exports and runs a model; the reference values inside it are the
estimator's own results (``predict``, ``score_samples``, ``anomaly_map``).
"""

import doctest
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "user_guide" / "deployment.rst"


def test_deployment_guide_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the guide writes model.joblib, model.onnx, model.pt
    result = doctest.testfile(str(GUIDE), module_relative=False, report=True,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 20
    assert result.failed == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"model.joblib", "model.onnx", "model.pt"}
