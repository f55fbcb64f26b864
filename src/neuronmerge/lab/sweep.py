"""Accuracy of every compression method at many pruning ratios: the analogue of the paper's Fig. 1.

A *method* is one entry of ``METHODS``: a name, whether it is data-free, a one-line description and a
function ``(model, example_inputs, ratio, context) -> smaller model``. ``sweep`` runs each method at
each ratio on a trained model and measures test accuracy (reported) and validation accuracy (what
defaults are chosen on), plus the parameter count each method actually reached.

Adding a method takes one function and one line::

    def _merge_all(model, example, ratio, context):
        return nm.merge(model, example, ratio, threshold=None)

    register_method(SweepMethod("merge-all", True, "merge with no threshold", _merge_all))

A method defined in another module is registered when that module is imported: import it at the
end of this one, so that the CLI and ``experiments/run_sweeps.py`` see it.

Data-aware methods may read ``context.calibration`` (a few unlabeled batches of the training split,
never validation or test images) and are registered with ``data_free=False``; data-free ones must
not read it. A method that cannot reach a ratio raises ``InvalidArgumentError``: the sweep lists it
under ``skipped`` and goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuronmerge.api import Method, compress
from neuronmerge.capture import capture
from neuronmerge.criteria import check_ratio
from neuronmerge.errors import CheckpointError, InvalidArgumentError, OutputExistsError
from neuronmerge.evaluate import accuracy, count_parameters
from neuronmerge.io import atomic_write
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.folding import Repair, fold, has_batchnorm
from neuronmerge.lab.reproduce import PAPER_SETUPS
from neuronmerge.lab.training import VAL_SEED, VAL_SIZE  # the split ``trained_model`` holds out
from neuronmerge.models import get_spec
from neuronmerge.probes import cached_probes
from neuronmerge.recalibrate import recalibrate_batchnorm

#: The ratios of a full sweep (``--ratios`` default): 0.1 ... 0.9 and 0.95.
DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: Unlabeled training batches handed to data-aware methods (``SweepContext.calibration``).
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 8, 128


@dataclass(frozen=True)
class SweepContext:
    """What a method may know beyond the model: its architecture and unlabeled training batches."""

    arch: str | None
    calibration: tuple[Tensor, ...] = field(default=())
    #: Work a method may reuse across the ratios of one model (``merge-ls`` keeps its probes here).
    cache: dict[str, Any] = field(default_factory=dict, compare=False)


Compressor = Callable[[nn.Module, Tensor, float, SweepContext], nn.Module]


@dataclass(frozen=True)
class SweepMethod:
    """One row kind of a sweep; ``compress`` must not modify the model it is given."""

    name: str
    data_free: bool
    description: str
    compress: Compressor


METHODS: dict[str, SweepMethod] = {}


def register_method(method: SweepMethod) -> SweepMethod:
    """Add ``method`` to ``METHODS`` (``--methods all`` runs every one, in registration order)."""
    if method.name in METHODS or method.name == "all":
        raise ValueError(f"sweep method {method.name!r} is already registered or reserved")
    METHODS[method.name] = method
    return method


def available_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(METHODS)


# -- the paper's two methods and ours -------------------------------------------------------------

#: The authors' settings for their CIFAR conv nets (VGG-16, ResNet-56): l1-norm, t = 0.1, lambda 0.85.
PAPER_CONV_SETTINGS: dict[str, Any] = {"criterion": "l1-norm", "threshold": 0.1, "lam": 0.85}


def paper_settings(arch: str | None) -> dict[str, Any]:
    """Criterion, threshold and lambda of the paper for ``arch``.

    LeNet-300-100 uses its Table 1 setup (threshold 0.45); every other model, the settings the
    authors used for their conv nets, which is what they would have run on a new conv net.
    """
    name = get_spec(arch).name if arch is not None else None
    if name in PAPER_SETUPS:
        setup = PAPER_SETUPS[name]
        return {"criterion": setup.criterion, "threshold": setup.threshold, "lam": setup.lam}
    return dict(PAPER_CONV_SETTINGS)


def _paper(method: Method) -> Compressor:
    def run(model: nn.Module, example: Tensor, ratio: float, context: SweepContext) -> nn.Module:
        settings = paper_settings(context.arch)
        return compress(model, example, ratio, method=method, fidelity="paper", **settings).model

    return run


def _merge_exact(model: nn.Module, example: Tensor, ratio: float, context: SweepContext) -> nn.Module:
    return compress(model, example, ratio).model


register_method(
    SweepMethod(
        "prune", True, "paper fidelity: drop the lowest-l1 neurons, no compensation", _paper("prune")
    )
)
register_method(
    SweepMethod(
        "merge", True, "paper fidelity: neuron merging with the authors' settings", _paper("merge")
    )
)
register_method(
    SweepMethod("merge-exact", True, "neuronmerge defaults: exact folded-row merging", _merge_exact)
)


def _torch_pruning(model: nn.Module, example: Tensor, ratio: float, context: SweepContext) -> nn.Module:
    from neuronmerge.lab.peers import torch_pruning_magnitude

    return torch_pruning_magnitude(model, example, ratio)


register_method(
    SweepMethod(
        "torch-pruning",
        True,
        "Torch-Pruning magnitude pruning (l1) of the same layers and counts, no fine-tuning",
        _torch_pruning,
    )
)


# -- beyond the paper -------------------------------------------------------------------------------


def _probes(model: nn.Module, example: Tensor, context: SweepContext) -> list[tuple[Tensor, ...]]:
    """Synthetic probes of ``model`` (data-free), made once per sweep and reused at every ratio."""
    if "probes" not in context.cache:
        context.cache["probes"] = cached_probes(capture(model, example), example)
    probes: list[tuple[Tensor, ...]] = context.cache["probes"]
    return probes


def _merge_ls(model: nn.Module, example: Tensor, ratio: float, context: SweepContext) -> nn.Module:
    # The library's data-free path (its BatchNorm repair differs from calibration's), on the probes
    # ``_probes`` made once: ``compress`` finds them in ``cached_probes``.
    _probes(model, example, context)
    return compress(model, example, ratio, method="merge-ls").model


def _merge_ls_data(model: nn.Module, example: Tensor, ratio: float, context: SweepContext) -> nn.Module:
    return compress(model, example, ratio, method="merge-ls", calibration=context.calibration).model


def _merge_recalibrated(
    model: nn.Module, example: Tensor, ratio: float, context: SweepContext
) -> nn.Module:
    return recalibrate_batchnorm(compress(model, example, ratio).model, context.calibration)


register_method(
    SweepMethod(
        "merge-ls",
        True,
        "least-squares merge into all kept neurons, covering kept set, on synthetic probes",
        _merge_ls,
    )
)
register_method(
    SweepMethod(
        "merge-ls-data",
        False,
        "DATA-AWARE: merge-ls with moments measured on unlabeled training batches",
        _merge_ls_data,
    )
)
register_method(
    SweepMethod(
        "merge-exact-recal",
        False,
        "DATA-AWARE: merge-exact, then BatchNorm statistics recomputed on unlabeled batches",
        _merge_recalibrated,
    )
)


def _fold(repair: Repair) -> Compressor:
    def run(model: nn.Module, example: Tensor, ratio: float, context: SweepContext) -> nn.Module:
        # Fold-DIR re-measures BatchNorms: a model without any needs no probes.
        needed = repair == "dir" and has_batchnorm(model)
        probes = _probes(model, example, context) if needed else None
        return fold(model, example, ratio, repair=repair, probes=probes)

    return run


register_method(
    SweepMethod(
        "fold-ar",
        True,
        "model folding (Wang et al. 2025): k-means clusters, data-free approximate variance repair",
        _fold("ar"),
    )
)
register_method(
    SweepMethod(
        "fold-dir",
        True,
        "model folding, BatchNorm statistics reset on one batch of synthetic (DeepInversion) probes",
        _fold("dir"),
    )
)


# -- the sweep --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalData:
    """Test split (reported), validation split (for choosing defaults), calibration batches."""

    test: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    calibration: tuple[Tensor, ...]


def fashion_mnist_eval_data(data_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> EvalData:
    """Fashion-MNIST's test split, the validation split ``trained_model`` holds out, and
    ``CALIBRATION_BATCHES`` unlabeled batches drawn (seeded) from the remaining training images."""
    images, labels = load_fashion_mnist("train", data_dir)
    train_index, val_index = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    generator = torch.Generator().manual_seed(seed)
    count = min(len(train_index), CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE)
    chosen = train_index[torch.randperm(len(train_index), generator=generator)[:count]]
    calibration = tuple(images[chosen].split(CALIBRATION_BATCH_SIZE))
    return EvalData(
        test=load_fashion_mnist("test", data_dir),
        val=(images[val_index], labels[val_index]),
        calibration=calibration,
    )


def resolve_methods(names: Iterable[str]) -> list[SweepMethod]:
    """The registered methods named in ``names`` (``all`` means every one), without repeats."""
    wanted: list[str] = []
    for name in names:
        for each in available_methods() if name == "all" else [name]:
            if each not in METHODS:
                raise InvalidArgumentError(
                    f"unknown sweep method {each!r}; choose from {', '.join(available_methods())} or all"
                )
            if each not in wanted:
                wanted.append(each)
    if not wanted:
        raise InvalidArgumentError("name at least one sweep method")
    return [METHODS[name] for name in wanted]


def sweep(
    model: nn.Module,
    arch: str | None,
    data: EvalData,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    methods: Iterable[str] = ("all",),
    *,
    dataset: str = "fashion-mnist",
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every method at every ratio on ``model``; accuracies in percent, rounded to 0.01.

    Returns ``{"model", "dataset", "baseline_accuracy", "baseline_val_accuracy", "params",
    "results": [{"ratio", "method", "data_free", "accuracy", "val_accuracy", "params",
    "seconds"}], "skipped": [{"ratio", "method", "reason"}]}``; ``accuracy`` is on the test split,
    ``seconds`` is the compression time. A method that refuses a ratio (the paper's floored kept
    counts leave a narrow layer no channel at 0.95) is listed in ``skipped`` with its message.
    ``on_row`` is called with each result or skip as soon as it is known (for progress display).
    """
    chosen = resolve_methods(methods)
    checked = [check_ratio(ratio) for ratio in ratios]
    if not checked:
        raise InvalidArgumentError("give at least one ratio")
    example = data.test[0][:2]
    context = SweepContext(arch=arch, calibration=data.calibration)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for ratio in checked:
        for method in chosen:
            started = time.perf_counter()
            try:
                small = method.compress(model, example, ratio, context)
            except InvalidArgumentError as exc:
                skipped.append({"ratio": ratio, "method": method.name, "reason": str(exc)})
                if on_row is not None:
                    on_row(skipped[-1])
                continue
            seconds = time.perf_counter() - started
            row = {
                "ratio": ratio,
                "method": method.name,
                "data_free": method.data_free,
                "accuracy": round(accuracy(small, *data.test), 2),
                "val_accuracy": round(accuracy(small, *data.val), 2),
                "params": count_parameters(small),
                "seconds": round(seconds, 3),
            }
            results.append(row)
            if on_row is not None:
                on_row(row)
    return {
        "model": arch if arch is not None else type(model).__name__,
        "dataset": dataset,
        "baseline_accuracy": round(accuracy(model, *data.test), 2),
        "baseline_val_accuracy": round(accuracy(model, *data.val), 2),
        "params": count_parameters(model),
        "results": results,
        "skipped": skipped,
    }


#: The files ``write_sweep`` produces in its folder.
OUTPUT_FILES = ("sweep.json", "sweep.csv", "sweep.png")
CSV_COLUMNS = ("ratio", "method", "data_free", "accuracy", "val_accuracy", "params", "seconds")


def sweep_csv(outcome: dict[str, Any]) -> str:
    """The result rows as CSV text, with the unpruned model as a first ``baseline`` row at ratio 0."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    baseline = {
        "ratio": 0.0,
        "method": "baseline",
        "data_free": True,
        "accuracy": outcome["baseline_accuracy"],
        "val_accuracy": outcome["baseline_val_accuracy"],
        "params": outcome["params"],
        "seconds": 0.0,
    }
    writer.writerows([baseline, *outcome["results"]])
    return buffer.getvalue()


def write_sweep(
    outcome: dict[str, Any], out_dir: str | os.PathLike[str], *, force: bool = False
) -> list[Path]:
    """Write ``sweep.json``, ``sweep.csv`` and ``sweep.png`` into ``out_dir`` (created if needed).

    Refuses (``OutputExistsError``) to replace any of them unless ``force``; returns their paths.
    """
    from neuronmerge.lab.plots import plot_sweep

    folder = Path(out_dir)
    paths = [folder / name for name in OUTPUT_FILES]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise OutputExistsError(f"{', '.join(existing)} exist(s); pass --force to replace")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the output folder {folder}: {exc}") from exc
    text = json.dumps(outcome, indent=1) + "\n"
    atomic_write(paths[0], lambda temp: temp.write_text(text))
    table = sweep_csv(outcome)
    atomic_write(paths[1], lambda temp: temp.write_text(table))
    plot_sweep(outcome, paths[2])
    return paths
