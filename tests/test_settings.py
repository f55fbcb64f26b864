"""The experiments' settings context manager changes the library's constants for one block only."""

from __future__ import annotations

import pytest

from neuronmerge import allocation_check, budget, lsq, norm_repair, widths
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.lab.settings import SETTINGS, overridden


def test_settings_apply_inside_and_are_restored_after_an_error() -> None:
    before = {name: getattr(*where) for name, where in SETTINGS.items()}
    with pytest.raises(RuntimeError, match="inside"):
        with overridden(
            band=0.7,
            check=False,
            hold_streams=False,
            held_out=True,
            batchnorm_repair="remeasure",
            trust_exponent=0.0,
        ):
            assert budget.BAND == 0.7
            assert allocation_check.ENABLED is False
            assert widths.HOLD_STREAMS is False
            assert allocation_check.HELD_OUT is True
            assert lsq.BATCHNORM_REPAIR == "remeasure"
            assert norm_repair.TRUST_EXPONENT == 0.0
            raise RuntimeError("inside")
    assert {name: getattr(*where) for name, where in SETTINGS.items()} == before


def test_an_unknown_setting_is_refused_before_anything_changes() -> None:
    band = budget.BAND
    with pytest.raises(InvalidArgumentError, match="unknown research setting.*bnad"):
        with overridden(band=0.9, bnad=0.1):
            pass
    assert budget.BAND == band
