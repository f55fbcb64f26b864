"""README tables of the budget sweep and the latency benchmark, generated from their JSON files.

    python experiments/budget_tables.py            # print the tables
    python experiments/budget_tables.py --write    # replace them in README.md between the markers

Reads ``experiments/budget_sweep.json`` (``budget_sweep.py``) and
``benchmarks/results/budget_latency.json`` (``benchmarks/budget_latency.py``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "budget_sweep.json"
LATENCY = ROOT / "benchmarks" / "results" / "budget_latency.json"
README = ROOT / "README.md"
START, END = "<!-- budget-tables:start -->", "<!-- budget-tables:end -->"
METHODS = ("merge", "prune", "merge-ls")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def sweep_tables(sweep: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    verdicts: list[str] = []
    choice: list[str] = []
    for name, result in sweep["models"].items():
        rows = result["rows"]
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        at = {(r["kept"], r["method"], r["allocation"]): r for r in rows}
        fractions = sorted({r["kept"] for r in rows})
        header = [f"{m} {a}" for m in methods for a in ("uniform", "error")]
        lines += [
            f"**{name}** ({result['params']:,} parameters, unpruned {result['baseline_accuracy']:.2f}%)",
            "",
            "| params kept | " + " | ".join(header) + " | torch-pruning global | best uniform | "
            "best allocated |",
            "|---:|" + "---:|" * (len(header) + 3),
        ]
        wins, beats = [], []
        for kept in fractions:

            def acc(method: str, allocation: str, kept: float = kept, at: Any = at) -> float | None:
                return _accuracy(at, kept, method, allocation)

            cells = [acc(m, a) for m in methods for a in ("uniform", "error")]
            uniform = max(
                (v for v in (acc(m, "uniform") for m in methods) if v is not None), default=None
            )
            allocated = max(
                (v for v in (acc(m, "error") for m in methods) if v is not None), default=None
            )
            peer = acc("torch-pruning-global", "global")
            if uniform is not None and allocated is not None:
                wins.append((kept, allocated - uniform))
            if peer is not None and allocated is not None:
                beats.append((kept, allocated - peer))
            lines.append(
                f"| {kept:.0%} | "
                + " | ".join(_cell(c) for c in cells)
                + f" | {_cell(peer)} | {_cell(uniform)} | **{_cell(allocated)}** |"
            )
        lines.append("")
        verdicts.append(
            f"| {name} | {_misses(wins)} | {sum(d for _, d in wins) / max(1, len(wins)):+.2f} | "
            f"{_misses(beats)} | {sum(d for _, d in beats) / max(1, len(beats)):+.2f} |"
        )
        means = {}
        for method, allocation in (
            ("merge", "error"),
            ("merge", "error-absolute"),
            ("merge-ls", "error"),
            ("merge-ls", "error-span"),
        ):
            val = [
                r["val_accuracy"]
                for r in rows
                if r["method"] == method
                and r["allocation"] == allocation
                and r["val_accuracy"] is not None
            ]
            means[method, allocation] = f"{sum(val) / len(val):.2f}" if val else "-"
        choice.append(
            f"| {name} | {means['merge', 'error']} | {means['merge', 'error-absolute']} | "
            f"{means['merge-ls', 'error']} | {means['merge-ls', 'error-span']} |"
        )
    lines += [
        "Targets: best allocated >= best uniform, and >= Torch-Pruning global, at every parameter count "
        "(test accuracy; `yes` or the counts where missed, and the mean difference in points):",
        "",
        "| model | allocated >= uniform | mean diff | allocated >= torch-pruning global | mean diff |",
        "|---|---|---:|---|---:|",
        *verdicts,
        "",
    ]
    if choice:
        lines += [
            "The allocation's choice, on the validation split (mean validation accuracy of the "
            "allocated widths over all counts): relative against absolute curves; and, tried for "
            "`merge-ls` and not kept, a least-squares (span) residual curve instead of the merge one:",
            "",
            "| model | merge, relative (chosen) | merge, absolute | merge-ls, merge curve (chosen) | "
            "merge-ls, span curve |",
            "|---|---:|---:|---:|---:|",
            *choice,
            "",
        ]
    return lines


def _accuracy(
    at: dict[tuple[float, str, str], dict[str, Any]], kept: float, method: str, allocation: str
) -> float | None:
    row = at.get((kept, method, allocation))
    return None if row is None else float(row["accuracy"])


def _misses(diffs: list[tuple[float, float]]) -> str:
    missed = [f"{kept:.0%}" for kept, d in diffs if d < 0]
    return "yes" if not missed else "no (" + ", ".join(missed) + ")"


def latency_table(latency: dict[str, Any]) -> list[str]:
    lines = [
        "| model | target | allocation | params | MACs | latency batch 1 | latency batch 64 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for result in latency["models"]:
        for key, row in result["rows"].items():
            if key == "original":
                continue
            lines.append(
                f"| {result['model']} | {row['target']:.0%} of {row['metric']} | {row['allocation']} | "
                f"{row['params']:.2f} | {row['macs']:.2f} | {row['latency_batch1']:.2f} | "
                f"{row['latency_batch64']:.2f} |"
            )
    return lines + [""]


def tables() -> str:
    lines: list[str] = []
    if SWEEP.is_file():
        lines += sweep_tables(json.loads(SWEEP.read_text()))
    if LATENCY.is_file():
        lines += [
            "Latency on this CPU (one thread; medians of interleaved rounds, as ratios to the "
            "original measured in the same run; `benchmarks/results/budget_latency.json`):",
            "",
            *latency_table(json.loads(LATENCY.read_text())),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the tables in README.md")
    args = parser.parse_args()
    text = tables()
    if not args.write:
        print(text)
        return
    readme = README.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    README.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme))


if __name__ == "__main__":
    main()
