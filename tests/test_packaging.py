"""The library core stays free of the research code and of the ``lab`` extra's dependencies."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neuronmerge.errors import MissingDependencyError
from neuronmerge.lab import require


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
