"""Research code around the library: datasets, training, the paper's tables, sweeps, peers and plots.

None of it is needed to compress a model, so its extra dependencies (matplotlib, Torch-Pruning,
platformdirs) come with the optional ``lab`` extra, ``pip install 'neuronmerge[lab]'``. The library
core never imports this package; the command line imports it only for ``reproduce``, ``train``,
``sweep`` and ``evaluate``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from neuronmerge.errors import MissingDependencyError


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a dependency of the ``lab`` extra), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs {module.split('.')[0]}: pip install 'neuronmerge[lab]'"
        ) from exc
