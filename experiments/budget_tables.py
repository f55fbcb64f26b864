"""README tables of the budget sweep and the latency benchmark, generated from their JSON files.

    python experiments/budget_tables.py            # print the tables
    python experiments/budget_tables.py --write    # replace them in README.md between the markers

Reads ``experiments/budget_sweep.json`` (``budget_sweep.py``),
``experiments/budget_validation.json`` (``budget_validation.py``),
``experiments/budget_choice.json`` (``budget_choice.py``),
``experiments/budget_holdout.json`` (``budget_holdout.py``),
``experiments/budget_weight_check.json`` (``budget_weight_check.py``) and
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
VALIDATION = ROOT / "experiments" / "budget_validation.json"
CHOICE = ROOT / "experiments" / "budget_choice.json"
HOLDOUT = ROOT / "experiments" / "budget_holdout.json"
WEIGHT_CHECK = ROOT / "experiments" / "budget_weight_check.json"
LATENCY = ROOT / "benchmarks" / "results" / "budget_latency.json"
README = ROOT / "README.md"
START, END = "<!-- budget-tables:start -->", "<!-- budget-tables:end -->"
METHODS = ("merge", "prune", "merge-ls")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def comparisons(result: dict[str, Any]) -> list[tuple[float, float | None, float | None]]:
    """Per parameter count: best allocated minus best uniform, and minus Torch-Pruning global
    (test accuracy, points; ``None`` where a row is missing)."""
    rows = result["rows"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    at = {(r["kept"], r["method"], r["allocation"]): r for r in rows}
    out = []
    for kept in sorted({r["kept"] for r in rows}):
        uniform = _best(at, kept, methods, "uniform")
        allocated = _best(at, kept, methods, "error")
        peer = _accuracy(at, kept, "torch-pruning-global", "global")
        out.append(
            (
                kept,
                None if uniform is None or allocated is None else round(allocated - uniform, 2),
                None if peer is None or allocated is None else round(allocated - peer, 2),
            )
        )
    return out


def _best(
    at: dict[tuple[float, str, str], dict[str, Any]], kept: float, methods: list[str], allocation: str
) -> float | None:
    values = [v for v in (_accuracy(at, kept, m, allocation) for m in methods) if v is not None]
    return max(values, default=None)


def sweep_tables(sweep: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    verdicts: list[str] = []
    for name, result in sweep["models"].items():
        rows = result["rows"]
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        at = {(r["kept"], r["method"], r["allocation"]): r for r in rows}
        header = [f"{m} {a}" for m in methods for a in ("uniform", "error")]
        lines += [
            f"**{name}** ({result['params']:,} parameters, {result['epochs']} epochs, unpruned "
            f"{result['baseline_accuracy']:.2f}%)",
            "",
            "| params kept | " + " | ".join(header) + " | torch-pruning global | best uniform | "
            "best allocated |",
            "|---:|" + "---:|" * (len(header) + 3),
        ]
        for kept, _, _ in comparisons(result):
            cells = [
                _cell(_accuracy(at, kept, m, a)) + ("*" if a == "error" and _same(at, kept, m) else "")
                for m in methods
                for a in ("uniform", "error")
            ]
            peer = _accuracy(at, kept, "torch-pruning-global", "global")
            lines.append(
                f"| {kept:.0%} | "
                + " | ".join(cells)
                + f" | {_cell(peer)} | {_cell(_best(at, kept, methods, 'uniform'))} | "
                f"**{_cell(_best(at, kept, methods, 'error'))}** |"
            )
        lines.append("")
        wins = [(k, d) for k, d, _ in comparisons(result) if d is not None]
        beats = [(k, d) for k, _, d in comparisons(result) if d is not None]
        verdicts.append(
            f"| {name} | {_misses(wins)} | {sum(d for _, d in wins) / max(1, len(wins)):+.2f} | "
            f"{_misses(beats)} | {sum(d for _, d in beats) / max(1, len(beats)):+.2f} |"
        )
    return lines + [
        '`*`: the uniform widths kept under `allocation="error"` (the check found the '
        "allocation no closer on the probes, or the uniform widths already within "
        "`allocation_check.NEGLIGIBLE` of them).",
        "",
        "Targets: best allocated >= best uniform, and >= Torch-Pruning global, at every parameter count "
        "(test accuracy; `yes` or the counts where missed with the difference, and the mean "
        "difference in points):",
        "",
        "| model | allocated >= uniform | mean diff | allocated >= torch-pruning global | mean diff |",
        "|---|---|---:|---|---:|",
        *verdicts,
        "",
    ]


def validation_table(validation: dict[str, Any]) -> list[str]:
    """The allocation's settings tried on the validation split, and the one chosen."""
    chosen = validation["summary"]["chosen"]
    models = ", ".join(validation["models"])
    lines = [
        "The allocation's settings, chosen on the validation split (`experiments/budget_validation.py`"
        f", `.json`; {models}): per setting, the best method's allocated validation accuracy minus "
        "the best method's uniform one, over every model and parameter count:",
        "",
        "| merge-ls curve | band | mean gain | worst cell | cells below uniform |",
        "|---|---:|---:|---:|---|",
    ]
    for setting in validation["summary"]["settings"].values():
        mark = " (chosen)" if setting == chosen else ""
        below = ", ".join(setting["cells_below_uniform"]) or "none"
        lines.append(
            f"| {setting['curve']}{mark} | {setting['band']} | {setting['mean_gain']:+.3f} | "
            f"{setting['worst']:+.2f} | {below} |"
        )
    return lines + [""]


def _same(at: dict[tuple[float, str, str], dict[str, Any]], kept: float, method: str) -> bool:
    """Whether a method's allocated row has exactly its uniform row's widths (the check kept them)."""
    error, uniform = at.get((kept, method, "error")), at.get((kept, method, "uniform"))
    return error is not None and uniform is not None and error.get("widths") == uniform.get("widths")


def choice_table(choice: dict[str, Any]) -> list[str]:
    """merge-ls's check against uniform widths on the probes, on the validation split: the chosen
    rule beside each band alone and the other significance levels on the same candidates."""
    rules, chosen = choice["summary"]["rules"], choice["summary"]["chosen"]
    same = rules[chosen]
    shown = [name for name in rules if "alone" in name] + [
        name
        for name, rule in rules.items()
        if "measure" in rule
        and (
            (rule["measure"] == same["measure"] and rule["candidates"] == same["candidates"])
            or (
                rule["z"] == same["z"]
                and (rule["measure"] == same["measure"]) != (rule["candidates"] == same["candidates"])
            )
        )
    ]
    lines = [
        "merge-ls's check of its allocation against the uniform widths on the probes, chosen on the "
        f"validation split (`experiments/budget_choice.py`, `.json`; {', '.join(choice['models'])}): "
        "per rule, the validation accuracy of the widths it keeps minus uniform's, over every model "
        "and parameter count (merge-ls only):",
        "",
        "| rule | mean gain | worst cell | cells below uniform |",
        "|---|---:|---:|---|",
    ]
    for name in shown:
        rule = rules[name]
        below = ", ".join(rule["cells_below_uniform"]) or "none"
        mark = " (chosen)" if name == chosen else ""
        lines.append(f"| {name}{mark} | {rule['mean_gain']:+.3f} | {rule['worst']:+.2f} | {below} |")
    return lines + [""]


def hard_cells_table(choice: dict[str, Any], sweep: dict[str, Any] | None) -> list[str]:
    """Every candidate of merge-ls at the cells where its chosen widths lost to uniform ones: on
    validation under the chosen rule or the one before it (``former``), or on test in the sweep
    (shown, never chosen on)."""
    summary = choice["summary"]
    named = [summary["chosen"], summary.get("former")]
    cells = {
        (c.rsplit(" ", 2)[0], c.rsplit(" ", 2)[1].rstrip(":"))
        for name in named
        if name in summary["rules"]
        for c in summary["rules"][name]["cells_below_uniform"]
    }
    for name, result in (sweep or {}).get("models", {}).items():
        at = {(r["kept"], r["allocation"]): r for r in result["rows"] if r["method"] == "merge-ls"}
        for (kept, allocation), row in at.items():
            uniform = at.get((kept, "uniform"))
            if allocation == "error" and uniform and row["accuracy"] < uniform["accuracy"]:
                cells.add((name, f"{kept:.0%}"))
    rows = []
    for name, result in choice["models"].items():
        for row in result["rows"]:
            if (name, f"{row['kept']:.0%}") not in cells or "val_se" not in row:
                continue
            uniform = next(
                r for r in result["rows"] if r["kept"] == row["kept"] and r["candidate"] == "uniform"
            )
            diff = row["val_accuracy"] - uniform["val_accuracy"]
            rows.append(
                f"| {name} | {row['kept']:.0%} | {row['candidate']} | {row['val_accuracy']:.2f} | "
                f"{diff:+.2f} ± {row['val_se']:.2f} | {row['val_gained']} / {row['val_lost']} | "
                f"{row['t_mse']:+.2f} | {row['t_fresh_mse']:+.2f} |"
            )
    if not rows:
        return []
    lines = [
        "merge-ls's candidates where its pick lost to the uniform widths on validation (the chosen "
        "rule or the one before it) or test (sweep): validation accuracy minus uniform's with its "
        "paired standard error (images right that uniform gets wrong / the reverse), and how many "
        "standard errors each is closer than uniform on the probes (`t_mse`) and on fresh probes of "
        "another seed (`t_fresh_mse`); `p*`: the propagation-aware curves (`group_impact`):",
        "",
        "| model | kept | candidate | validation | minus uniform | gained / lost | t_mse "
        "| t_fresh_mse |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    return lines + rows + [""]


def holdout_table(holdout: dict[str, Any]) -> list[str]:
    """merge-ls's check on the validation split: uniform widths kept untried below each threshold
    of their probe error (the chosen one marked), and the check's error scored in-sample or
    cross-fitted (at the library's z and candidates)."""
    summary = holdout["summary"]
    lines = [
        "When the uniform widths are already close on the probes (`allocation_check.NEGLIGIBLE`), "
        "and whether the check should score each probe with a model fitted without it "
        f"(`experiments/budget_holdout.py`, `.json`; {', '.join(holdout['models'])}; validation "
        "split): merge-ls's pick minus its uniform widths, and the best allocated method minus the "
        "best uniform one, over every model and parameter count:",
        "",
        "| rule | merge-ls mean gain | merge-ls cells below uniform | best mean gain | "
        "best cells below uniform |",
        "|---|---:|---|---:|---|",
    ]

    def row(label: str, rule: dict[str, Any]) -> str:
        own, best = rule["merge_ls"], rule["best_data_free"]
        return (
            f"| {label} | {own['mean_gain']:+.3f} | {', '.join(own['cells_below_uniform']) or 'none'}"
            f" | {best['mean_gain']:+.3f} | {', '.join(best['cells_below_uniform']) or 'none'} |"
        )

    for rule in summary["negligible"].values():
        mark = " (chosen)" if rule["negligible"] == summary["chosen_negligible"] else ""
        when = f"below {rule['negligible']}" if rule["negligible"] else "never (as before)"
        lines.append(row(f"in-sample error, uniform kept untried {when}{mark}", rule))
    name = "held_out z 1.0 among uniform/band 0.1/band 0.2"
    if name in summary["rules"]:
        lines.append(row("cross-fitted error, uniform kept untried never", summary["rules"][name]))
    return lines + [""]


def weight_check_table(check: dict[str, Any]) -> list[str]:
    """merge's and prune's check against uniform widths on the probes, on the validation split:
    unchecked as before, at ``allocation_check``'s settings, and the other settings tried."""
    summary = check["summary"]
    lines = [
        "Checking `merge` and `prune`'s allocations on the probes too (`experiments/"
        f"budget_weight_check.py`, `.json`; {', '.join(check['models'])}; validation split): per "
        "rule, the best allocated method (merge's and prune's pick, merge-ls's) minus the best "
        "uniform one, and merge's and prune's pick minus their own uniform widths, over every model "
        "and parameter count (the rules vary merge's and prune's check only; merge-ls as the library "
        f"runs it). Adopted (the library's settings; fixed in advance: no more cells "
        f"below uniform than unchecked, mean within 0.1 points): "
        f"**{'yes' if summary['adopted'] else 'no'}**.",
        "",
        "| rule | best mean gain | best cells below uniform | merge/prune mean gain | "
        "merge/prune cells below uniform |",
        "|---|---:|---|---:|---|",
    ]
    for name, rule in summary["rules"].items():
        best, own = rule["best_data_free"], rule["weight_only"]
        if name == "off":
            label = "unchecked (band 0.2 alone, as before)"
        else:
            untried = f"below {rule['negligible']}" if rule["negligible"] else "never"
            label = f"z {rule['z']}, uniform untried {untried}"
        mark = " (library)" if name == summary["library"] else ""
        lines.append(
            f"| {label}{mark} | {best['mean_gain']:+.3f} | "
            f"{', '.join(best['cells_below_uniform']) or 'none'} | {own['mean_gain']:+.3f} | "
            f"{len(own['cells_below_uniform'])} of {own['cells']} |"
        )
    return lines + [""]


def _accuracy(
    at: dict[tuple[float, str, str], dict[str, Any]], kept: float, method: str, allocation: str
) -> float | None:
    row = at.get((kept, method, allocation))
    return None if row is None else float(row["accuracy"])


def _misses(diffs: list[tuple[float, float]]) -> str:
    missed = [f"{kept:.0%} {d:+.2f}" for kept, d in diffs if d < 0]
    return "yes" if not missed else "no (" + ", ".join(missed) + ")"


def latency_table(latency: dict[str, Any]) -> list[str]:
    load = latency.get("load_average")
    lines = [
        "Latency on this CPU (one thread; each compressed model timed against the original "
        f"back to back in {latency.get('rounds', 15)} alternating rounds, the median ratio of "
        "wall-clock time and of the thread's CPU time; "
        "`benchmarks/results/budget_latency.json`"
        + (
            f"; load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after, on "
            f"{latency['cpus']} cores shared with other jobs"
            if load
            else ""
        )
        + "):",
        "",
        "| model | target | allocation | params | MACs | latency batch 1 | latency batch 64 "
        "| CPU time batch 1 | CPU time batch 64 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in latency["models"]:
        for key, row in result["rows"].items():
            if key == "original":
                continue
            step = row.get("round_to", 1)
            lines.append(
                f"| {result['model']} | {row['target']:.0%} of {row['metric']} | {row['allocation']}"
                + (f", round_to {step}" if step > 1 else "")
                + f" | {row['params']:.2f} | {row['macs']:.2f} | {row['latency_batch1']:.2f} | "
                f"{row['latency_batch64']:.2f} | {_cell(row.get('cpu_batch1'))} | "
                f"{_cell(row.get('cpu_batch64'))} |"
            )
    return lines + [""]


def tables() -> str:
    lines: list[str] = []
    if SWEEP.is_file():
        lines += sweep_tables(json.loads(SWEEP.read_text()))
    if VALIDATION.is_file():
        lines += validation_table(json.loads(VALIDATION.read_text()))
    if CHOICE.is_file():
        choice = json.loads(CHOICE.read_text())
        lines += choice_table(choice)
        lines += hard_cells_table(choice, json.loads(SWEEP.read_text()) if SWEEP.is_file() else None)
    if HOLDOUT.is_file():
        lines += holdout_table(json.loads(HOLDOUT.read_text()))
    if WEIGHT_CHECK.is_file():
        lines += weight_check_table(json.loads(WEIGHT_CHECK.read_text()))
    if LATENCY.is_file():
        lines += latency_table(json.loads(LATENCY.read_text()))
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
