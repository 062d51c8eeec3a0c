"""The package's layout: what ``import skanomaly`` pulls in, and how its modules import
each other (DESIGN.md's "Layers")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import skanomaly

PACKAGE = Path(skanomaly.__file__).parent


def test_import_skanomaly_pulls_in_no_module_of_the_cli():
    """The command line is built on the package, never the other way round."""
    code = ("import json, sys, skanomaly\n"
            "print(json.dumps([m for m in sys.modules if m.startswith('skanomaly.cli')]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
