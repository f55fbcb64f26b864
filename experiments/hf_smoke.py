"""Smoke test of ``neuronmerge.hf.compress_pretrained`` on transformers architectures the tests do not
cover: tiny configs, random weights, nothing downloaded.

Every (architecture, method) row ends as one of: ``ok`` (MLP width before/after per config width
field, relative output error against the dense model on random inputs, ``save_pretrained`` then
``from_pretrained`` of the same class gives the same outputs), ``refused`` (``InvalidArgumentError``
with its reason), ``crash`` (any other exception: a defect) or ``wrong`` (reload differs, or the
caller's model changed).

Run: ``nice -n 10 .venv/bin/python experiments/hf_smoke.py`` (writes ``experiments/hf_smoke.json``
and the README table between its markers); ``--write`` only regenerates the table from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.hf import compress_pretrained

VOCAB = 64
OUT = Path(__file__).with_suffix(".json")
IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
AUDIO = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32}
DECODER = {**SMALL, "intermediate_size": 64, "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0}
DECODER_KV = {**DECODER, "num_key_value_heads": 2}


def _text(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS)[0]


def _image(model: torch.nn.Module) -> torch.Tensor:
    return model(pixel_values=PIXELS)[0]


def _seq2seq(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, decoder_input_ids=IDS[:, :4])[0]


def _whisper(model: torch.nn.Module) -> torch.Tensor:
    return model(AUDIO)[0]


def _speech(model: torch.nn.Module) -> torch.Tensor:
    return model(input_features=AUDIO, decoder_input_ids=IDS[:, :4])[0]


def _speech2text(model: torch.nn.Module) -> torch.Tensor:
    return model(input_features=AUDIO.transpose(1, 2), decoder_input_ids=IDS[:, :4])[0]


Case = tuple[str, Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]


def _cases() -> list[Case]:
    lm: list[tuple[str, str, dict[str, Any]]] = [
        ("qwen2", "Qwen2", DECODER_KV),
        ("qwen3", "Qwen3", {**DECODER_KV, "head_dim": 8}),
        ("mistral", "Mistral", DECODER_KV),
        ("mixtral", "Mixtral", {**DECODER_KV, "num_local_experts": 4, "num_experts_per_tok": 2}),
        ("gemma", "Gemma", {**DECODER_KV, "head_dim": 8}),
        ("gemma2", "Gemma2", {**DECODER_KV, "head_dim": 8}),
        ("phi", "Phi", DECODER),
        ("phi3", "Phi3", {**DECODER_KV, "pad_token_id": 0}),
        ("stablelm", "StableLm", DECODER_KV),
        ("olmo", "Olmo", {**DECODER, "pad_token_id": 1}),
        ("olmo2", "Olmo2", {**DECODER, "pad_token_id": 1}),
        ("granite", "Granite", DECODER_KV),
        ("starcoder2", "Starcoder2", DECODER_KV),
        ("persimmon", "Persimmon", DECODER),
        ("cohere", "Cohere", DECODER_KV),
        ("gptneox", "GPTNeoX", DECODER),
        (
            "gptj",
            "GPTJ",
            {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "vocab_size": VOCAB},
        ),
        (
            "codegen",
            "CodeGen",
            {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "vocab_size": VOCAB},
        ),
        ("falcon", "Falcon", {**SMALL, "vocab_size": VOCAB}),
        ("bloom", "Bloom", {"hidden_size": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB}),
        ("gptbigcode", "GPTBigCode", {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB}),
    ]
    cases: list[Case] = [
        (name, _build(f"{stem}ForCausalLM", f"{stem}Config", kw), _text) for name, stem, kw in lm
    ]
    enc = {**SMALL, "intermediate_size": 64, "vocab_size": VOCAB}
    encoders: list[tuple[str, str, dict[str, Any]]] = [
        ("roberta", "Roberta", {**enc, "pad_token_id": 1}),
        ("xlmroberta", "XLMRoberta", {**enc, "pad_token_id": 1}),
        ("electra", "Electra", {**enc, "embedding_size": 32}),
        ("albert", "Albert", {**enc, "embedding_size": 16}),
        ("debertav2", "DebertaV2", enc),
        ("mpnet", "MPNet", enc),
        (
            "distilbert",
            "DistilBert",
            {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "vocab_size": VOCAB},
        ),
    ]
    cases += [(n, _build(f"{s}Model", f"{s}Config", kw), _text) for n, s, kw in encoders]
    vision = {**SMALL, "intermediate_size": 64, "image_size": 32, "patch_size": 8}
    images: list[tuple[str, str, str, dict[str, Any]]] = [
        ("deit", "DeiTModel", "DeiTConfig", vision),
        ("dinov2", "Dinov2Model", "Dinov2Config", {**vision, "mlp_ratio": 2}),
        ("beit", "BeitModel", "BeitConfig", vision),
        (
            "swin",
            "SwinModel",
            "SwinConfig",
            {
                "image_size": 32,
                "patch_size": 4,
                "embed_dim": 16,
                "depths": [1, 1],
                "num_heads": [2, 2],
                "window_size": 4,
            },
        ),
        (
            "convnext",
            "ConvNextModel",
            "ConvNextConfig",
            {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
        ),
        (
            "resnet",
            "ResNetModel",
            "ResNetConfig",
            {"hidden_sizes": [16, 32], "depths": [1, 1], "embedding_size": 16},
        ),
        (
            "mobilenetv2",
            "MobileNetV2Model",
            "MobileNetV2Config",
            {"image_size": 32, "depth_multiplier": 0.35},
        ),
        ("siglip_vision", "SiglipVisionModel", "SiglipVisionConfig", vision),
        ("clip_vision", "CLIPVisionModel", "CLIPVisionConfig", vision),
    ]
    cases += [(n, _build(m, c, kw), _image) for n, m, c, kw in images]
    s2s = {"vocab_size": VOCAB, "pad_token_id": 1, "decoder_start_token_id": 0}
    cases += [
        (
            "t5",
            _build(
                "T5Model",
                "T5Config",
                {**s2s, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4},
            ),
            _seq2seq,
        ),
    ]
    t5 = {**s2s, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4}
    gated = {**t5, "feed_forward_proj": "gated-gelu"}
    t5s: list[tuple[str, str, str, dict[str, Any]]] = [
        ("t5_gated_lm", "T5ForConditionalGeneration", "T5Config", gated),
        ("mt5", "MT5ForConditionalGeneration", "MT5Config", gated),
        ("umt5", "UMT5ForConditionalGeneration", "UMT5Config", gated),
        ("longt5", "LongT5ForConditionalGeneration", "LongT5Config", {**t5, "local_radius": 4}),
    ]
    cases += [(n, _build(m, c, kw), _seq2seq) for n, m, c, kw in t5s]
    # BART's family: encoder_ffn_dim and decoder_ffn_dim differ here, so each stack keeps its own
    bart = {
        **s2s,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 48,
        "max_position_embeddings": 32,
    }
    barts: list[tuple[str, str, str, dict[str, Any]]] = [
        ("bart", "BartModel", "BartConfig", bart),
        ("bart_lm", "BartForConditionalGeneration", "BartConfig", bart),
        ("mbart", "MBartForConditionalGeneration", "MBartConfig", bart),
        ("marian", "MarianMTModel", "MarianConfig", bart),
        ("pegasus", "PegasusForConditionalGeneration", "PegasusConfig", bart),
        ("plbart", "PLBartForConditionalGeneration", "PLBartConfig", bart),
        ("blenderbot", "BlenderbotForConditionalGeneration", "BlenderbotConfig", bart),
        ("blenderbot_small", "BlenderbotSmallForConditionalGeneration", "BlenderbotSmallConfig", bart),
        ("m2m100", "M2M100ForConditionalGeneration", "M2M100Config", bart),
        ("mvp", "MvpForConditionalGeneration", "MvpConfig", bart),
        (
            "led",
            "LEDForConditionalGeneration",
            "LEDConfig",
            {
                **bart,
                "attention_window": 4,
                "max_encoder_position_embeddings": 32,
                "max_decoder_position_embeddings": 32,
            },
        ),
        (
            "bigbird_pegasus",
            "BigBirdPegasusForConditionalGeneration",
            "BigBirdPegasusConfig",
            {**bart, "attention_type": "original_full"},
        ),
        ("pegasus_x", "PegasusXForConditionalGeneration", "PegasusXConfig", {**bart, "block_size": 4}),
    ]
    cases += [(n, _build(m, c, kw), _seq2seq) for n, m, c, kw in barts]
    audio = {
        **bart,
        "num_mel_bins": 8,
        "max_source_positions": 8,
        "max_target_positions": 16,
        "vocab_size": VOCAB,
    }
    cases += [
        ("whisper", _build("WhisperForConditionalGeneration", "WhisperConfig", audio), _speech),
        (
            "speech2text",
            _build(
                "Speech2TextForConditionalGeneration",
                "Speech2TextConfig",
                {
                    **bart,
                    "input_feat_per_channel": 8,
                    "max_source_positions": 32,
                    "max_target_positions": 16,
                },
            ),
            _speech2text,
        ),
        (
            "whisper_encoder",
            _build(
                "WhisperForAudioClassification",
                "WhisperConfig",
                {
                    "d_model": 32,
                    "encoder_layers": 2,
                    "encoder_attention_heads": 4,
                    "encoder_ffn_dim": 64,
                    "num_mel_bins": 8,
                    "max_source_positions": 8,
                    "vocab_size": VOCAB,
                },
            ),
            _whisper,
        ),
    ]
    return cases


def _build(model_cls: str, config_cls: str, kwargs: dict[str, Any]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return getattr(tf, model_cls)(getattr(tf, config_cls)(**kwargs)).eval()

    return build


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run(
    name: str, build: Callable[[], torch.nn.Module], forward: Callable, method: str
) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "method": method}
    try:
        model = build()
    except Exception as exc:  # the config itself: not neuronmerge's fault
        return {**row, "status": "config", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        dense = forward(model)
    for approximate in (False, True):
        options = {"approximate": True} if approximate else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = compress_pretrained(model, 0.5, method=method, **options)
        except InvalidArgumentError as exc:
            row.update(status="refused", reason=str(exc)[:300])
            if "approximate" in str(exc) and not approximate:
                continue
            return row
        except Exception as exc:
            last = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(last.filename).name}:{last.lineno}"
            return {**row, "status": "crash", "reason": f"{type(exc).__name__}: {exc} @ {where}"[:300]}
        break
    else:
        return row
    changed = any(not torch.equal(state[k], v) for k, v in model.state_dict().items())
    small = result.model
    row.update(approximate=approximate, widths={k: list(v) for k, v in result.widths.items()})
    try:
        with torch.no_grad():
            out = forward(small)
        row["error"] = round(_rel(out, dense), 4)
        with tempfile.TemporaryDirectory() as tmp:
            small.save_pretrained(tmp)
            reloaded = type(small).from_pretrained(tmp).eval()
            with torch.no_grad():
                again = forward(reloaded)
        row["reload_error"] = _rel(again, out)
    except Exception as exc:
        return {
            **row,
            "status": "wrong",
            "reason": f"after compression: {type(exc).__name__}: {exc}"[:300],
        }
    if changed or row["reload_error"] > 1e-5 or type(small) is not type(model):
        return {**row, "status": "wrong", "reason": "caller modified" if changed else "reload differs"}
    return {**row, "status": "ok"}


#: The README block generated from the JSON (``table``), between these markers.
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- hf-smoke:start -->", "<!-- hf-smoke:end -->"


def _error(row: dict[str, Any] | None) -> str:
    if row is None or row["status"] != "ok":
        return "-"
    return f"{row['error']:.4f}" + (" (approximate)" if row["approximate"] else "")


def _short(reason: str) -> str:
    """A refusal's reason, at most 100 characters, as one table cell."""
    cell = reason if len(reason) <= 100 else reason[:97] + "..."
    return cell.replace("|", "\\|")


def table(outcome: dict[str, Any]) -> str:
    """The README block: the counts, then one row per architecture with the MLP widths per config
    width field and the relative output error of each method (``approximate``: merged through
    GELU/SiLU with ``approximate=True``), or why it was refused."""
    counts = ", ".join(f"{n} {status}" for status, n in outcome["counts"].items())
    lines = [
        f"Rows (architecture x method): {counts}.",
        "",
        "| architecture | MLP widths (config field: before -> after) or reason | merge | merge-ls |",
        "|---|---|---:|---:|",
    ]
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in outcome["rows"]:
        by_model.setdefault(row["model"], {})[row["method"]] = row
    for model, rows in by_model.items():
        done = [row for row in rows.values() if row["status"] == "ok"]
        if done:
            what = ", ".join(f"`{k}` {a} -> {b}" for k, (a, b) in done[0]["widths"].items())
        else:
            first = next(iter(rows.values()))
            what = f"{first['status']}: {_short(first.get('reason', ''))}"
        lines.append(
            f"| {model} | {what} | {_error(rows.get('merge'))} | {_error(rows.get('merge-ls'))} |"
        )
    return "\n".join(lines)


def write_readme(outcome: dict[str, Any]) -> None:
    text = README.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{START}\n{table(outcome)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="only regenerate the README table")
    if not parser.parse_args().write:
        torch.set_num_threads(1)
        rows = []
        for name, build, forward in _cases():
            for method in ("merge", "merge-ls"):
                row = run(name, build, forward, method)
                print(json.dumps(row), flush=True)
                rows.append(row)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        OUT.write_text(json.dumps({"counts": counts, "rows": rows}, indent=1) + "\n")
    outcome = json.loads(OUT.read_text())
    print(table(outcome))
    if START in README.read_text():
        write_readme(outcome)


if __name__ == "__main__":
    main()
