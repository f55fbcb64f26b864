"""Smoke test of neuronmerge on every torchvision builder (random weights): classification,
segmentation, video, optical flow, detection and the float form of the quantizable models.

Every model of ``torchvision.models.list_models()`` in those modules is built with ``weights=None``
(and ``weights_backbone=None``: nothing is downloaded), seeded, every all-zero weight redrawn, in
eval mode, and compressed at ratio 0.5 with ``approximate=True`` on the smallest input it accepts,
in a fresh process with one thread under a per-model time limit; nothing is excluded (the library
leaves the channels of the model's output alone itself). The row's ``status`` and the ``planted``
exactness check are those of ``smoke_common`` (shared with ``timm_smoke.py``): ``ok``,
``not-reduced``, ``refused`` (the library's own clear error), ``crash`` (any other exception),
``timeout``, and ``planted`` ``exact`` / ``WRONG``. Outputs may be dicts (segmentation), lists
(RAFT's flow per iteration) or lists of dicts (detection); their tensors are compared leaf by leaf.
A model with more than ``MAX_PARAMS`` parameters (counted on the meta device where it builds there) is
not run: its row says ``too-large`` with that reason. Run from the repository root in the zoo venv::

    PYTHONPATH=src nice -n 10 .venv-zoo/bin/python experiments/torchvision_smoke.py

which writes ``experiments/torchvision_smoke.json`` (``--out`` elsewhere; ``--only a b`` reruns some
models and keeps the other rows). ``experiments/torchvision_smoke_before.json`` holds the families
other than classification run with the library at e6736ba, before the fixes this smoke led to
(interpolation, Conv3d, list arguments edited in place, the list-of-images refusal; it predates the
``.backbone`` rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from smoke_common import compress_row, main, planted, redraw_zero_weights
from torch import nn

OUT = Path(__file__).with_suffix(".json")
#: Above this many parameters a model is not run here (2 shared CPU cores, a few minutes a model).
MAX_PARAMS = 200_000_000
TOO_LARGE = "too large for this machine"
#: A detection model takes a list of images, which neuronmerge refuses (the forward loops over a
#: Python list); ``NAME.backbone`` rows compress what the refusal advises instead: the backbone
#: (with its FPN), a batch of images in and a dict of feature maps out.
BACKBONE = ".backbone"
#: The families, in the order they run (classification last: ``benchmarks/reach.py`` covers it).
FAMILIES = ("segmentation", "video", "optical_flow", "detection", "quantization", "classification")

#: Input sides where the family's default (32) is too small: fixed position embeddings (ViT,
#: MaxViT), Inception's stem, AlexNet's pooling chain.
SIDES = {"inception_v3": 80, "quantized_inception_v3": 80, "maxvit_t": 224, "alexnet": 64}
#: Video inputs (frames, side) where the default (4, 32) is too small: S3D's final (2, 7, 7) average
#: pool; MViT's fixed (16, 224, 224) position embeddings.
CLIPS = {"s3d": (16, 224), "mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224)}


def family(name: str) -> str:
    """The torchvision module ``name``'s builder lives in."""
    import torchvision.models as tvm

    for module in FAMILIES[:-1]:
        if name.removesuffix(BACKBONE) in tvm.list_models(module=getattr(tvm, module)):
            return module
    return "classification"


def names() -> list[str]:
    """Every builder, by family."""
    import torchvision.models as tvm

    everything = set(tvm.list_models())
    listed: list[str] = []
    for module in FAMILIES[:-1]:
        listed += tvm.list_models(module=getattr(tvm, module))
        if module == "detection":
            listed += [name + BACKBONE for name in tvm.list_models(module=tvm.detection)]
    return listed + sorted(everything - set(listed))


def kwargs(name: str) -> dict[str, Any]:
    """Constructor keywords: no weights anywhere, the float model, small detection transforms."""
    name = name.removesuffix(BACKBONE)
    kind = family(name)
    options: dict[str, Any] = {"weights": None}
    if kind in ("segmentation", "detection"):
        options["weights_backbone"] = None
    if kind == "detection" and not name.startswith("ssd"):
        options.update(min_size=128, max_size=128)
    if kind == "quantization":
        options["quantize"] = False
    if name in ("googlenet", "inception_v3", "quantized_googlenet", "quantized_inception_v3"):
        options.update(aux_logits=False, init_weights=True)
    return options


def build(name: str) -> nn.Module:
    """The seeded random-weight model, every all-zero weight redrawn, in eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name.removesuffix(BACKBONE), **kwargs(name))
    if name.endswith(BACKBONE):
        model = model.backbone
    return redraw_zero_weights(model.eval())


def inputs(name: str, batch: int, dtype: torch.dtype) -> tuple[Any, ...]:
    """The smallest positional inputs ``name`` accepts (seeded)."""
    generator = torch.Generator().manual_seed(1 if dtype == torch.float64 else 0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(batch, *shape, generator=generator, dtype=dtype)

    kind = family(name)
    if kind == "video":
        frames, side = CLIPS.get(name, (4, 32))
        return (draw(3, frames, side, side),)
    if kind == "optical_flow":
        return (draw(3, 128, 128), draw(3, 128, 128))
    if kind == "detection" and not name.endswith(BACKBONE):
        return ([image for image in draw(3, 128, 128)],)
    if kind == "detection":  # the backbone: a batch of images (SSD's extra layers need its size)
        side = 300 if name.startswith("ssd300") else 320 if name.startswith("ssdlite") else 128
        return (draw(3, side, side),)
    if kind == "segmentation":
        return (draw(3, 64, 64),)
    side = SIDES.get(name, 224 if name.startswith("vit_") else 32)
    return (draw(3, side, side),)


def size(name: str) -> int:
    """The parameter count, from a model built on the meta device (nothing allocated), or for real
    where a builder computes with tensors while building (RegNet's widths)."""
    import torchvision

    builder = lambda: torchvision.models.get_model(name.removesuffix(BACKBONE), **kwargs(name))  # noqa: E731
    try:
        with torch.device("meta"):
            model = builder()
    except Exception:  # noqa: BLE001 - a meta tensor has no values to compute with
        model = builder()
    return sum(p.numel() for p in model.parameters())


def run_one(name: str) -> dict[str, Any]:
    """Compress one model in this process; return its row."""
    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name, "family": family(name)}
    params = size(name)
    if params > MAX_PARAMS:
        return {**row, "params_before": params, "status": "too-large", "error": TOO_LARGE}
    row = compress_row(build(name), inputs(name, 1, torch.float32), [], row)
    return {**row, **planted(lambda: build(name), inputs(name, 2, torch.float64), [])}


if __name__ == "__main__":
    main(__file__, names(), run_one, OUT, __doc__.splitlines()[0], timeout=180.0)
