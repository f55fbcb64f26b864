"""The library's research settings, changed for one block of code (``overridden``).

The validation experiments (``experiments/*_validation.py``, ``budget_*.py``) compare settings that
the library fixes as module constants once chosen: the budget's trust band, whether an allocation
is checked on the probes and how, whether ``merge-ls`` scales its curves by each group's measured
output error (``group_impact``), how it derives probes, how it repairs BatchNorm
statistics on them, and where its data-free path gets them. Each experiment used to assign those
constants and restore them in its own ``try``/``finally``; ``overridden`` is that, once, with every
setting named in one table so that a misspelt name is an error rather than a new attribute nobody
reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

from neuronmerge import allocation_check, budget, group_impact, lsq, norm_repair, probes, widths
from neuronmerge.errors import InvalidArgumentError

#: Every setting ``overridden`` may change: its keyword, and the module constant it stands for.
SETTINGS: dict[str, tuple[ModuleType, str]] = {
    "band": (budget, "BAND"),
    "check": (allocation_check, "ENABLED"),
    "check_bands": (allocation_check, "BANDS"),
    "check_seed": (allocation_check, "CHECK_SEED"),
    "fitted_bands": (allocation_check, "FITTED_BANDS"),
    "fitted_significance": (allocation_check, "FITTED_SIGNIFICANCE"),
    "group_impact": (group_impact, "ENABLED"),
    "significance": (allocation_check, "SIGNIFICANCE"),
    "held_out": (allocation_check, "HELD_OUT"),
    "negligible": (allocation_check, "NEGLIGIBLE"),
    "least_squares_curves": (widths, "LEAST_SQUARES_CURVES"),
    "hold_streams": (widths, "HOLD_STREAMS"),
    "probe_noise": (probes, "NOISE"),
    "batchnorm_repair": (lsq, "BATCHNORM_REPAIR"),
    "trust_exponent": (norm_repair, "TRUST_EXPONENT"),
    # The function merge-ls's data-free path takes its probes from (an experiment's own probes).
    "probe_source": (lsq, "cached_probes"),
}


@contextlib.contextmanager
def overridden(**values: object) -> Iterator[None]:
    """Run the block with the given settings (keywords of ``SETTINGS``), then restore every one,
    also when the block raises. An unknown keyword raises ``InvalidArgumentError`` before anything
    is changed."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise InvalidArgumentError(
            f"unknown research setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}"
        )
    previous = {name: getattr(*SETTINGS[name]) for name in values}
    try:
        for name, value in values.items():
            setattr(*SETTINGS[name], value)
        yield
    finally:
        for name, value in previous.items():
            setattr(*SETTINGS[name], value)
