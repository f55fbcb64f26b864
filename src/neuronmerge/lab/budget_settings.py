"""The budget allocation's research settings, changed for one block of code (``overridden``).

The validation experiments (``experiments/budget_*.py``) compare settings that the library fixes
as module constants once chosen: the trust band, whether ``merge-ls`` checks its allocation on the
probes, and how. Each experiment used to assign those constants and restore them in its own
``try``/``finally``; ``overridden`` is that, once, with every setting named in one table so that a
misspelt name is an error rather than a new attribute nobody reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

from neuronmerge import allocation_check, budget, widths
from neuronmerge.errors import InvalidArgumentError

#: Every setting ``overridden`` may change: its keyword, and the module constant it stands for.
SETTINGS: dict[str, tuple[ModuleType, str]] = {
    "band": (budget, "BAND"),
    "check": (allocation_check, "ENABLED"),
    "check_bands": (allocation_check, "BANDS"),
    "significance": (allocation_check, "SIGNIFICANCE"),
    "held_out": (allocation_check, "HELD_OUT"),
    "negligible": (allocation_check, "NEGLIGIBLE"),
    "least_squares_curves": (widths, "LEAST_SQUARES_CURVES"),
    "hold_streams": (widths, "HOLD_STREAMS"),
}


@contextlib.contextmanager
def overridden(**values: object) -> Iterator[None]:
    """Run the block with the given settings (keywords of ``SETTINGS``), then restore every one,
    also when the block raises. An unknown keyword raises ``InvalidArgumentError`` before anything
    is changed."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise InvalidArgumentError(
            f"unknown budget setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}"
        )
    previous = {name: getattr(*SETTINGS[name]) for name in values}
    try:
        for name, value in values.items():
            setattr(*SETTINGS[name], value)
        yield
    finally:
        for name, value in previous.items():
            setattr(*SETTINGS[name], value)
