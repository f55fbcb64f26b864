"""How much of a real architecture can neuronmerge shrink, against Torch-Pruning on the same model?

Run from the repository root, in the zoo venv (torchvision imports only beside torch 2.14.1;
``make test-zoo`` builds it)::

    .venv-zoo/bin/python benchmarks/reach.py [--models NAME ...] [--json PATH]
    .venv-zoo/bin/python benchmarks/reach.py --markdown benchmarks/results/reach.json

(the second prints the README's table from a results file, and needs no torchvision).

For each torchvision architecture (random weights, seeded; an input as small as the model allows) it
measures, in one run, the fraction of parameters removed at ratio 0.5 with the output layer (the last
Linear/Conv the forward calls) left alone:

* ``neuronmerge``: the best of four public ``neuronmerge.compress`` calls, ``method="merge"`` and
  ``method="prune"``, each with ``approximate=False`` and ``True``; every variant's own numbers are
  kept. Each variant also checks that the compressed model runs with the output shape of the original
  and that the caller's model is bit-identical afterwards (``state_dict`` compared tensor by tensor).
* ``torch_pruning``: Torch-Pruning's ``MagnitudePruner`` (l1 magnitude, ``pruning_ratio=0.5`` on every
  layer it can reach, the output layer in ``ignored_layers``) on a deep copy of the same model
  instance, as it ships: no per-model configuration. Where it raises, or its result fails to run or
  changes the output shape, the row says how.
* ``skip_reasons``: ``neuronmerge.plan``'s refusals (with and without ``approximate``), counted by
  reason with layer names stripped; what the engine still misses on this architecture.
  ``unlisted``: Linear/Conv modules that ``plan(approximate=True)`` names neither in a group (as a
  producer, or as a per-channel tensor of one: a depthwise conv) nor as skipped (weights read by a
  functional call, such as Swin's attention projections). ``group_kinds``:
  the groups ``plan(approximate=True)`` finds, counted by pattern and mode.

``reach`` is neuronmerge's fraction over Torch-Pruning's (the issue's target: >= 1 on every row).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

RATIO = 0.5
DEFAULT_JSON = Path(__file__).parent / "results" / "reach.json"
#: Torch-Pruning's dependency graph can recurse for a very long time (its own torchvision example
#: lists swin and shufflenet as "stuck"); past this the row records a time-out.
TORCH_PRUNING_TIMEOUT_S = 300

#: name -> (input side, constructor keyword arguments). Inputs are as small as each model accepts
#: (its pooling chain, or ViT's fixed 224); the fraction of parameters does not depend on it.
MODELS: dict[str, tuple[int, dict[str, Any]]] = {
    "alexnet": (64, {}),
    "vgg16_bn": (32, {}),
    "googlenet": (64, {"aux_logits": False, "init_weights": True}),
    "inception_v3": (80, {"aux_logits": False, "init_weights": True}),
    "resnet18": (32, {}),
    "resnet50": (32, {}),
    "resnext50_32x4d": (32, {}),
    "densenet121": (32, {}),
    "mobilenet_v2": (32, {}),
    "mobilenet_v3_small": (32, {}),
    "efficientnet_b0": (32, {}),
    "shufflenet_v2_x1_0": (32, {}),
    "mnasnet0_5": (32, {}),
    "regnet_y_400mf": (32, {}),
    "convnext_tiny": (32, {}),
    "vit_b_16": (224, {}),
    "swin_t": (32, {}),
}

#: The neuronmerge variants whose best result is the row's number: (method, approximate).
VARIANTS: dict[str, tuple[str, bool]] = {
    "merge": ("merge", False),
    "merge-approximate": ("merge", True),
    "prune": ("prune", False),
    "prune-approximate": ("prune", True),
}


def build(name: str) -> tuple[Any, Any]:
    """The seeded random-weight model (eval mode) and its example input."""
    import torch
    import torchvision

    side, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    generator = torch.Generator().manual_seed(1)
    return model, torch.randn(1, 3, side, side, generator=generator)


def output_layer(model: Any, x: Any) -> str:
    """The name of the last Linear/Conv the forward calls: the layer whose outputs are the logits."""
    import torch
    from torch import nn

    called: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return called[-1]


def producers(model: Any) -> list[str]:
    """Every Linear/Conv module of ``model``, by name."""
    from torch import nn

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]


def snapshot(model: Any) -> dict[str, Any]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def untouched(model: Any, before: dict[str, Any]) -> bool:
    """Whether ``model``'s state is bit-identical to ``before`` (same keys, dtypes, values)."""
    import torch

    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before
    )


def params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def shape_of(output: Any) -> list[int]:
    return list(output.shape)


def short(exc: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


_DOTTED = re.compile(r"\b[A-Za-z_][\w-]*(?:\.[\w-]+)+")
_NUMBERED = re.compile(r"\b([A-Za-z_][A-Za-z_]*?)_\d+\b")
_SHAPE = re.compile(r"\([\d, ]+\)")
_COUNT = re.compile(r"(groups=)\d+")


def reason_kind(reason: str) -> str:
    """A refusal with its layer names, node names and sizes stripped, so equal reasons count
    together."""
    reason = _DOTTED.sub("<layer>", reason)
    reason = _SHAPE.sub("(...)", _NUMBERED.sub(r"\1", reason))
    return _COUNT.sub(r"\1N", reason)


def run_neuronmerge(model: Any, x: Any, output: str, expected: list[int]) -> dict[str, Any]:
    import torch

    import neuronmerge as nm

    before = snapshot(model)
    variants: dict[str, Any] = {}
    for label, (method, approximate) in VARIANTS.items():
        row: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            result = nm.compress(
                model, x, RATIO, method=method, approximate=approximate, exclude=[output]
            )
        except Exception as exc:
            row["error"] = short(exc)
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
        else:
            report = result.report
            with torch.no_grad():
                produced = result.model(x)
            row.update(
                params_after=report.params_after,
                fraction=1 - report.params_after / report.params_before,
                groups=len(report.sites),
                skipped=len(report.skipped),
                output_shape_kept=shape_of(produced) == expected,
                output_error=report.output_error,
            )
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["input_untouched"] = untouched(model, before)
        variants[label] = row
    scored = {k: v["fraction"] for k, v in variants.items() if "fraction" in v}
    best = max(scored, key=lambda k: scored[k]) if scored else None
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    unlisted: list[str] = []
    kinds: Counter[str] = Counter()
    for approximate in (False, True):
        try:
            found = nm.plan(model, x, approximate=approximate)
        except Exception as exc:
            reasons[f"plan failed: {short(exc)}"] += 1
            continue
        if approximate:
            # A group may have several producers (a residual stream, a gated pair).
            named = {p for g in found.sites for p in getattr(g, "producers", (g.producer,))}
            # Depthwise convs inside a group are per-channel tensors of it, not unlisted layers.
            named |= {p.owner for g in found.sites for p in getattr(g, "params", ())}
            named |= {s.producer for s in found.skipped}
            unlisted = [name for name in producers(model) if name not in named]
            kinds = Counter(
                f"{getattr(g, 'pattern', 'chain')}/{getattr(g, 'mode', 'exact')}" for g in found.sites
            )
        for skip in found.skipped:
            if skip.producer == output:
                continue
            key = f"{'approximate: ' if approximate else ''}{reason_kind(skip.reason)}"
            reasons[key] += 1
            examples.setdefault(key, f"{skip.producer}: {skip.reason}")
    return {
        "best": best,
        "fraction": scored[best] if best else None,
        "variants": variants,
        "skip_reasons": dict(reasons.most_common()),
        "skip_examples": examples,
        "unlisted": unlisted,
        "group_kinds": dict(kinds.most_common()),
    }


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def run_torch_pruning(model: Any, x: Any, output: str, expected: list[int]) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    from torchvision.models import VisionTransformer

    before = snapshot(model)
    pruned = copy.deepcopy(model).eval()
    row: dict[str, Any] = {}
    options: dict[str, Any] = {}
    vit = isinstance(pruned, VisionTransformer)
    if vit:
        # As Torch-Pruning's own torchvision example does: whole heads' worth of channels, and the
        # model's hidden_dim attribute (read by its forward) set to the pruned width afterwards.
        options["round_to"] = pruned.encoder.layers[0].num_heads
        row["configured"] = "round_to=num_heads, hidden_dim reset after step (as its example does)"
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TORCH_PRUNING_TIMEOUT_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on unwrapped parameters and recursion depth
            pruner = tp.pruner.MagnitudePruner(
                pruned,
                x,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=RATIO,
                ignored_layers=[pruned.get_submodule(output)],
                **options,
            )
            pruner.step()
            if vit:
                pruned.hidden_dim = pruned.conv_proj.out_channels
    except _Timeout:
        row["error"] = f"pruning did not finish within {TORCH_PRUNING_TIMEOUT_S} s"
    except Exception as exc:
        row["error"] = f"pruning raised {short(exc)}"
    else:
        try:
            with torch.no_grad():
                produced = pruned(x)
        except Exception as exc:
            row["error"] = f"the pruned model fails to run: {short(exc)}"
        else:
            row["output_shape_kept"] = shape_of(produced) == expected
            if not row["output_shape_kept"]:
                row["error"] = f"output shape changed to {shape_of(produced)}"
            row["params_after"] = params(pruned)
            row["fraction"] = 1 - row["params_after"] / params(model)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["input_untouched"] = untouched(model, before)
    return row


def measure(name: str) -> dict[str, Any]:
    import torch

    model, x = build(name)
    output = output_layer(model, x)
    with torch.no_grad():
        expected = shape_of(model(x))
    row: dict[str, Any] = {
        "model": name,
        "input": list(x.shape),
        "params": params(model),
        "output_layer": output,
        "neuronmerge": run_neuronmerge(model, x, output, expected),
        "torch_pruning": run_torch_pruning(model, x, output, expected),
    }
    ours, theirs = row["neuronmerge"]["fraction"], row["torch_pruning"].get("fraction")
    row["reach"] = ours / theirs if ours is not None and theirs else None
    return row


def machine() -> dict[str, Any]:
    import torch
    import torch_pruning
    import torchvision

    def commit() -> str | None:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "unknown"),
        "threads": torch.get_num_threads(),
        "commit": commit(),
    }


def percent(value: float | None) -> str:
    if value is None:
        return "-"
    return "<1%" if 0 < value < 0.005 else f"{100 * value:.0f}%"


def markdown(results: dict[str, Any]) -> str:
    """The README's table: fraction of parameters removed, neuronmerge against Torch-Pruning."""
    lines = [
        "| model | params | neuronmerge | best of | exact merge | Torch-Pruning | reach |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    reaches = []
    for row in results["rows"]:
        nm_row, tp_row = row["neuronmerge"], row["torch_pruning"]
        tp_cell = percent(tp_row.get("fraction")) if "error" not in tp_row else "fails"
        if row["reach"] is not None and "error" not in tp_row:
            reaches.append(row["reach"])
        reach = f"{row['reach']:.2f}x" if row["reach"] is not None and "error" not in tp_row else "-"
        exact = nm_row["variants"]["merge"].get("fraction")
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.1f}M | {percent(nm_row['fraction'])} "
            f"| {nm_row['best'] or 'fails'} | {percent(exact)} | {tp_cell} | {reach} |"
        )
    notes = [
        f"- {row['model']}: Torch-Pruning {row['torch_pruning']['error']}"
        for row in results["rows"]
        if "error" in row["torch_pruning"]
    ] + [
        f"- {row['model']}: Torch-Pruning configured with {row['torch_pruning']['configured']}"
        for row in results["rows"]
        if "configured" in row["torch_pruning"]
    ]
    mean = sum(reaches) / len(reaches) if reaches else float("nan")
    at_least = sum(r >= 1 for r in reaches)
    summary = (
        f"\nMean reach {mean:.2f}x of Torch-Pruning over {len(reaches)} models where it runs; "
        f"neuronmerge removes at least as much on {at_least} of them."
    )
    return "\n".join(lines) + summary + ("\n\n" + "\n".join(notes) if notes else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--markdown", type=Path, help="print the README table of a results file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"ratio": RATIO, "machine": machine(), "rows": []}
    for name in args.models:
        start = time.perf_counter()
        row = measure(name)
        row["seconds"] = round(time.perf_counter() - start, 1)
        results["rows"].append(row)
        nm_row, tp_row = row["neuronmerge"], row["torch_pruning"]
        print(
            f"{name:20s} neuronmerge {percent(nm_row['fraction']):>4s} ({nm_row['best']}) "
            f"Torch-Pruning {percent(tp_row.get('fraction')):>4s} "
            f"{tp_row.get('error', '')} [{row['seconds']}s]",
            flush=True,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
