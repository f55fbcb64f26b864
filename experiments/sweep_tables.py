"""Markdown tables of the committed sweeps (experiments/sweeps/*/sweep.json), for the README.

    python experiments/sweep_tables.py            # print them
    python experiments/sweep_tables.py --write    # replace the README block between the markers

The README block is generated, never edited by hand; tests/test_sweep_tables.py checks that it
matches the files. Besides one table per model it prints the issue-5 target checks: the best
data-free method against the paper's merge (mean over ratios 0.5-0.8, and at 0.7 and 0.8 for the
authors' LeNet-300-100) and against Torch-Pruning at every ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SWEEPS = HERE / "sweeps"
README = HERE.parent / "README.md"
START, END = "<!-- sweep-tables:start -->", "<!-- sweep-tables:end -->"
#: Display order; sweeps of other names follow alphabetically.
ORDER = ("vgg-fmnist", "alexnet-fmnist", "resnet-fmnist", "lenet-300-100", "lenet-300-100-kim2020")
PEER = "torch-pruning"
#: Data-free peers (not neuronmerge methods): never counted as *best data-free*, each one a target
#: (issue 12) at every ratio in ``PEER_RATIOS``.
PEERS = (PEER, "fold-ar", "fold-dir")
PEER_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TARGET_RATIOS = (0.5, 0.6, 0.7, 0.8)


def load_sweeps(folder: Path = SWEEPS) -> dict[str, dict[str, Any]]:
    """Every ``<name>/sweep.json`` under ``folder``, in display order."""
    found = {path.parent.name: json.loads(path.read_text()) for path in folder.glob("*/sweep.json")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return {name: found[name] for name in names}


Cells = dict[tuple[float, str], dict[str, Any]]


def _cells(outcome: dict[str, Any]) -> tuple[list[str], list[float], Cells]:
    methods = list(dict.fromkeys(row["method"] for row in outcome["results"]))
    ratios = sorted({row["ratio"] for row in outcome["results"]})
    return methods, ratios, {(row["ratio"], row["method"]): row for row in outcome["results"]}


def model_table(name: str, outcome: dict[str, Any]) -> str:
    """Test accuracy per ratio and method (``*`` marks data-aware methods), parameters reached."""
    methods, ratios, cells = _cells(outcome)
    free = {row["method"]: row["data_free"] for row in outcome["results"]}
    header = ["ratio", *(m if free[m] else f"{m}*" for m in methods), "params"]
    lines = [
        f"**{name}** ({outcome.get('source', 'weights unknown')}; unpruned "
        f"{outcome['baseline_accuracy']:.2f}%, {outcome['params']:,} parameters)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for ratio in ratios:
        accs = [f"{cells[ratio, m]['accuracy']:.2f}" if (ratio, m) in cells else "-" for m in methods]
        params = sorted({cells[ratio, m]["params"] for m in methods if (ratio, m) in cells})
        shown = " / ".join(f"{p:,}" for p in params)
        lines.append(f"| {ratio:g} | " + " | ".join(accs) + f" | {shown} |")
    return "\n".join(lines)


def _best_free(cells: Cells, ratio: float, methods: list[str]) -> tuple[str, float]:
    options = [
        (cells[ratio, m]["accuracy"], m)
        for m in methods
        if (ratio, m) in cells and cells[ratio, m]["data_free"] and m not in PEERS
    ]
    accuracy, method = max(options)
    return method, accuracy


def peer_losses(outcome: dict[str, Any], peer: str) -> list[float] | None:
    """The ratios in ``PEER_RATIOS`` where ``peer`` beats the best data-free neuronmerge method
    (``None`` when the sweep has no ``peer`` row)."""
    methods, ratios, cells = _cells(outcome)
    if peer not in methods:
        return None
    return [
        r
        for r in ratios
        if r in PEER_RATIOS
        and (r, peer) in cells
        and _best_free(cells, r, methods)[1] < cells[r, peer]["accuracy"]
    ]


def targets_table(sweeps: dict[str, dict[str, Any]]) -> str:
    """The issue-5 and issue-12 target checks, per model, from the same files."""
    lines = [
        "| model | best data-free - paper merge, mean 0.5-0.8 | at 0.7 | at 0.8 | "
        + " | ".join(f"best data-free >= {peer} at 0.1-0.9" for peer in PEERS)
        + " |",
        "|---|---:|---:|---:|" + "---|" * len(PEERS),
    ]
    for name, outcome in sweeps.items():
        methods, ratios, cells = _cells(outcome)
        if "merge" not in methods:
            continue
        gaps = {}
        for ratio in ratios:
            if (ratio, "merge") in cells:
                gaps[ratio] = _best_free(cells, ratio, methods)[1] - cells[ratio, "merge"]["accuracy"]
        window = [gaps[r] for r in TARGET_RATIOS if r in gaps]
        mean = f"{sum(window) / len(window):+.2f}" if window else "-"
        at = [f"{gaps[r]:+.2f}" if r in gaps else "-" for r in (0.7, 0.8)]
        beats = []
        for peer in PEERS:
            losing = peer_losses(outcome, peer)
            if losing is None:
                beats.append("-")
            else:
                beats.append(
                    "yes" if not losing else "no (at " + ", ".join(f"{r:g}" for r in losing) + ")"
                )
        lines.append(f"| {name} | {mean} | {at[0]} | {at[1]} | " + " | ".join(beats) + " |")
    return "\n".join(lines)


def training_table(sweeps: dict[str, dict[str, Any]]) -> str:
    """How each model trained here was trained, and its unpruned accuracies."""
    lines = [
        "| model | parameters | epochs | lr | schedule | validation % | test % | training time (s) |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, outcome in sweeps.items():
        train = outcome.get("training")
        if train is None:
            continue
        schedule = train.get("schedule", "cosine")
        if schedule == "exponential":
            schedule = f"x{train['decay']:g} per epoch"
        lines.append(
            f"| {name} | {outcome['params']:,} | {train['epochs']} | {train['lr']:g} | {schedule} | "
            f"{outcome['baseline_val_accuracy']:.2f} | {outcome['baseline_accuracy']:.2f} | "
            f"{train['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def render(sweeps: dict[str, dict[str, Any]]) -> str:
    """The whole generated README block (without the markers)."""
    parts = [
        "Models trained here (seed 0, SGD with momentum 0.9, batch 128, weight decay 5e-4; the "
        "schedule is a per-step cosine decay over the epochs, or the rate times a factor per "
        "epoch; deterministic, one thread):\n\n" + training_table(sweeps)
    ]
    parts += [model_table(name, outcome) for name, outcome in sweeps.items()]
    parts.append(
        "Targets (issues 5 and 12), where *best data-free* is the best data-free neuronmerge method "
        "at each ratio (the peers Torch-Pruning, Fold-AR and Fold-DIR excluded); `-` where a sweep "
        "has no such row:\n\n" + targets_table(sweeps)
    )
    return "\n\n".join(parts)


def readme_block(text: str) -> str:
    """The text between the README markers."""
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} ... {END} markers")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    block = render(load_sweeps())
    if not args.write:
        print(block)
        return
    text = README.read_text()
    readme_block(text)  # checks the markers are there
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    README.write_text(f"{before}{START}\n{block}\n{END}{after}")


if __name__ == "__main__":
    main()
