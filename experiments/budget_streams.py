"""Whether residual streams should keep the uniform width under the data-free allocation
(``widths.HOLD_STREAMS``); writes experiments/budget_streams.json.

    python experiments/budget_streams.py

resnet-fmnist is the one model trained here with residual streams. At 10%, 20%, 30% and 50% of the
parameters kept, merge-ls (on its synthetic probes) compresses with uniform widths, with the
allocation cutting streams by their curve, and with streams held at the uniform width; only the
5,000 validation images held out of the training split are scored. The setting with the higher
mean validation accuracy is kept. Torch runs on one thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from probe_files import probe_batches

import neuronmerge as nm
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.settings import overridden
from neuronmerge.lab.sweep import fashion_mnist_eval_data
from neuronmerge.lab.training import trained_model

OUT = Path(__file__).resolve().parent / "budget_streams.json"
KEPT = (0.1, 0.2, 0.3, 0.5)


def main() -> None:
    torch.set_num_threads(1)
    data = fashion_mnist_eval_data()
    model, _ = trained_model("resnet-fmnist", progress=False)
    example = data.test[0][:2]
    probes = probe_batches("resnet-fmnist", model, example)
    rows: list[dict[str, Any]] = []
    for kept in KEPT:
        for label, allocation, hold in (
            ("uniform", "uniform", True),
            ("streams cut by their curve", "error", False),
            ("streams held", "error", True),
        ):
            with overridden(hold_streams=hold, check=False):  # the allocation alone
                result = nm.compress(
                    model,
                    example,
                    target_params=kept,
                    method="merge-ls",
                    calibration=probes,
                    allocation=allocation,  # type: ignore[arg-type]
                )
            row = {
                "kept": kept,
                "setting": label,
                "val_accuracy": round(accuracy(result.model, *data.val), 2),
                "widths": [s.kept for s in result.report.sites],
            }
            rows.append(row)
            print(row, flush=True)
    means = {
        label: round(sum(r["val_accuracy"] for r in rows if r["setting"] == label) / len(KEPT), 2)
        for label in dict.fromkeys(r["setting"] for r in rows)
    }
    OUT.write_text(
        json.dumps({"model": "resnet-fmnist", "rows": rows, "mean_val": means}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
