"""The ``neuronmerge`` command line: a thin layer over the library.

argparse rather than typer/click because the documented interface takes several values after one flag
(``--ratios 0.5 0.6 0.7``), which click-based parsers do not support. Results go to stdout (a rich
table, laid out at full width when stdout is not a terminal, or exactly one JSON object with
``--json``); progress, notes, warnings and errors go to stderr, and ``--quiet`` silences all of stderr
but errors. Every error that neuronmerge raises on purpose becomes one line and its own exit code (see
``errors``); with ``--json`` it is also one object ``{"error": ..., "exit_code": ...}`` on stdout.
Options shared by several commands are defined once (``OPTION_GROUPS``), built once into the validated
``Options`` that ``compress`` and ``plan`` hand to the library's own core (the one ``nm.compress`` and
``nm.plan`` run), and every output is checked (name, existence, folder) by ``_check_output`` before
any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table
from torch import nn

from neuronmerge import __version__  # noqa: I001
from neuronmerge.api import DEFAULT_THRESHOLD, METHODS, Plan, Report, _compress, _plan
from neuronmerge.budget import ALLOCATIONS
from neuronmerge.criteria import CRITERIA
from neuronmerge.errors import (
    DatasetNotFoundError,
    InvalidArgumentError,
    NeuronMergeError,
    OutputExistsError,
    OutputWriteError,
)
from neuronmerge.evaluate import accuracy, count_parameters
from neuronmerge.io import (
    is_exported_program,
    load,
    load_checkpoint,
    read_metadata,
    save,
    save_format,
)
from neuronmerge.models import available_models, get_spec
from neuronmerge.notices import CompressionWarning
from neuronmerge.options import Options
from neuronmerge.progress import progress_bar

_PIPE_WIDTH = 10_000  # wider than any table here: lines end where their content ends


class _Stdout(Console):
    """stdout: at the terminal's width in a terminal; piped into a file or another program, as wide
    as its content (tables are not cut at 80 columns, captions not split mid-word)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(_PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


stdout = _Stdout(highlight=False)
stderr = Console(stderr=True, highlight=False)


def _threshold(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _show_progress(args: argparse.Namespace) -> bool:
    """Progress bars (stderr) unless the user asked for silence or for machine-readable output."""
    return not (args.quiet or args.json)


def _emit_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2))


# -- commands -------------------------------------------------------------------------------------


def cmd_reproduce(args: argparse.Namespace) -> None:
    from neuronmerge.lab.reproduce import paper_setup, reproduce

    setup = paper_setup(args.arch)
    if args.checkpoint is not None:
        model = load_checkpoint(args.checkpoint, setup.arch)
        source = str(args.checkpoint)
    else:
        from neuronmerge.lab.training import trained_model

        if not args.quiet:
            stderr.print(f"No --checkpoint: training {setup.arch} on {setup.dataset} (cached).")
        model, info = trained_model(setup.arch, data_dir=args.data_dir, progress=_show_progress(args))
        source = f"trained here ({info['weights']})"

    ratios = setup.ratios if args.ratios is None else args.ratios
    with progress_bar(_show_progress(args), 2 * len(ratios), "prune and merge") as advance:

        def show(row: dict[str, Any]) -> None:
            advance(f"ratio {row['ratio']:.2f} {row['method']:<5} {row['accuracy']:.2f}%")

        outcome = reproduce(model, setup, ratios, data_dir=args.data_dir, on_row=show)
    if args.json:
        _emit_json(outcome)
        return
    paper_column = args.checkpoint is not None
    table = Table(
        title=f"{setup.arch} on {setup.dataset}, test split: prune vs merge",
        caption=f"weights: {source}",
    )
    for column in ("ratio", "method", "accuracy %", "params"):
        table.add_column(column, justify="right")
    if paper_column:
        table.add_column("paper %", justify="right")
    table.add_row(
        "0",
        "baseline",
        f"{outcome['baseline_accuracy']:.2f}",
        str(outcome["params"]),
        *([f"{setup.baseline:.2f}"] if paper_column else []),
    )
    for row in outcome["results"]:
        reported = setup.reported.get((row["ratio"], row["method"]))
        extra = [f"{reported:.2f}" if reported is not None else "-"] if paper_column else []
        table.add_row(
            f"{row['ratio']:.2f}", row["method"], f"{row['accuracy']:.2f}", str(row["params"]), *extra
        )
    stdout.print(table)


def _report_dict(report: Report) -> dict[str, Any]:
    return dataclasses.asdict(report)


def _report_table(report: Report) -> Table:
    title = f"{report.method} {_budget_label(report.ratio, vars(report))} ({report.fidelity} fidelity)"
    table = Table(title=title)
    table.add_column("layer", no_wrap=True)
    for column in ("channels", "kept", "merged", "dropped"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("note")
    for site in report.sites:
        counts = (site.channels, site.kept, site.merged, site.dropped)
        table.add_row(escape(site.producer), *map(str, counts), "compressed")
    for skip in report.skipped:
        dim = "-", "-", "-", "-"
        table.add_row(escape(skip.producer), *dim, escape(f"skipped: {skip.reason}"), style="dim")
    return table


def _warn_trust(args: argparse.Namespace, path: object) -> None:
    if getattr(args, "trust", False) and not args.quiet:
        stderr.print(
            f"[yellow]warning:[/yellow] --trust fully unpickles {path}, which can run arbitrary code; "
            "use it only on files from a source you trust.",
            soft_wrap=True,  # a long path must not split the sentence across lines
        )


def _check_output(
    path: str | Path,
    force: bool,
    named: Callable[[Path], object] | None = None,
    *,
    folder_made: bool = False,
) -> Path:
    """The one check of every output, before any work: its name (``named`` raises when the name
    does not say what the command writes), no existing file unless ``--force``, and a folder to
    write into (unless the command makes it: ``folder_made``)."""
    out = Path(path)
    if named is not None:
        named(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if not folder_made and not out.parent.is_dir():
        raise OutputWriteError(f"cannot write {out}: folder {out.parent} does not exist")
    return out


def _suffix(suffix: str, what: str) -> Callable[[Path], None]:
    """A name check for ``_check_output``: the file must end in ``suffix``."""

    def check(path: Path) -> None:
        if path.suffix.lower() != suffix:
            raise InvalidArgumentError(f"{path}: {what} is written as {suffix}; name the file *{suffix}")

    return check


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """A model read by a command, and what the file said about it."""

    model: nn.Module
    #: The registered architecture (for its dataset and example inputs), if known.
    arch: str | None
    #: Whether the model is an instance of ``arch`` (then it can be saved as .safetensors).
    rebuildable: bool
    #: Per-example input shapes recorded in a .pt2 archive, if any.
    input_shapes: tuple[tuple[int, ...], ...] | None = None


def _load_any(args: argparse.Namespace, path: str | Path) -> _Loaded:
    """A model from any file ``compress`` writes (.safetensors, .pt2), a checkpoint of ``--arch``, or
    (``--trust``) a pickled module."""
    arch, trust = args.arch, getattr(args, "trust", False)
    meta = read_metadata(path) if Path(path).is_file() else {}
    if meta.get("format") == "neuronmerge":
        return _Loaded(load(path), str(meta["arch"]), rebuildable=True)
    if is_exported_program(path):  # a torch.export archive, as compress writes .pt2
        shapes = meta.get("input_shapes")
        return _Loaded(
            load(path),
            meta.get("arch") or arch,
            rebuildable=False,
            input_shapes=None if shapes is None else tuple(tuple(s) for s in shapes),
        )
    _warn_trust(args, path)
    model = load_checkpoint(path, arch, trust=trust)
    return _Loaded(model, None if arch is None else get_spec(arch).name, rebuildable=arch is not None)


def _example_inputs(loaded: _Loaded, input_shape: str | None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    if input_shape is not None:
        try:
            shape = tuple(int(part) for part in input_shape.split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise InvalidArgumentError(
                f"--input-shape takes positive sizes like 3,32,32, got {input_shape!r}"
            )
        return torch.randn((2, *shape), generator=generator)
    if loaded.input_shapes is not None:
        inputs = tuple(torch.randn((2, *shape), generator=generator) for shape in loaded.input_shapes)
        return inputs[0] if len(inputs) == 1 else inputs
    if loaded.arch is None:
        raise InvalidArgumentError(
            "this model is of no registered architecture: give --input-shape C,H,W"
        )
    return get_spec(loaded.arch).example_inputs()


def _compress_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``compress``/``plan`` settings given on the command line (``OPTION_GROUPS``), as shown in
    tables and JSON; ``_options`` turns them into the validated ``Options``."""
    return {
        "method": args.method,
        "criterion": args.criterion,
        "threshold": args.threshold,
        "lam": args.lam,
        "fidelity": args.fidelity,
        **_budget(args),
    }


def _options(args: argparse.Namespace, settings: dict[str, Any]) -> Options:
    """The one validated ``Options`` of a command (``Options.of`` raises on a bad value), which the
    command hands to the same core as ``nm.compress``/``nm.plan``."""
    return Options.of(approximate=args.approximate, **settings)


#: The keyword arguments of ``compress``/``plan`` that set a budget rather than a method.
BUDGET_OPTIONS = ("target_params", "target_macs", "ratios", "round_to", "allocation")


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    """The budget options given on the command line, as ``compress`` takes them."""
    return {
        "target_params": args.target_params,
        "target_macs": args.target_macs,
        "ratios": dict(args.ratios) if args.ratios else None,
        "round_to": args.round_to,
        "allocation": args.allocation,
    }


def _budget_given(args: argparse.Namespace) -> bool:
    """Whether widths are set by a target or per-layer ratios (then ``--ratio`` may be left out)."""
    return args.target_params is not None or args.target_macs is not None or bool(args.ratios)


def _budget_label(ratio: float | None, settings: dict[str, Any]) -> str:
    """``ratio R``, or the target and how widths were chosen, for a table title."""
    for name, what in (("target_params", "parameters"), ("target_macs", "MACs")):
        amount = settings.get(name)
        if amount is not None:
            share = f"{amount:.0%}" if isinstance(amount, float) else f"{amount:,}"
            return f"{share} of the {what} ({settings['allocation']} allocation)"
    asked = settings.get("ratios")
    if asked:
        pairs = asked.items() if isinstance(asked, dict) else asked
        label = "ratios " + ", ".join(f"{glob} {value:g}" for glob, value in pairs)
        return label if ratio is None else f"{label}, ratio {ratio:g} elsewhere"
    return f"ratio {ratio if ratio is not None else 0.5}"


def _fraction_or_count(text: str) -> float | int:
    """``0.5`` (a fraction kept) or ``50000`` (a count)."""
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction like 0.5 or a count, got {text!r}"
        ) from None


def _glob_ratio(text: str) -> tuple[str, float]:
    """``layer_glob=ratio``."""
    glob, sep, value = text.rpartition("=")
    try:
        ratio = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected GLOB=RATIO like 'features.*=0.3', got {text!r}"
        ) from None
    if not sep or not glob:
        raise argparse.ArgumentTypeError(f"expected GLOB=RATIO like 'features.*=0.3', got {text!r}")
    return glob, ratio


def _print_warnings(args: argparse.Namespace, caught: list[warnings.WarningMessage]) -> list[str]:
    """Print each ``CompressionWarning`` as a ``warning:`` line on stderr (unless ``--quiet``) and
    return their messages for the JSON output."""
    messages = [str(w.message) for w in caught if issubclass(w.category, CompressionWarning)]
    if not args.quiet:
        for message in messages:
            stderr.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)
    return messages


def _compress_folder(args: argparse.Namespace) -> None:
    """A Hugging Face checkpoint folder: every layer's MLP, streamed layer by layer."""
    from neuronmerge.streaming import compress_checkpoint

    report = compress_checkpoint(
        args.checkpoint,
        args.out,
        args.ratio,
        method=args.method,
        target_params=args.target_params,
        round_to=args.round_to,
        criterion=args.criterion,
        threshold=args.threshold,
        approximate=args.approximate,
    )
    summary = {
        "out": str(report.out_dir),
        "width_before": report.width_before,
        "width_after": report.width_after,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "layers": len(report.layers),
    }
    if args.json:
        _emit_json(summary)
        return
    stdout.print(
        f"{summary['layers']} layers, MLP width {report.width_before} -> {report.width_after}, "
        f"{report.bytes_before:,} -> {report.bytes_after:,} bytes; saved to {report.out_dir}"
    )


def cmd_compress(args: argparse.Namespace) -> None:
    if args.ratio is None and not _budget_given(args):
        raise InvalidArgumentError(
            "compress needs --ratio R (the fraction removed per layer), --target-params, "
            "--target-macs or --ratios"
        )
    if args.checkpoint.is_dir():  # a Hugging Face folder in, a new folder out (checked first there)
        if args.target_macs is not None or args.ratios:
            raise InvalidArgumentError(
                "a Hugging Face checkpoint folder keeps one MLP width in every layer: give --ratio "
                "or --target-params (and --round-to); --target-macs and --ratios need a model file"
            )
        _compress_folder(args)
        return
    loaded = _load_any(args, args.checkpoint)
    save_arch = loaded.arch if loaded.rebuildable else None
    out = _check_output(args.out, args.force, lambda path: save_format(path, save_arch))
    example = _example_inputs(loaded, args.input_shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        result = _compress(loaded.model, example, args.ratio, _options(args, _compress_settings(args)))
    notes = _print_warnings(args, caught)
    description = {"source": str(args.checkpoint), "report": _report_dict(result.report)}
    save(
        result.model,
        out,
        arch=save_arch,
        example_inputs=example,
        description=description,
        force=args.force,
    )
    if args.json:
        _emit_json({"out": str(out), **_report_dict(result.report), "warnings": notes})
        return
    stdout.print(_report_table(result.report))
    report = result.report
    stdout.print(
        f"parameters {report.params_before:,} -> {report.params_after:,} "
        f"({report.params_after / report.params_before:.1%}); saved to {out}"
    )
    if report.output_error is not None:
        stdout.print(
            f"approximate: output changed by {report.output_error:.2%} (relative L2) "
            "on the example inputs"
        )


def _datasets() -> list[str]:
    return sorted({get_spec(name).dataset for name in available_models()})


def cmd_evaluate(args: argparse.Namespace) -> None:
    loaded = _load_any(args, args.path)
    dataset = args.dataset or (None if loaded.arch is None else get_spec(loaded.arch).dataset)
    if dataset is None:
        raise InvalidArgumentError(
            f"{args.path} is of no registered architecture: give --dataset NAME to evaluate it "
            f"({', '.join(_datasets())})"
        )
    from neuronmerge.lab.reproduce import test_split

    name = loaded.arch or Path(args.path).name
    params = count_parameters(loaded.model)
    try:
        images, labels = test_split(dataset, args.data_dir)
    except DatasetNotFoundError as exc:  # the parameter count is still worth having
        exc.partial = {"model": name, "dataset": dataset, "params": params}
        if not args.json:
            stdout.print(
                f"{name}: {params:,} parameters (accuracy not measured: no {dataset} test data)"
            )
        raise
    with progress_bar(_show_progress(args), len(images), "evaluating") as advance:
        correct = accuracy(loaded.model, images, labels, on_batch=lambda n: advance(steps=n))
    outcome = {"model": name, "dataset": dataset, "accuracy": round(correct, 2), "params": params}
    if args.json:
        _emit_json(outcome)
    else:
        stdout.print(
            f"{name} on the {dataset} test split: accuracy {outcome['accuracy']:.2f}%, "
            f"{outcome['params']:,} parameters"
        )


def cmd_plan(args: argparse.Namespace) -> None:
    loaded = _load_any(args, args.path)
    options = _compress_settings(args)
    if args.ratio is None and not _budget_given(args):
        defaults = {
            action.dest: action.default
            for action in _group("compression")._actions
            if action.dest in options
        }
        changed = [
            f"--{name.replace('_', '-')}" for name, value in options.items() if value != defaults[name]
        ]
        if changed:  # silently ignoring them would show a plan the user did not ask for
            raise InvalidArgumentError(
                f"{', '.join(changed)} take effect only with --ratio or a budget "
                "(--target-params, --target-macs, --ratios)"
            )
        options = {}
    found = _plan(
        loaded.model,
        _example_inputs(loaded, args.input_shape),
        args.ratio,
        _options(args, options),
    )
    if args.json:
        payload: dict[str, Any] = {
            "model": loaded.arch,
            "sites": [dataclasses.asdict(site) for site in found.sites],
            "skipped": [dataclasses.asdict(skip) for skip in found.skipped],
        }
        if found.totals is not None:
            payload["settings"] = {"ratio": args.ratio, **options, "approximate": args.approximate}
            payload["layers"] = [dataclasses.asdict(row) for row in found.layers]
            payload["totals"] = dataclasses.asdict(found.totals)
            payload["output_error"] = found.output_error
        _emit_json(payload)
    elif found.totals is None:
        stdout.print(escape(str(found)))
    else:
        stdout.print(_plan_table(found, _budget_label(args.ratio, options), options))


def _short(count: int) -> str:
    """A count for people: exact below 10,000, else 3 significant digits with k / M / G."""
    if count < 10_000:
        return f"{count:,}"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    raise AssertionError("unreachable")


def _plan_table(found: Plan, budget: str, options: dict[str, Any]) -> Table:
    """One row per Linear/Conv layer and a total row: what happens to it, what it costs.

    Before -> after in one cell, counts rounded (``--json`` has them exact); only the notes wrap.
    """
    settings = ", ".join(
        f"{k} {v}" for k, v in options.items() if v is not None and k not in BUDGET_OPTIONS
    )
    caption = "MACs per example"
    if found.output_error is not None:
        caption += f"; approximate: output changed by {found.output_error:.2%} (relative L2)"
    table = Table(title=f"plan: {budget} ({settings})", caption=caption)
    table.add_column("layer", no_wrap=True)
    for column in ("channels", "merged", "dropped", "params", "MACs"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("note")

    def change(before: int, after: int | None) -> str:
        if after is None or after == before:
            return _short(before)
        return f"{_short(before)} -> {_short(after)}"

    for row in found.layers:
        skipped = row.action == "skip"
        table.add_row(
            escape(row.layer),
            change(row.channels, row.kept),
            "-" if row.merged is None else str(row.merged),
            "-" if row.dropped is None else str(row.dropped),
            change(row.params_before, row.params_after),
            change(row.macs_before, row.macs_after),
            escape(f"skipped: {row.reason}" if skipped else row.action),
            style="dim" if skipped else None,
        )
    totals = found.totals
    assert totals is not None
    table.add_section()
    table.add_row(
        "whole model",
        "",
        "",
        "",
        change(totals.params_before, totals.params_after),
        change(totals.macs_before, totals.macs_after),
        f"{totals.params_after / max(totals.params_before, 1):.0%} of the parameters",
        style="bold",
    )
    return table


def cmd_export(args: argparse.Namespace) -> None:
    from neuronmerge.export import export_onnx  # imports the exporter only when asked for

    out = _check_output(args.onnx, args.force, _suffix(".onnx", "an ONNX model"))
    loaded = _load_any(args, args.path)
    done = export_onnx(loaded.model, out, _example_inputs(loaded, args.input_shape), force=args.force)
    outcome = {
        "out": str(done.path),
        "format": "onnx",
        "onnxruntime_max_abs_diff": done.max_abs_diff,
        "batch_checked": done.batch_checked,
    }
    if args.json:
        _emit_json(outcome)
    else:
        stdout.print(
            f"wrote {done.path} (dynamic batch); onnxruntime matches PyTorch on a batch of "
            f"{done.batch_checked} (max abs difference {done.max_abs_diff:.2g})"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from neuronmerge.lab.reproduce import test_split
    from neuronmerge.lab.training import recipe_for, trained_model

    spec = get_spec(args.arch)
    out = None
    if args.out is not None:
        out = _check_output(args.out, args.force, lambda path: save_format(path, spec.name))
    epochs = recipe_for(spec.name).epochs if args.epochs is None else args.epochs
    if not args.quiet:
        stderr.print(f"{spec.name}: {epochs} epoch(s), seed {args.seed} (cached once trained)")
    model, info = trained_model(
        spec.name, seed=args.seed, epochs=epochs, data_dir=args.data_dir, progress=not args.quiet
    )
    images, labels = test_split(spec.dataset, args.data_dir)
    outcome = {
        "model": spec.name,
        "dataset": spec.dataset,
        "seed": info["seed"],
        "epochs": info["epochs"],
        "val_accuracy": round(info["val_accuracy"], 2),
        "test_accuracy": round(accuracy(model, images, labels), 2),
        "params": count_parameters(model),
        "train_seconds": info["train_seconds"],
        "cached": info["cached"],
        "weights": info["weights"],
        "out": None,
    }
    if out is not None:
        description = {"source": info["weights"], "trained": {k: outcome[k] for k in ("seed", "epochs")}}
        save(model, out, arch=spec.name, description=description, force=args.force)
        outcome["out"] = str(out)
    if args.json:
        _emit_json(outcome)
        return
    how = "from the cache" if info["cached"] else f"trained in {info['train_seconds']:.0f} s"
    stdout.print(
        f"{spec.name} ({outcome['params']:,} parameters, {how}): validation accuracy "
        f"{outcome['val_accuracy']:.2f}%, test accuracy {outcome['test_accuracy']:.2f}%"
    )
    stdout.print(f"weights: {outcome['out'] or outcome['weights']}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from neuronmerge.lab import sweep as sweeps

    spec = get_spec(args.arch)
    if spec.dataset != "fashion-mnist":
        raise InvalidArgumentError(
            f"{spec.name} is a {spec.dataset} model; sweeps evaluate on fashion-mnist only here"
        )
    methods = [m.name for m in sweeps.resolve_methods(args.methods)]  # fail early on a bad name
    for name in sweeps.OUTPUT_FILES:  # before training, loading or sweeping
        _check_output(Path(args.out_dir) / name, args.force, folder_made=True)
    if args.checkpoint is not None:
        args.arch = spec.name
        model = _load_any(args, args.checkpoint).model
        source = str(args.checkpoint)
    else:
        from neuronmerge.lab.training import trained_model

        if not args.quiet:
            stderr.print(f"No --checkpoint: training {spec.name} on {spec.dataset} (cached).")
        model, info = trained_model(
            spec.name, seed=args.seed, data_dir=args.data_dir, progress=not args.quiet
        )
        source = f"trained here, seed {info['seed']}, {info['epochs']} epochs"
    data = sweeps.fashion_mnist_eval_data(args.data_dir)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=stderr, disable=args.quiet) as bar:
        task = bar.add_task("sweep", total=len(args.ratios) * len(methods))

        def show(row: dict[str, Any]) -> None:
            done = f"{row['accuracy']:.2f}%" if "accuracy" in row else "skipped"
            bar.update(task, advance=1, description=f"{row['method']} {row['ratio']:.2f}: {done}")

        outcome = sweeps.sweep(model, spec.name, data, args.ratios, methods, on_row=show)
    outcome["source"] = source
    paths = sweeps.write_sweep(outcome, args.out_dir, force=args.force)
    if args.json:
        _emit_json(outcome)
        return
    table = Table(
        title=f"{spec.name} on {spec.dataset}, test accuracy % (no fine-tuning)",
        caption=f"weights: {source}; baseline {outcome['baseline_accuracy']:.2f}%",
    )
    table.add_column("ratio", justify="right")
    for name in methods:
        table.add_column(name, justify="right")
    cells = {(row["ratio"], row["method"]): row for row in outcome["results"]}
    for ratio in dict.fromkeys(row["ratio"] for row in outcome["results"]):
        table.add_row(
            f"{ratio:.2f}",
            *(f"{cells[ratio, m]['accuracy']:.2f}" if (ratio, m) in cells else "-" for m in methods),
        )
    stdout.print(table)
    stdout.print("wrote " + ", ".join(str(path) for path in paths))


def cmd_models(args: argparse.Namespace) -> None:
    rows = [
        {"name": name, "dataset": get_spec(name).dataset, "description": get_spec(name).description}
        for name in available_models()
    ]
    if args.json:
        _emit_json(rows)
        return
    table = Table(title="registered architectures")
    for column in ("name", "dataset", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["dataset"], row["description"])
    stdout.print(table)


# -- parser ---------------------------------------------------------------------------------------


class _UsageError(InvalidArgumentError):
    """A command line argparse cannot parse (exit 2, like argparse's own)."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (to be reported like any other error, as JSON too)
    instead of printed and exited on."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.format_usage())


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (on failure too)"
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="nothing on stderr but errors (no progress, notes or warnings); results still print",
    )


def _model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch", default=None, help="registered architecture of a checkpoint (see `models`)"
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="unpickle whole modules (runs code from the file: trusted files only)",
    )


def _tracing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        default=None,
        help="C,H,W of one example, for a model of no registered architecture",
    )


def _compression(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ratio", type=float, default=None, help="fraction of neurons removed per layer"
    )
    parser.add_argument(
        "--method",
        choices=tuple(METHODS),
        default="merge",
        help="merge (the paper), prune, or merge-ls (data-free: synthetic probes; more accurate)",
    )
    parser.add_argument("--criterion", choices=CRITERIA, default="l1-norm")
    parser.add_argument(
        "--threshold",
        type=_threshold,
        default=DEFAULT_THRESHOLD,
        help=f"cosine threshold, or 'none' (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--lam", type=float, default=None, help="lambda (fidelity paper, conv+BN)")
    parser.add_argument("--fidelity", choices=("exact", "paper"), default="exact")
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="also merge through GELU, SiLU, tanh... (not exact; the output change is reported)",
    )
    parser.add_argument(
        "--target-params",
        type=_fraction_or_count,
        default=None,
        help="parameters to keep: a fraction (0.5) or a count; widths chosen per layer",
    )
    parser.add_argument(
        "--target-macs",
        type=_fraction_or_count,
        default=None,
        help="MACs per example to keep: a fraction or a count",
    )
    parser.add_argument(
        "--ratios",
        type=_glob_ratio,
        nargs="+",
        default=None,
        metavar="GLOB=R",
        help="fraction removed from the layers matching GLOB (first match wins)",
    )
    parser.add_argument(
        "--round-to", type=int, default=None, help="keep widths multiples of N (or whole)"
    )
    parser.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="error",
        help="how a target's widths are chosen: by merge error (default) or uniform",
    )


def _writes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace existing output files")


def _data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default=None, help="folder with the dataset files (default: system path)"
    )


#: The options shared by several commands, each defined once; a command lists the groups it takes
#: (``COMMANDS``), so an option added to a group reaches every command that has the group.
OPTION_GROUPS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "output": _output,
    "model": _model_source,
    "tracing": _tracing,
    "compression": _compression,
    "writes": _writes,
    "data": _data,
}

#: Each command: its help line and its option groups (its own arguments are added in build_parser).
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "reproduce": ("the paper's prune-vs-merge table on a model", ("data", "output")),
    "compress": (
        "merge or prune a model and save the result",
        ("model", "tracing", "compression", "writes", "output"),
    ),
    "evaluate": ("test accuracy and parameter count of a model", ("model", "data", "output")),
    "plan": (
        "list mergeable and skipped layers, and why; with --ratio, a per-layer table of "
        "channels, parameters and MACs before and after",
        ("model", "tracing", "compression", "output"),
    ),
    "export": (
        "write a model as ONNX, checked with onnxruntime",
        ("model", "tracing", "writes", "output"),
    ),
    "train": (
        "train a registered Fashion-MNIST architecture here (seeded, cached)",
        ("writes", "data", "output"),
    ),
    "sweep": (
        "accuracy of every method at many ratios: CSV, JSON and a PNG plot",
        ("writes", "data", "output"),
    ),
    "models": ("list the registered architectures", ("output",)),
}


def _group(name: str) -> _Parser:
    """The parent parser of option group ``name``."""
    parent = _Parser(add_help=False)
    OPTION_GROUPS[name](parent)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="neuronmerge",
        description="Shrink trained networks without data or fine-tuning by neuron merging.",
    )
    parser.add_argument("--version", action="version", version=f"neuronmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = {
        name: commands.add_parser(name, help=text, parents=[_group(g) for g in groups])
        for name, (text, groups) in COMMANDS.items()
    }

    rep = sub["reproduce"]
    rep.add_argument("arch", help="architecture, e.g. lenet-300-100")
    rep.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="weights to use (default: train the model here, cached)",
    )
    rep.add_argument(
        "--ratios", type=float, nargs="+", default=None, help="pruning ratios (default: the paper's)"
    )
    rep.set_defaults(run=cmd_reproduce)

    com = sub["compress"]
    com.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint (with --arch), a file compress wrote, or a Hugging Face folder (streamed)",
    )
    com.add_argument(
        "--out",
        required=True,
        help="output file: .safetensors (weights + description; registered architectures) or "
        ".pt2 (a torch.export program; any model); a new folder for a Hugging Face folder",
    )
    com.set_defaults(run=cmd_compress)

    ev = sub["evaluate"]
    ev.add_argument("path", help="a checkpoint (with --arch) or a file saved by compress")
    ev.add_argument(
        "--dataset",
        default=None,
        choices=_datasets(),
        help="test set to use (default: the architecture's)",
    )
    ev.set_defaults(run=cmd_evaluate)

    pl = sub["plan"]
    pl.add_argument("path", help="a checkpoint (with --arch) or a file saved by compress")
    pl.set_defaults(run=cmd_plan)

    ex = sub["export"]
    ex.add_argument("path", help="a file saved by compress, or a checkpoint (with --arch)")
    ex.add_argument("--onnx", required=True, metavar="OUT.onnx", help="ONNX file to write")
    ex.set_defaults(run=cmd_export)

    tr = sub["train"]
    tr.add_argument("arch", help="architecture, e.g. vgg-fmnist (see `neuronmerge models`)")
    tr.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: the architecture's recipe)"
    )
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    tr.add_argument("--out", default=None, help="also save the weights here (.safetensors)")
    tr.set_defaults(run=cmd_train)

    from neuronmerge.lab.sweep import DEFAULT_RATIOS, available_methods

    sw = sub["sweep"]
    sw.add_argument("arch", help="a Fashion-MNIST architecture, e.g. vgg-fmnist")
    sw.add_argument("--checkpoint", default=None, help="weights to use (default: train here, cached)")
    sw.add_argument("--seed", type=int, default=0, help="training seed when there is no checkpoint")
    sw.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=list(DEFAULT_RATIOS),
        help="pruning ratios (default: 0.1 ... 0.9 and 0.95)",
    )
    sw.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        help=f"methods to run, or all (default): {', '.join(available_methods())}",
    )
    sw.add_argument("--out-dir", required=True, help="folder for sweep.json, sweep.csv, sweep.png")
    sw.set_defaults(run=cmd_sweep)

    sub["models"].set_defaults(run=cmd_models)
    return parser


def _report_error(exc: NeuronMergeError, as_json: bool) -> int:
    """One line on stderr; with ``--json`` also one object on stdout. Returns the exit code."""
    if isinstance(exc, _UsageError):
        stderr.print(escape(exc.usage.rstrip()), soft_wrap=True)
    # escape: messages quote paths and names like neuronmerge[onnx], which are not markup
    stderr.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
    if as_json:
        _emit_json({"error": str(exc), "exit_code": exc.exit_code, **exc.partial})
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except NeuronMergeError as exc:
        return _report_error(exc, "--json" in argv)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (`neuronmerge ... | head`): not an error of ours
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
