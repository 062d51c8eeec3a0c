"""The Python examples of docs/getting_started.rst and docs/coming_from_anomalib.rst run.

(The gallery under examples/ runs in the documentation build, which CI runs with -W.)
"""

import doctest
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page", ["getting_started.rst", "coming_from_anomalib.rst"])
def test_page_examples(page):
    pytest.importorskip("torchvision")
    if page == "getting_started.rst":
        pytest.importorskip("timm")
    result = doctest.testfile(str(DOCS / page), module_relative=False, report=True,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
