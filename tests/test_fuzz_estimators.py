"""Finite in, finite out — or a clear error — for every detector's public methods.

Hypothesis draws training and query data at scales from 1e-300 to 1e300, with empty axes
and float16/32/64, integer and boolean dtypes. Whatever is drawn, each call either
returns finite results of the documented shape or raises ``ValueError``/``TypeError``
(never a raw ``IndexError``/``RuntimeError`` from torch, never NaN or infinity), and the
input arrays are never modified.
"""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skanomaly import (
    DFKDEDetector,
    DFMDetector,
    GaussianDetector,
    PaDiMDetector,
    PatchCoreDetector,
)

FACTORIES = {
    "gaussian": lambda: GaussianDetector(device="cpu"),
    "gaussian-empirical": lambda: GaussianDetector(shrinkage=None, device="cpu"),
    "padim": lambda: PaDiMDetector(random_state=0, device="cpu"),
    "patchcore": lambda: PatchCoreDetector(random_state=0, device="cpu"),
    "dfm": lambda: DFMDetector(device="cpu"),
    "dfm-nll": lambda: DFMDetector(score_type="nll", device="cpu"),
    "dfkde": lambda: DFKDEDetector(random_state=0, device="cpu"),
}
SPATIAL = {"padim", "patchcore", "dfm", "dfm-nll", "dfkde"}
DTYPES = ["float16", "float32", "float64", "int64", "int8", "bool"]


def _array(rng, shape, scale, dtype):
    x = rng.normal(size=shape) * scale
    if dtype == "bool":
        return x > 0
    if dtype.startswith("int"):
        info = np.iinfo(dtype)
        return np.clip(np.round(x), info.min, info.max).astype(dtype)
    with np.errstate(over="ignore"):
        x = x.astype(dtype)
    # float16/32 overflow to inf beyond their range: keep the data finite, as promised
    return np.where(np.isfinite(x), x, np.finfo(dtype).max if dtype != "float64" else 0)


@st.composite
def _cases(draw, name):
    spatial = name in SPATIAL and draw(st.booleans())
    n = draw(st.sampled_from([0, 1, 2, 3, 12, 30]))
    d = draw(st.sampled_from([0, 1, 2, 5]))
    shape = (n, d, draw(st.sampled_from([0, 1, 3])), draw(st.sampled_from([1, 4]))) \
        if spatial else (n, d)
    # any exponent, and often those near the edges of float32/float64 squares
    scale = 10.0 ** draw(st.integers(-300, 300) | st.sampled_from(
        [-160, -150, -40, -38, -20, -19, 0, 18, 19, 20, 36, 38, 75, 150, 154, 155, 300]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    query_shape = (draw(st.sampled_from([1, 4])),) + shape[1:]
    query_scale = scale * 10.0 ** draw(st.sampled_from([0, 0, 3, -3]))
    return (_array(rng, shape, scale, dtype),
            _array(rng, query_shape, query_scale, dtype))


def _finite_or_clear_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError):
        return None


@pytest.mark.parametrize("name", sorted(FACTORIES))
@settings(max_examples=40)
@given(data=st.data())
def test_finite_output_or_a_clear_error(name, data):
    X, Q = data.draw(_cases(name))
    X_copy, Q_copy = X.copy(), Q.copy()
    detector = FACTORIES[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. in-sample offset on few samples
        fitted = _finite_or_clear_error(detector.fit, X)
        if fitted is not None:
            assert np.isfinite(fitted.offset_)
            for method in ("score_samples", "decision_function", "predict"):
                out = _finite_or_clear_error(getattr(fitted, method), Q)
                if out is not None:
                    assert out.shape == (len(Q),)
                    assert np.isfinite(out).all(), (method, out)
            if hasattr(fitted, "anomaly_map"):
                for kwargs in ({}, {"output_size": 8}):
                    maps = _finite_or_clear_error(fitted.anomaly_map, Q, **kwargs)
                    if maps is not None:
                        assert np.isfinite(maps).all()
            if _finite_or_clear_error(fitted.calibrate, Q) is not None:
                assert np.isfinite(fitted.offset_)
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(Q, Q_copy)
