"""The lowest versions pyproject.toml declares: as pip constraints, or checked against a venv.

Reads ``pyproject.toml``: ``requires-python``, ``[project] dependencies`` and the ``dev``
extra (the set that README's ``pip install ".[dev]"`` installs). Every direct dependency
must declare a lower bound (``>=``, ``~=`` or ``==``): one without is an error, since its
oldest supported version would be undefined.

Usage::

    python .ci/lowest_constraints.py > lowest.txt
        # one ``name==minimum`` line per direct dependency: a pip constraints file with
        # which ``pip install ".[dev]"`` builds the oldest environment the package claims
        # to support, transitive dependencies left to the resolver
    python .ci/lowest_constraints.py --python
        # the lowest Python that ``requires-python`` admits, as ``X.Y``
    python .ci/lowest_constraints.py --admits 3.13
        # exit 0 if ``requires-python`` admits Python 3.13, else 1 (for .ci/run's choice
        # of the newest Python on the machine)
    python -m pip list --format=json > list.json
    python .ci/lowest_constraints.py --installed list.json [--expect-lowest]
        # each direct dependency: installed version and declared requirement; with
        # --expect-lowest, exit 1 if any installed version is not the declared minimum

The venv's own ``pip list`` is read, rather than its ``importlib.metadata``, so that this
script runs on the host interpreter (it needs ``tomllib``, Python 3.11) whatever the
venv's Python is.
"""
from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("dev",)

# name, optional [extras], specifiers, optional ; marker (PEP 508, without URLs)
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
    r"(?P<specs>[^;]*?)\s*(?:;\s*(?P<marker>.+))?$"
)
_SPEC = re.compile(r"^\s*(?P<op>~=|==|!=|<=|>=|<|>|===)\s*(?P<version>\S+)\s*$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _minimum(specs: str, what: str) -> str:
    """The version of the one lower-bound specifier in a comma-separated ``specs``."""
    minimum = None
    for spec in filter(None, (s.strip() for s in specs.split(","))):
        parsed = _SPEC.match(spec)
        if parsed is None:
            raise ValueError(f"cannot parse specifier {spec!r} in {what!r}")
        if parsed["op"] in (">=", "~=", "==", "==="):
            if minimum is not None:
                raise ValueError(f"{what!r} has more than one lower bound")
            minimum = parsed["version"]
    if minimum is None:
        raise ValueError(f"{what!r} declares no lower bound (>=, ~= or ==)")
    return minimum


def lowest_pin(requirement: str) -> str:
    """Return the ``name==minimum[; marker]`` constraint line for one requirement.

    Raises ValueError when the requirement cannot be parsed or declares no lower bound.
    """
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    line = f"{match['name']}=={_minimum(match['specs'], requirement)}"
    return f"{line}; {match['marker']}" if match["marker"] else line


def _project() -> dict:
    return tomllib.loads(Path("pyproject.toml").read_text())["project"]


def lowest_pins() -> dict[str, tuple[str, str]]:
    """Normalised name -> (requirement as declared, ``name==minimum`` line)."""
    project = _project()
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in EXTRAS:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        requirements += optional[extra]
    pins: dict[str, tuple[str, str]] = {}
    for requirement in requirements:
        line = lowest_pin(requirement)
        key = _normalise(line.split("==")[0])
        if pins.setdefault(key, (requirement, line))[1] != line:  # a repeated dependency
            raise SystemExit(f"conflicting lower bounds: {pins[key][1]!r} and {line!r}")
    return pins


def lowest_python() -> str:
    """``requires-python``'s lower bound as ``X.Y``."""
    requires = _project().get("requires-python")
    if not requires:
        raise SystemExit("pyproject.toml declares no requires-python")
    return ".".join(_minimum(requires, f"requires-python {requires}").split(".")[:2])


def admits_python(version: str) -> bool:
    """Whether ``requires-python`` admits Python ``version`` (``X.Y`` or ``X.Y.Z``).

    Each comma-separated specifier is compared on release numbers (``>=3.10``,
    ``<3.14``, ``!=3.11.*``, ``==3.12.*``...); a wildcard compares its prefix only.
    """
    requires = _project().get("requires-python") or ""
    have = tuple(int(p) for p in version.split("."))
    for spec in filter(None, (s.strip() for s in requires.split(","))):
        parsed = _SPEC.match(spec)
        if parsed is None:
            raise SystemExit(f"cannot parse requires-python specifier {spec!r}")
        op, want = parsed["op"], parsed["version"]
        wildcard = want.endswith(".*")
        bound = tuple(int(p) for p in want.removesuffix(".*").split("."))
        mine = have[:len(bound)] if wildcard or op in ("==", "!=", "~=") else have
        ok = {">=": mine >= bound, ">": mine > bound, "<=": mine <= bound,
              "<": mine < bound, "==": mine == bound, "===": mine == bound,
              "!=": mine != bound,
              "~=": have >= bound and have[:len(bound) - 1] == bound[:-1]}[op]
        if not ok:
            return False
    return True


def _release(version: str) -> tuple[int, ...] | str:
    """``"1.24"`` and ``"1.24.0"`` -> ``(1, 24)``; local labels (``+cpu``) dropped."""
    public = version.split("+")[0]
    if not re.fullmatch(r"\d+(\.\d+)*", public):
        return public
    parts = [int(p) for p in public.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def report_installed(pip_list: str, expect_lowest: bool) -> int:
    """Print installed and declared versions; with ``expect_lowest``, 1 if any pin missed."""
    text = sys.stdin.read() if pip_list == "-" else Path(pip_list).read_text()
    installed = {_normalise(d["name"]): d["version"] for d in json.loads(text)}
    bad, pins = 0, lowest_pins()
    for key, (requirement, line) in pins.items():
        minimum = line.split(";")[0].split("==")[1]
        version = installed.get(key, "NOT INSTALLED")
        mark = ""
        if expect_lowest and _release(version) != _release(minimum):
            mark, bad = "   <-- not the declared minimum", bad + 1
        print(f"     {key:<16} {version:<16} (declared {requirement}){mark}")
    if bad:
        print(f"{bad} of {len(pins)} direct dependencies not at the declared minimum",
              file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if not argv:
        print("\n".join(line for _, line in lowest_pins().values()))
        return 0
    if argv == ["--python"]:
        print(lowest_python())
        return 0
    if len(argv) == 2 and argv[0] == "--admits":
        return 0 if admits_python(argv[1]) else 1
    if len(argv) in (2, 3) and argv[0] == "--installed" and argv[2:] in ([], ["--expect-lowest"]):
        return report_installed(argv[1], expect_lowest=len(argv) == 3)
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
