"""LoRA: a frozen linear plus a trainable low-rank side path.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".

    x ─┬─► base_layer (frozen W, full precision or 4-bit) ──────────────┐
       │                                                               (+) ─► y = W x + (alpha / r) B A x
       └─► dropout ─► A (in ─► r) ─► B (r ─► out) ─► x (alpha / r) ──┘

A starts kaiming-uniform and B at zero, so an untouched adapter changes nothing. Only A and B train:
r x (in + out) numbers per wrapped layer, 65,536 for a 4096x4096 projection at r=8 (0.4% of it);
6,291,456 for r=8 on q, k and v of Llama-7B's 32 layers. On a 4-bit base this is QLoRA (Dettmers et
al. 2023). merge() folds B A into W for inference.

On disk (peft's layout): adapter_config.json {"peft_type": "LORA", "r", "lora_alpha", "target_modules",
"lora_dropout", "rank_pattern", "alpha_pattern", ...} and per wrapped layer
    base_model.model.<layer name>.lora_A.weight   (r, in)
    base_model.model.<layer name>.lora_B.weight   (out, r)
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import MiniPeftError, require, require_mapping
from ..llama.quant import dequantize, is_4bit, requantize_
from .wrappers import freeze_base, record_settings

SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
               "up": "up_proj", "down": "down_proj"}
TARGETS = (*SHORT_NAMES.values(), "lm_head")
PEFT_PREFIX = "base_model.model."


class LoRALayer(nn.Module):
    trainable_names, wrapped = ("lora_A.weight", "lora_B.weight"), "base_layer"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device)  # A: (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device)  # B: (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.enabled = False, True

    def forward(self, x):
        y = self.base_layer(x)  # (..., out)
        if self.merged or not self.enabled:
            return y
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return y + (self.scaling * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: the (out, in) update this adapter adds to W."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merge(self) -> float:
        """W <- W + (alpha/r) B A. Returns the max abs rounding error (0 unless the base is 4-bit)."""
        return self.fold(+1) if not self.merged else 0.0

    def unmerge(self) -> float:
        """W <- W - (alpha/r) B A. On a 4-bit base this re-quantizes, so W comes back only approximately."""
        return self.fold(-1) if self.merged else 0.0

    @torch.no_grad()
    def fold(self, sign: int) -> float:
        delta = sign * self.delta_weight().float()
        if is_4bit(self.base_layer):  # dequantize, add, re-quantize: rounds to the 4-bit grid again
            error = requantize_(self.base_layer, dequantize(self.base_layer).float() + delta)
        else:
            self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
            error = 0.0
        self.merged = sign > 0
        return error


@dataclass
class LoRASettings:
    """What add_lora was asked for; saved as peft's LoraConfig."""
    peft_type: ClassVar[str] = "LORA"
    r: int
    alpha: float
    dropout: float
    targets: list = field(default_factory=list)
    rank_pattern: dict = field(default_factory=dict)  # full layer name -> r, where it differs from r
    alpha_pattern: dict = field(default_factory=dict)  # full layer name -> alpha, likewise


def add_lora(model, targets=("q_proj", "k_proj", "v_proj"), r=8, alpha=16, dropout=0.0,
             rank_pattern=None, alpha_pattern=None) -> int:
    """Wrap every linear whose name ends with one of `targets` in a LoRALayer. Returns how many.

    Call it again with other targets to give them their own r and alpha (one dropout for all, as in
    peft's file). `rank_pattern` / `alpha_pattern` map full layer names to their own r / alpha.
    """
    if not isinstance(r, int) or r <= 0:
        raise MiniPeftError(f"r: expected a positive integer rank, got {r!r}")
    if not 0 <= dropout < 1:
        raise MiniPeftError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    targets = [SHORT_NAMES.get(t, t) for t in targets]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise MiniPeftError(f"targets: unknown {unknown}; expected names from {TARGETS}")
    settings = getattr(model, "peft_settings", {}).get("LORA") or LoRASettings(r, alpha, dropout)
    if dropout != settings.dropout:
        raise MiniPeftError(f"dropout: {dropout} differs from the {settings.dropout} of this model's other LoRA "
                            f"layers; peft's adapter file holds one lora_dropout")
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and not isinstance(module, LoRALayer):
            layer_r, layer_alpha = rank_pattern.get(name, r), alpha_pattern.get(name, alpha)
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, LoRALayer(module, layer_r, layer_alpha, dropout))
            wrapped.append(name)
            if layer_r != settings.r:
                settings.rank_pattern[name] = layer_r
            if layer_alpha != settings.alpha:
                settings.alpha_pattern[name] = layer_alpha
    if not wrapped:
        raise MiniPeftError(f"targets: no module named {targets} in the model (already wrapped?)")
    settings.targets = sorted(set(settings.targets) | {name.rsplit(".", 1)[-1] for name in wrapped})
    record_settings(model, settings)
    freeze_base(model)
    return len(wrapped)


def lora_layers(model) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def merge(model) -> float:
    """Fold every adapter into its base weight; return the worst rounding error (4-bit bases only)."""
    layers = lora_layers(model)
    if "lm_head" in layers and model.config.tie_word_embeddings:
        raise MiniPeftError("merge: lm_head shares its weight with the input embedding (tie_word_embeddings); "
                            "merging its LoRA would change the embedding too. Keep that adapter unmerged")
    return max((layer.merge() for layer in layers.values()), default=0.0)


def unmerge(model) -> float:
    """Take every adapter back out of its base weight; return the worst rounding error."""
    return max((layer.unmerge() for layer in lora_layers(model).values()), default=0.0)


# ---- the adapter file, in peft's layout ------------------------------------------------------------------

def to_peft(model, settings: LoRASettings) -> tuple[dict, dict]:
    """peft's LoraConfig and tensors for the LoRA layers of `model`."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.alpha,
              "target_modules": settings.targets, "lora_dropout": settings.dropout, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              "rank_pattern": dict(settings.rank_pattern), "alpha_pattern": dict(settings.alpha_pattern)}
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    return config, tensors


def from_peft(model, config: dict, source) -> dict:
    """Wrap `model` as the LoraConfig says; return {file key: parameter} for the tensors to load."""
    shape = model.config
    largest = max(shape.hidden_size, shape.intermediate_size, shape.vocab_size)
    r = require(config, "r", int, source, 1, largest)
    alpha = require(config, "lora_alpha", (int, float), source, -1e9, 1e9)
    dropout = require(config, "lora_dropout", (int, float), source, 0, 0.999, default=0.0)
    ranks = require_mapping(config, "rank_pattern", int, source, largest)
    alphas = require_mapping(config, "alpha_pattern", (int, float), source, 1e9)
    targets = require(config, "target_modules", (list, str), source)
    targets = [targets] if isinstance(targets, str) else targets
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not targets or not all(isinstance(t, str) for t in targets) or not set(targets) <= present:
        raise MiniPeftError(f"{source}: target_modules {targets} are not all modules of this model")
    add_lora(model, targets, r, alpha, dropout, rank_pattern=ranks, alpha_pattern=alphas)
    return to_peft(model, model.peft_settings["LORA"])[1]
