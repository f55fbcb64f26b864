"""The library core stays free of the research code and of the ``lab`` extra's dependencies."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from neuronmerge.errors import MissingDependencyError
from neuronmerge.lab import require

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_no_research_code() -> None:
    probe = (
        "import sys, neuronmerge, neuronmerge.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'torch_pruning', 'platformdirs', 'typer') or m.startswith('neuronmerge.lab'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_missing_lab_dependency_names_the_extra() -> None:
    with pytest.raises(
        MissingDependencyError, match=r"plotting needs no_such_pkg: .*neuronmerge\[lab\]"
    ):
        require("no_such_pkg.sub", "plotting")


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (make setup's venv)
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_declared_torch_range_is_the_range_the_suite_runs_on() -> None:
    """``pip install .`` must not pick a torch nobody tested: the range starts at the lowest version
    the Makefile installs (the main suite's) and stops before the minor release after the highest
    (the zoo tier's)."""
    dependencies = _pyproject()["project"]["dependencies"]
    (declared,) = [Requirement(r) for r in dependencies if r.startswith("torch")]
    pinned = sorted(Version(v) for v in re.findall(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()))
    assert pinned and all(declared.specifier.contains(v) for v in pinned)
    assert declared.specifier.contains(version("torch").split("+")[0])
    low, high = pinned[0].release[:2], pinned[-1].release[:2]
    assert not declared.specifier.contains(f"{low[0]}.{low[1] - 1}.99")  # lowest = tested
    assert not declared.specifier.contains(f"{high[0]}.{high[1] + 1}.0")  # no untested future


def test_licence_is_an_spdx_expression_with_its_file() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "MIT"  # a table here is deprecated by setuptools (a warning per build)
    assert all((ROOT / name).is_file() for name in project["license-files"])
    assert "MIT License" in (ROOT / project["license-files"][0]).read_text()
