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
found). The compressing, the checks and the command line are ``smoke_common``'s, shared with
``torchvision_smoke.py``. timm is not a dependency of neuronmerge: install it beside the zoo venv, e.g.
``pip install --no-deps --target /work/timm-pkgs timm pyyaml huggingface_hub``, then

    PYTHONPATH=src:/work/timm-pkgs nice -n 10 .venv-zoo/bin/python experiments/timm_smoke.py

which writes ``experiments/timm_smoke.json`` (``--out`` elsewhere;
``experiments/timm_smoke_before.json`` is the same run with ``PYTHONPATH=/work/main/src`` at 99dd457,
before the fixes it led to). ``--only a b`` reruns some
models and keeps the other rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from smoke_common import compress_row, main, planted, redraw_zero_weights

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

    torch.manual_seed(0)
    return redraw_zero_weights(timm.create_model(name, pretrained=False).eval())


def run_one(name: str) -> dict[str, Any]:
    """Compress one model in this process; return its row."""
    import timm

    torch.set_num_threads(1)
    side = MODELS[name]
    model = build(name)
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
    heads = [classifier] if isinstance(classifier, str) else list(classifier)
    exclude = [f"{h}*" for h in heads]
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    row = compress_row(model, (x,), exclude, {"model": name, "side": side})
    x64 = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return {**row, **planted(lambda: build(name), (x64,), exclude)}


if __name__ == "__main__":
    main(__file__, list(MODELS), run_one, OUT, __doc__.splitlines()[0])
