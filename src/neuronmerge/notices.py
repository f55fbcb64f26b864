"""Warnings about a compression that did less than asked, or something other than asked.

``compress`` refuses what it cannot do at a layer and goes on with the others, which is right for a
library but easy to miss: a GELU network comes back the same size, without a word. These checks run
on the finished report and say so through Python's ``warnings`` (the command line prints them as
``warning:`` lines), naming ``plan``, which lists every layer and why it was skipped.
"""

from __future__ import annotations

import warnings

from torch import nn

from neuronmerge.graph.groups import OUTPUT
from neuronmerge.types import Skipped


class CompressionWarning(UserWarning):
    """A compression applied nothing or only part of the requested ratio, or changed the mode."""


#: Skips that are no shortfall: the model's output layer keeps its width by definition, and a layer
#: the caller left out with include/exclude is skipped as asked.
EXPECTED_SKIPS = (OUTPUT, "left out by include/exclude")


def warn_about_outcome(
    model: nn.Module, ratio: float, compressed: int, skipped: tuple[Skipped, ...]
) -> None:
    """Warn (``CompressionWarning``) when ``model`` was given in training mode, and when of the layers
    that could take ``ratio`` only ``compressed`` were compressed, ``skipped`` naming the others."""
    if any(module.training for module in model.modules()):
        _warn(
            "the model is in training mode; merging is defined on inference statistics (BatchNorm "
            "running statistics, no dropout), so the result computes what model.eval() computes "
            "and is returned in eval mode (the model you passed is left as it was). Call "
            "model.eval() first to silence this."
        )
    missed = [skip for skip in skipped if skip.reason not in EXPECTED_SKIPS]
    if not missed or ratio == 0:
        return
    smooth = sum("approximate=True" in skip.reason for skip in missed)
    hint = (
        f"; {smooth} of them are followed by non-homogeneous activations that approximate=True "
        "(--approximate) merges"
        if smooth
        else ""
    )
    first = f"{missed[0].producer}: {missed[0].reason}"
    see = "see nm.plan(model, x) or `neuronmerge plan` for every layer and why"
    if compressed == 0:
        _warn(
            f"no layer could be compressed ({len(missed)} skipped, first {first}){hint}; the model "
            f"keeps its size and function; {see}"
        )
    else:
        names = ", ".join(skip.producer for skip in missed[:5]) + (", ..." if len(missed) > 5 else "")
        _warn(
            f"ratio {ratio} reached only {compressed} of {compressed + len(missed)} layers; skipped: "
            f"{names} (first {first}){hint}; {see}"
        )


def _warn(message: str) -> None:
    # stacklevel 4: past this module and api.compress (and merge/prune) to the caller's line, roughly
    warnings.warn(message, CompressionWarning, stacklevel=4)
