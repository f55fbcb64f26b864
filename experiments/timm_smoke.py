"""Smoke test of neuronmerge on timm architectures it was never developed on (random weights).

Every model is built with ``pretrained=False`` (nothing is downloaded), put in eval mode and
compressed at ratio 0.5 with ``approximate=True`` and its classifier excluded, in a fresh process
under a per-model timeout. Each row records ``ok`` or what went wrong: a crash (exception type and
message), a changed output shape, a modified input model, or no parameter saved; with the parameter
counts before and after. timm zero-initialises some weights (classifier heads, the last BatchNorm
scale of residual blocks, NFNets' scalar skip-init gains, which silence every residual branch),
which would make merges look free, so every all-zero weight is redrawn first. A second check
(``planted``) is the exactness one of the test suite: exact duplicates are planted at every exact
site of a float64 copy as captured (``tests.builders.plant_duplicates``; capture stores weights
computed from parameters, such as standardised ones, so the planted rows are the layers' effective
rows), and merging them (``approximate=False``, no threshold) must leave the output unchanged
(``planted_error``, the relative L2 change, about 1e-15 when right; ``no-sites`` when none was
found). timm is not a dependency of neuronmerge: install it beside the zoo venv, e.g.
``pip install --no-deps --target /work/timm-pkgs timm pyyaml huggingface_hub``, then

    PYTHONPATH=src:/work/timm-pkgs nice -n 10 .venv-zoo/bin/python experiments/timm_smoke.py

which writes ``experiments/timm_smoke.json`` (``--out`` elsewhere;
``experiments/timm_smoke_before.json`` is the same run with ``PYTHONPATH=/work/main/src`` at 99dd457,
before the fixes it led to). ``--only a b`` reruns some
models and keeps the other rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: timm model name -> input side (the smallest side the architecture accepts comfortably).
MODELS: dict[str, int] = {
    "resnet18": 64,
    "resnet50d": 64,
    "resnext26ts": 64,
    "seresnext26d_32x4d": 64,
    "regnetx_002": 64,
    "regnety_002": 64,
    "efficientnet_b0": 64,
    "efficientnet_lite0": 64,
    "mobilenetv3_small_050": 64,
    "mobilenetv2_050": 64,
    "mnasnet_050": 64,
    "ghostnet_050": 64,
    "ghostnetv2_100": 64,
    "convnext_atto": 64,
    "convnextv2_atto": 64,
    "densenet121": 64,
    "dla34": 64,
    "dpn48b": 64,
    "hrnet_w18_small": 64,
    "inception_v3": 96,
    "xception41": 96,
    "nf_resnet26": 64,
    "dm_nfnet_f0": 64,
    "resnetv2_50x1_bit": 64,
    "rexnet_100": 64,
    "repvgg_a0": 64,
    "mobilevit_xxs": 64,
    "mobilevitv2_050": 64,
    "vit_tiny_patch16_224": 224,
    "deit_tiny_patch16_224": 224,
    "beit_base_patch16_224": 224,
    "swin_tiny_patch4_window7_224": 224,
    "levit_128s": 224,
    "coat_lite_tiny": 224,
    "poolformer_s12": 64,
    "mixer_s32_224": 224,
    "resmlp_12_224": 224,
    "gmlp_ti16_224": 224,
    "efficientformer_l1": 224,
    "fastvit_t8": 64,
    "edgenext_xx_small": 64,
    "tinynet_e": 64,
    "cspresnet50": 64,
    "cspdarknet53": 64,
    "darknet17": 64,
    "hardcorenas_a": 64,
    "lcnet_050": 64,
    "mobileone_s0": 64,
    "res2net50_14w_8s": 64,
    "resnest14d": 64,
    "selecsls42b": 64,
    "tresnet_m": 64,
    "vovnet39a": 64,
    "ese_vovnet19b_dw": 64,
    "pit_ti_224": 224,
    "crossvit_tiny_240": 240,
    "cait_xxs24_224": 224,
    "twins_svt_small": 224,
    "convmixer_768_32": 64,
    "visformer_tiny": 224,
    "mobilenetv4_conv_small": 64,
}

OUT = Path(__file__).with_suffix(".json")


def build(name: str) -> Any:
    """The timm model with random weights, every all-zero weight redrawn, in eval mode."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias") or bool(p.any()):
                continue
            if p.dim() <= 1:  # a scale: per channel, or one (NFNets' skipinit_gain)
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
    return model


def planted(name: str, side: int, heads: list[str]) -> dict[str, Any]:
    """Plant exact duplicates at every exact site (float64), merge them; the output must not move."""
    import torch

    import neuronmerge as nm
    from neuronmerge.capture import capture

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.builders import plant_duplicates

    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exclude = [f"{h}*" for h in heads]
    try:
        # Planted where merging reads the rows: in the captured model, whose computed weights
        # (weight standardisation) are stored tensors; elsewhere it shares the model's tensors.
        model = capture(build(name).double(), x)
        found = nm.plan(model, x, exclude=exclude)
        plant_duplicates(model, found.sites, 0.5, "l2-norm", torch.Generator().manual_seed(0))
    except Exception as error:  # noqa: BLE001 - a pattern the test helper cannot plant into
        return {"planted": "not-planted", "planted_error": f"{type(error).__name__}: {error}"[:300]}
    with torch.no_grad():
        reference = model(x)
    try:
        result = nm.compress(model, x, 0.5, criterion="l2-norm", threshold=None, exclude=exclude)
        with torch.no_grad():
            error = float((result.model(x) - reference).norm() / reference.norm())
    except Exception as failure:  # noqa: BLE001
        return {"planted": "crash", "planted_error": f"{type(failure).__name__}: {failure}"[:300]}
    return {
        "planted": "no-sites" if not result.report.sites else "exact" if error < 1e-9 else "WRONG",
        "planted_error": error,
        "planted_sites": len(result.report.sites),
    }


def run_one(name: str, side: int) -> dict[str, Any]:
    """Compress one model in this process; return its row."""
    import timm
    import torch

    import neuronmerge as nm

    torch.set_num_threads(1)
    model = build(name)
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
    heads = [classifier] if isinstance(classifier, str) else list(classifier)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(x)
    params = sum(p.numel() for p in model.parameters())
    row: dict[str, Any] = {"model": name, "side": side, "params_before": params}
    try:
        result = nm.compress(model, x, 0.5, approximate=True, exclude=[f"{h}*" for h in heads])
    except Exception as error:  # noqa: BLE001 - the smoke test records every failure
        row.update(status="crash", error=f"{type(error).__name__}: {str(error)[:400]}")
        return {**row, **planted(name, side, heads)}
    after = model.state_dict()
    modified = after.keys() != before.keys() or any(not torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        out = result.model(x)
    params_after = sum(p.numel() for p in result.model.parameters())
    row.update(
        params_after=params_after,
        removed=round(1 - params_after / params, 4),
        output_error=result.report.output_error,
        sites=len(result.report.sites),
        skipped=[s.reason for s in result.report.skipped][:5],
    )
    if modified:
        row["status"] = "input-modified"
    elif out.shape != reference.shape:
        row["status"] = "shape-changed"
    elif params_after >= params:
        row["status"] = "not-reduced"
    else:
        row["status"] = "ok"
    return {**row, **planted(name, side, heads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="rerun these models, keep the other rows")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON to write (and to keep rows of)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, MODELS[args.one])))
        return
    out = args.out
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
    for name in args.only or list(MODELS):
        start = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--one", name],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = done.stdout.strip().splitlines()
            row = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {"model": name, "status": "crash", "error": done.stderr.strip()[-400:]}
            )
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "timeout", "error": f"over {args.timeout:.0f} s"}
        row["seconds"] = round(time.monotonic() - start, 1)
        rows[name] = row
        print(json.dumps(row), flush=True)
        counts: dict[str, int] = {}
        for r in rows.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        out.write_text(json.dumps({"counts": counts, "rows": list(rows.values())}, indent=1) + "\n")


if __name__ == "__main__":
    main()
