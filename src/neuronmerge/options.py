"""The options of a compression, validated once, shared by the API and the command line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from neuronmerge import criteria
from neuronmerge.budget import Request
from neuronmerge.budget import request as budget_request
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.methods.base import Method
from neuronmerge.methods.least_squares import LeastSquares
from neuronmerge.methods.norm_ratio import NormRatio
from neuronmerge.methods.paper import Paper

MethodName = Literal["merge", "prune", "merge-ls"]
Fidelity = Literal["exact", "paper"]

#: Every ``method`` of ``compress``: whether it is data-free, and its idea in one line.
METHODS: dict[str, tuple[bool, str]] = {
    "prune": (True, "drop the removed neurons (same kept set as merge)"),
    "merge": (True, "the paper: fold each removed neuron into its most similar kept one"),
    "merge-ls": (
        True,
        "least-squares merge of each removed neuron into all kept ones, kept set chosen to cover "
        "the others; moments measured on synthetic probes (data-free) or on calibration batches",
    ),
}

#: Cosine-similarity threshold below which a removed neuron is dropped rather than merged
#: (``fidelity="exact"``); ``None`` merges every removed neuron into its most similar kept one. Chosen
#: on a validation split carved from Fashion-MNIST's training data: the best mean accuracy over ratios
#: 0.5-0.8 and the four models trained here (``experiments/threshold_validation.json``).
DEFAULT_THRESHOLD: float | None = 0.1


@dataclass(frozen=True)
class Options:
    """How to compress; invalid values raise ``InvalidArgumentError`` on construction.

    ``fidelity="paper"`` selects the paper's method (``methods.paper``) for ``merge`` and ``prune``;
    ``lam`` belongs to it. ``include``/``exclude`` are glob patterns on producer layer names.
    ``budget``: a parameter/MAC target, per-layer ratios, rounding and allocation (``budget.request``).
    ``intercept`` (``merge-ls`` only): fit each removed channel with a constant, which goes into the
    consumer's bias (a bias-free consumer gains one); ``False`` fits through the origin instead, for
    models whose format cannot hold a new bias (Hugging Face configs without an MLP bias switch).
    """

    method: MethodName = "merge"
    criterion: str = "l1-norm"
    threshold: float | None = DEFAULT_THRESHOLD
    lam: float | None = None
    fidelity: Fidelity = "exact"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    approximate: bool = False
    budget: Request = Request()
    intercept: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(
                f"method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.method == "merge-ls" and self.fidelity != "exact":
            raise InvalidArgumentError("method='merge-ls' has no paper fidelity")
        if not self.intercept and self.method != "merge-ls":
            raise InvalidArgumentError("intercept=False applies to method='merge-ls' only")
        if self.criterion not in criteria.CRITERIA:
            raise InvalidArgumentError(
                f"unknown criterion {self.criterion!r}; choose one of {', '.join(criteria.CRITERIA)}"
            )
        if self.fidelity not in ("exact", "paper"):
            raise InvalidArgumentError(f"fidelity must be 'exact' or 'paper', got {self.fidelity!r}")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise InvalidArgumentError(
                f"threshold is a cosine similarity in [-1, 1], got {self.threshold}"
            )
        if self.lam is not None:
            if self.fidelity != "paper":
                raise InvalidArgumentError("lam applies to fidelity='paper' only (conv + BatchNorm)")
            if not 0 <= self.lam <= 1:
                raise InvalidArgumentError(f"lam must be in [0, 1], got {self.lam}")

    @classmethod
    def of(
        cls,
        *,
        method: str = "merge",
        criterion: str = "l1-norm",
        threshold: float | None = DEFAULT_THRESHOLD,
        lam: float | None = None,
        fidelity: str = "exact",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        approximate: bool = False,
        target_params: float | None = None,
        target_macs: float | None = None,
        ratios: Mapping[str, float] | None = None,
        round_to: int | None = None,
        allocation: str = "error",
        intercept: bool = True,
    ) -> Options:
        """Options from loosely typed arguments (lists of patterns become tuples, the budget
        arguments a validated ``budget.Request``)."""
        return cls(
            method=method,  # type: ignore[arg-type]
            criterion=criterion,
            threshold=threshold,
            lam=lam,
            fidelity=fidelity,  # type: ignore[arg-type]
            include=None if include is None else tuple(include),
            exclude=None if exclude is None else tuple(exclude),
            approximate=approximate,
            budget=budget_request(target_params, target_macs, ratios, round_to, allocation),
            intercept=intercept,
        )

    def method_object(self) -> Method:
        """The Method these options select."""
        if self.fidelity == "paper":
            return Paper(merge=self.method == "merge")
        if self.method == "merge-ls":
            return LeastSquares()
        return NormRatio(merge=self.method == "merge")
