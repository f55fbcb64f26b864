"""A small byte-level GPT, trained here on the King James Bible, to measure compression on a transformer.

Pre-LayerNorm blocks (causal self-attention, then an MLP), learned positions, untied output head. The
MLP's activation is a config field: ReLU (the default, positively homogeneous, so neuron merging is
exact wherever two neurons' pre-activations are parallel), squared ReLU (homogeneous of degree 2) or
GELU. Attention uses separate ``q``, ``k``, ``v`` projections so that a whole head is rows of three
layers and columns of ``proj``. Trained once per (config, seed, steps) and cached like the
Fashion-MNIST models; perplexity is ``exp`` of the mean next-byte cross-entropy.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from neuronmerge.io import atomic_write
from neuronmerge.lab.text import Corpus, load_kjv
from neuronmerge.lab.training import default_cache_dir
from neuronmerge.progress import progress_bar

Activation = Literal["relu", "relu2", "gelu"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; ``mlp_width`` is the hidden width of every block's MLP."""

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256
    mlp_width: int = 1024
    activation: Activation = "relu"


@dataclass(frozen=True)
class TrainRecipe:
    """AdamW with linear warm-up then cosine decay, random windows of ``block_size`` bytes."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1


#: The registered configurations: ``gpt-kjv`` is the one swept (ReLU MLP, 3.3M parameters).
CONFIGS: dict[str, GPTConfig] = {
    "gpt-kjv": GPTConfig(),
    "gpt-kjv-relu2": GPTConfig(activation="relu2"),
    "gpt-kjv-gelu": GPTConfig(activation="gelu"),
}


class SquaredReLU(nn.Module):
    """``relu(x) ** 2`` (Primer): homogeneous of degree 2, ``f(s z) = s**2 f(z)`` for ``s > 0``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.square(F.relu(x))


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu2": SquaredReLU, "gelu": nn.GELU}


class MLP(nn.Module):
    """``fc -> activation -> proj``: the part whose hidden neurons are merged."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_width)
        self.act = _ACTIVATIONS[config.activation]()
        self.proj = nn.Linear(config.mlp_width, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class SelfAttention(nn.Module):
    """Causal multi-head attention with separate query, key and value projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.q = nn.Linear(config.n_embd, config.n_embd)
        self.k = nn.Linear(config.n_embd, config.n_embd)
        self.v = nn.Linear(config.n_embd, config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        # The head width is read from q's output, so a model with fewer heads runs unchanged.
        q, k, v = (
            f(x).view(batch, length, self.n_head, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level GPT: ``(batch, length)`` integer tokens -> ``(batch, length, vocab)`` logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = nn.Parameter(torch.zeros(config.block_size, config.n_embd))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)
        for name, param in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.head(self.ln_f(x))
        return logits


def config_from_state_dict(state: dict[str, Tensor], base: GPTConfig) -> GPTConfig:
    """``base`` with the MLP width and head count read from the tensor shapes (a compressed model).

    Every block must share one width (uniform ratios keep them equal); the head width is the base one.
    """
    widths = {t.shape[0] for name, t in state.items() if name.endswith("mlp.fc.weight")}
    q_rows = {t.shape[0] for name, t in state.items() if name.endswith("attn.q.weight")}
    if len(widths) != 1 or len(q_rows) != 1:
        raise ValueError(f"blocks of different widths: MLP {sorted(widths)}, attention {sorted(q_rows)}")
    head_dim = base.n_embd // base.n_head
    return replace(base, mlp_width=widths.pop(), n_head=q_rows.pop() // head_dim)


def random_windows(tokens: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """``batch`` random windows of ``length + 1`` tokens (input and shifted target), as int64."""
    starts = torch.randint(len(tokens) - length - 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()]).long()


def train_gpt(
    model: GPT, tokens: Tensor, recipe: TrainRecipe, *, seed: int = 0, progress: bool = True
) -> GPT:
    """Train ``model`` in place on random windows of ``tokens``; returns it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )

    def rate(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    length = model.config.block_size
    model.train()
    running = 0.0
    with progress_bar(progress, recipe.steps, "training") as advance:
        for step in range(recipe.steps):
            window = random_windows(tokens, recipe.batch_size, length, generator)
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
            advance(f"step {step + 1}/{recipe.steps}  loss {running:.3f}")
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Tensor, *, length: int = 64, batch: int = 64) -> float:
    """``exp`` of the mean next-token cross-entropy over consecutive windows of ``length`` tokens.

    Every token after the first of each window is predicted once (the first has no context in its
    window); the tail shorter than a window is left out.
    """
    count = (len(tokens) - 1) // length
    if count < 1:
        raise ValueError(f"need more than {length} tokens, got {len(tokens)}")
    data = tokens[: count * length + 1].long()
    inputs = data[:-1].view(count, length)
    targets = data[1:].view(count, length)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, count, batch):
            logits = model(inputs[start : start + batch])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets[start : start + batch].reshape(-1),
                reduction="sum",
            ).item()
    finally:
        model.train(was_training)
    return math.exp(total / (count * length))


def trained_gpt(
    name: str = "gpt-kjv",
    *,
    seed: int = 0,
    recipe: TrainRecipe | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[GPT, dict[str, Any]]:
    """A registered GPT trained on the KJV training chapters (eval mode) and its info, cached.

    ``info`` holds the config, recipe, seed, validation perplexity and training seconds, plus
    ``weights`` (the safetensors path) and ``cached``. The test split is never touched here.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown GPT config {name!r}; choose one of {', '.join(CONFIGS)}")
    config, recipe = CONFIGS[name], recipe or TrainRecipe()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    shape = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:8]
    stem = f"{name}-{shape}-kjv-seed{seed}-s{recipe.steps}-b{recipe.batch_size}-lr{recipe.lr:g}"
    weights, sidecar = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if weights.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
        model = GPT(config)
        model.load_state_dict(load_file(weights))
        return model.eval(), {**info, "weights": str(weights), "cached": True}
    corpus = corpus or load_kjv()
    torch.manual_seed(seed)
    model = GPT(config)
    started = time.perf_counter()
    train_gpt(model, corpus.train, recipe, seed=seed, progress=progress)
    info = {
        "name": name,
        "config": asdict(config),
        "recipe": asdict(recipe),
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - started, 1),
        "val_perplexity": perplexity(model, corpus.val, length=config.block_size),
    }
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return model, {**info, "weights": str(weights), "cached": False}
