"""The examples of docs/user_guide/scaling.rst run and give the outputs shown."""

import doctest
from pathlib import Path

import pytest

SCALING = Path(__file__).resolve().parent.parent / "docs" / "user_guide" / "scaling.rst"


def test_scaling_page_examples():
    pytest.importorskip("dask.array")
    pytest.importorskip("distributed")
    result = doctest.testfile(str(SCALING), module_relative=False, report=True,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
