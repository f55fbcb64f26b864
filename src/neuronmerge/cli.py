"""The ``neuronmerge`` command line: a thin layer over the library.

argparse rather than typer/click because the documented interface takes several values after one flag
(``--ratios 0.5 0.6 0.7``), which click-based parsers do not support. Results go to stdout (a rich
table, or exactly one JSON object with ``--json``); progress and errors go to stderr. Every error that
neuronmerge raises on purpose becomes one line and its own exit code (see ``errors``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from neuronmerge import __version__  # noqa: I001
from neuronmerge.api import DEFAULT_THRESHOLD, METHODS, Plan, Report, compress
from neuronmerge.api import plan as plan_sites
from neuronmerge.criteria import CRITERIA
from neuronmerge.errors import (
    CheckpointError,
    InvalidArgumentError,
    NeuronMergeError,
    OutputExistsError,
)
from neuronmerge.evaluate import accuracy, count_parameters
from neuronmerge.io import is_exported_program, load, load_checkpoint, read_metadata, save
from neuronmerge.models import available_models, get_spec
from neuronmerge.progress import progress_bar

stdout = Console(highlight=False)
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
    table = Table(title=f"{report.method} ratio {report.ratio} ({report.fidelity} fidelity)")
    for column in ("layer", "channels", "kept", "merged", "dropped"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    for site in report.sites:
        table.add_row(
            site.producer, str(site.channels), str(site.kept), str(site.merged), str(site.dropped)
        )
    for skip in report.skipped:
        table.add_row(f"[dim]{skip.producer}[/dim]", "-", "-", "-", f"[dim]{skip.reason}[/dim]")
    return table


def _warn_trust(args: argparse.Namespace, path: object) -> None:
    if getattr(args, "trust", False) and not args.quiet:
        stderr.print(
            f"[yellow]warning:[/yellow] --trust fully unpickles {path}, which can run arbitrary code; "
            "use it only on files from a source you trust.",
            soft_wrap=True,  # a long path must not split the sentence across lines
        )


def _example_inputs(arch: str | None, input_shape: str | None) -> torch.Tensor:
    if input_shape is not None:
        try:
            shape = tuple(int(part) for part in input_shape.split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise InvalidArgumentError(
                f"--input-shape takes positive sizes like 3,32,32, got {input_shape!r}"
            )
        return torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    if arch is None:
        raise InvalidArgumentError(
            "this model is of no registered architecture: give --input-shape C,H,W"
        )
    return get_spec(arch).example_inputs()


def _compress_folder(args: argparse.Namespace) -> None:
    """A Hugging Face checkpoint folder: every layer's MLP, streamed layer by layer."""
    from neuronmerge.streaming import compress_checkpoint

    report = compress_checkpoint(
        args.checkpoint,
        args.out,
        args.ratio,
        method=args.method,
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
    if args.checkpoint.is_dir():
        _compress_folder(args)
        return
    _warn_trust(args, args.checkpoint)
    model, arch = _load_any(args.checkpoint, args.arch, args.trust)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    example = _example_inputs(arch, args.input_shape)
    result = compress(
        model,
        example,
        args.ratio,
        method=args.method,
        criterion=args.criterion,
        threshold=args.threshold,
        lam=args.lam,
        fidelity=args.fidelity,
        approximate=args.approximate,
    )
    _warn_unmerged(args, result.report)
    description = {"source": str(args.checkpoint), "report": _report_dict(result.report)}
    save(result.model, out, arch=arch, example_inputs=example, description=description, force=args.force)
    if args.json:
        _emit_json({"out": str(out), **_report_dict(result.report)})
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


def _warn_unmerged(args: argparse.Namespace, report: Report) -> None:
    """Say so when no layer was compressed, and point at ``--approximate`` where it would help."""
    if report.sites or args.quiet:
        return
    smooth = sum("approximate=True" in skip.reason for skip in report.skipped)
    hint = f"; {smooth} are followed by non-homogeneous activations (--approximate)" if smooth else ""
    stderr.print(
        f"[yellow]warning:[/yellow] no layer could be compressed (see `neuronmerge plan`){hint}; "
        "the saved model computes the same function",
        soft_wrap=True,
    )


def _load_any(path: str | Path, arch: str | None, trust: bool = False) -> tuple[nn.Module, str | None]:
    """A model from a neuronmerge file, a checkpoint of ``arch``, or (``trust``) a pickled module."""
    meta = read_metadata(path) if Path(path).is_file() else {}
    if meta.get("format") == "neuronmerge":
        return load(path), str(meta["arch"])
    if is_exported_program(path):  # written by compress for a model of no registered architecture
        # Its module refuses .eval() and the like, so the pipeline cannot take it as input.
        raise CheckpointError(
            f"{path} is a torch.export program (compress's output for a model of no registered "
            "architecture): run it with torch.export.load(path).module(); to plan, compress or "
            "export again, start from the original model"
        )
    model = load_checkpoint(path, arch, trust=trust)
    return model, None if arch is None else get_spec(arch).name


def cmd_evaluate(args: argparse.Namespace) -> None:
    model, arch = _load_any(args.path, args.arch)
    if arch is None:
        raise InvalidArgumentError(
            "evaluate needs a registered architecture (--arch) to pick the dataset"
        )
    from neuronmerge.lab.reproduce import test_split

    spec = get_spec(arch)
    images, labels = test_split(spec.dataset, args.data_dir)
    with progress_bar(_show_progress(args), len(images), "evaluating") as advance:
        correct = accuracy(model, images, labels, on_batch=lambda n: advance(steps=n))
    outcome = {
        "model": arch,
        "dataset": spec.dataset,
        "accuracy": round(correct, 2),
        "params": count_parameters(model),
    }
    if args.json:
        _emit_json(outcome)
    else:
        stdout.print(
            f"{arch} on the {spec.dataset} test split: accuracy {outcome['accuracy']:.2f}%, "
            f"{outcome['params']:,} parameters"
        )


def cmd_plan(args: argparse.Namespace) -> None:
    _warn_trust(args, args.path)
    model, arch = _load_any(args.path, args.arch, args.trust)
    options: dict[str, Any] = {
        "method": args.method,
        "criterion": args.criterion,
        "threshold": args.threshold,
        "lam": args.lam,
        "fidelity": args.fidelity,
    }
    if args.ratio is None:
        defaults = {"method": "merge", "criterion": "l1-norm", "threshold": DEFAULT_THRESHOLD}
        defaults |= {"lam": None, "fidelity": "exact"}
        changed = [f"--{name}" for name, value in options.items() if value != defaults[name]]
        if changed:  # silently ignoring them would show a plan the user did not ask for
            raise InvalidArgumentError(f"{', '.join(changed)} take effect only with --ratio")
        options = {}
    found = plan_sites(
        model,
        _example_inputs(arch, args.input_shape),
        args.ratio,
        approximate=args.approximate,
        **options,
    )
    if args.json:
        payload: dict[str, Any] = {
            "model": arch,
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
        # Piped into a file or a pager, lay the table out wide instead of at the default 80 columns.
        wide = Console(highlight=False, width=None if stdout.is_terminal else 150)
        wide.print(_plan_table(found, args.ratio, options))


def _short(count: int) -> str:
    """A count for people: exact below 10,000, else 3 significant digits with k / M / G."""
    if count < 10_000:
        return f"{count:,}"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    raise AssertionError("unreachable")


def _plan_table(found: Plan, ratio: float, options: dict[str, Any]) -> Table:
    """One row per Linear/Conv layer and a total row: what happens to it, what it costs.

    Before -> after in one cell, counts rounded (``--json`` has them exact); only the notes wrap.
    """
    settings = ", ".join(f"{k} {v}" for k, v in options.items() if v is not None)
    caption = "MACs per example"
    if found.output_error is not None:
        caption += f"; approximate: output changed by {found.output_error:.2%} (relative L2)"
    table = Table(title=f"plan: ratio {ratio} ({settings})", caption=caption)
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

    _warn_trust(args, args.path)
    if Path(args.onnx).exists() and not args.force:  # before any slow work
        raise OutputExistsError(f"{args.onnx} exists; pass --force to replace it")
    model, arch = _load_any(args.path, args.arch, args.trust)
    done = export_onnx(model, args.onnx, _example_inputs(arch, args.input_shape), force=args.force)
    outcome = {
        "out": str(done.path),
        "format": "onnx",
        "onnxruntime_max_abs_diff": done.max_abs_diff,
        "batch_checked": done.batch_checked,
    }
    if args.json:
        _emit_json(outcome)
    elif not args.quiet:
        stdout.print(
            f"wrote {done.path} (dynamic batch); onnxruntime matches PyTorch on a batch of "
            f"{done.batch_checked} (max abs difference {done.max_abs_diff:.2g})"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from neuronmerge.lab.reproduce import test_split
    from neuronmerge.lab.training import recipe_for, trained_model

    spec = get_spec(args.arch)
    out = None if args.out is None else Path(args.out)
    if out is not None and out.exists() and not args.force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
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

    from neuronmerge.lab.sweep import (
        fashion_mnist_eval_data,
        resolve_methods,
        sweep,
        write_sweep,
    )

    spec = get_spec(args.arch)
    if spec.dataset != "fashion-mnist":
        raise InvalidArgumentError(
            f"{spec.name} is a {spec.dataset} model; sweeps evaluate on fashion-mnist only here"
        )
    methods = [m.name for m in resolve_methods(args.methods)]  # fail early on a bad name
    if args.checkpoint is not None:
        model, _ = _load_any(args.checkpoint, spec.name)
        source = str(args.checkpoint)
    else:
        from neuronmerge.lab.training import trained_model

        if not args.quiet:
            stderr.print(f"No --checkpoint: training {spec.name} on {spec.dataset} (cached).")
        model, info = trained_model(
            spec.name, seed=args.seed, data_dir=args.data_dir, progress=not args.quiet
        )
        source = f"trained here, seed {info['seed']}, {info['epochs']} epochs"
    data = fashion_mnist_eval_data(args.data_dir)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=stderr, disable=args.quiet) as bar:
        task = bar.add_task("sweep", total=len(args.ratios) * len(methods))

        def show(row: dict[str, Any]) -> None:
            done = f"{row['accuracy']:.2f}%" if "accuracy" in row else "skipped"
            bar.update(task, advance=1, description=f"{row['method']} {row['ratio']:.2f}: {done}")

        outcome = sweep(model, spec.name, data, args.ratios, methods, on_row=show)
    outcome["source"] = source
    paths = write_sweep(outcome, args.out_dir, force=args.force)
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


def _common(parser: argparse.ArgumentParser, *, data: bool = False) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    if data:
        parser.add_argument(
            "--data-dir", default=None, help="folder with the dataset files (default: system path)"
        )


def _trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust",
        action="store_true",
        help="unpickle whole modules (runs code from the file: trusted files only)",
    )
    parser.add_argument(
        "--input-shape", default=None, help="C,H,W of one example, for unregistered models"
    )


def _compression_options(
    parser: argparse.ArgumentParser, methods: tuple[str, ...], method_help: str | None
) -> None:
    """The options of ``compress`` that ``compress`` and ``plan --ratio`` share."""
    parser.add_argument("--method", choices=methods, default="merge", help=method_help)
    parser.add_argument("--criterion", choices=CRITERIA, default="l1-norm")
    parser.add_argument(
        "--threshold",
        type=_threshold,
        default=DEFAULT_THRESHOLD,
        help=f"cosine threshold, or 'none' (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--lam", type=float, default=None, help="lambda (fidelity paper, conv+BN)")
    parser.add_argument("--fidelity", choices=("exact", "paper"), default="exact")


def _approximate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="also merge through GELU, SiLU, tanh... (not exact; the output change is reported)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronmerge",
        description="Shrink trained networks without data or fine-tuning by neuron merging.",
    )
    parser.add_argument("--version", action="version", version=f"neuronmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rep = commands.add_parser("reproduce", help="the paper's prune-vs-merge table on a model")
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
    _common(rep, data=True)
    rep.set_defaults(run=cmd_reproduce)

    com = commands.add_parser("compress", help="merge or prune a checkpoint and save the result")
    com.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, or a Hugging Face folder (streamed)"
    )
    com.add_argument("--arch", default=None, help="registered architecture of the checkpoint")
    com.add_argument("--ratio", type=float, required=True, help="fraction removed per layer")
    _compression_options(
        com,
        tuple(METHODS),
        "merge (the paper), prune, or merge-ls (data-free: synthetic probes; more accurate)",
    )
    com.add_argument(
        "--out", required=True, help="output file (.safetensors; a torch.export .pt2 without --arch)"
    )
    com.add_argument("--force", action="store_true", help="replace an existing output file")
    _approximate(com)
    _common(com)
    _trust(com)
    com.set_defaults(run=cmd_compress)

    ev = commands.add_parser("evaluate", help="test accuracy and parameter count of a model")
    ev.add_argument("path", help="a checkpoint (with --arch) or a file saved by compress")
    ev.add_argument("--arch", default=None)
    _common(ev, data=True)
    ev.set_defaults(run=cmd_evaluate)

    pl = commands.add_parser(
        "plan",
        help="list mergeable and skipped layers, and why; with --ratio, a per-layer table of "
        "channels, parameters and MACs before and after",
    )
    pl.add_argument("path", help="a checkpoint (with --arch) or a file saved by compress")
    pl.add_argument("--arch", default=None)
    pl.add_argument(
        "--ratio", type=float, default=None, help="fraction removed per layer: show its effect"
    )
    _compression_options(pl, ("merge", "prune"), None)
    _approximate(pl)
    _common(pl)
    _trust(pl)
    pl.set_defaults(run=cmd_plan)

    ex = commands.add_parser("export", help="write a model as ONNX, checked with onnxruntime")
    ex.add_argument("path", help="a file saved by compress, or a checkpoint (with --arch)")
    ex.add_argument("--onnx", required=True, metavar="OUT.onnx", help="ONNX file to write")
    ex.add_argument("--arch", default=None, help="registered architecture of a checkpoint")
    ex.add_argument("--force", action="store_true", help="replace an existing output file")
    _common(ex)
    _trust(ex)
    ex.set_defaults(run=cmd_export)

    tr = commands.add_parser(
        "train", help="train a registered Fashion-MNIST architecture here (seeded, cached)"
    )
    tr.add_argument("arch", help="architecture, e.g. vgg-fmnist (see `neuronmerge models`)")
    tr.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: the architecture's recipe)"
    )
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    tr.add_argument("--out", default=None, help="also save the weights here (.safetensors)")
    tr.add_argument("--force", action="store_true", help="replace an existing --out file")
    _common(tr, data=True)
    tr.set_defaults(run=cmd_train)

    from neuronmerge.lab.sweep import DEFAULT_RATIOS, available_methods

    sw = commands.add_parser(
        "sweep", help="accuracy of every method at many ratios: CSV, JSON and a PNG plot"
    )
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
    sw.add_argument("--force", action="store_true", help="replace existing sweep files")
    _common(sw, data=True)
    sw.set_defaults(run=cmd_sweep)

    mo = commands.add_parser("models", help="list the registered architectures")
    _common(mo)
    mo.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except NeuronMergeError as exc:
        # escape: messages quote paths and names like neuronmerge[onnx], which are not markup
        stderr.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
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
