"""LoRA: a frozen linear plus a trainable low-rank side path.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".

    x ─┬─► base_layer (frozen W, full precision or 4-bit) ──────────────┐
       │                                                               (+) ─► y = W x + (alpha / r) B A x
       └─► dropout ─► A (in ─► r) ─► B (r ─► out) ─► x (alpha / r) ──┘

A starts kaiming-uniform and B at zero, so an untouched adapter changes nothing. Only A and B train:
r x (in + out) numbers per wrapped layer, 65,536 for a 4096x4096 projection at r=8 (0.4% of it).
On a 4-bit base this is QLoRA (Dettmers et al. 2023). merge() folds B A into W for inference.
"""

import math

import torch
import torch.nn as nn

from .errors import MiniPeftError
from .parameters import freeze_base
from .quant import dequantize, is_4bit, requantize_

SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
               "up": "up_proj", "down": "down_proj"}
TARGETS = (*SHORT_NAMES.values(), "lm_head")


class LoRALayer(nn.Module):
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
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)  # (..., out)
        if self.merged:
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


def add_lora(model, targets=("q_proj", "k_proj", "v_proj"), r=8, alpha=16, dropout=0.0) -> int:
    """Wrap every linear whose name ends with one of `targets` in a LoRALayer. Returns how many.

    Call it again with other targets to give them their own r, alpha and dropout.
    """
    if not isinstance(r, int) or r <= 0:
        raise MiniPeftError(f"r: expected a positive integer rank, got {r!r}")
    if not 0 <= dropout < 1:
        raise MiniPeftError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    targets = [SHORT_NAMES.get(t, t) for t in targets]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise MiniPeftError(f"targets: unknown {unknown}; expected names from {TARGETS}")
    freeze_base(model)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and not isinstance(module, LoRALayer):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, LoRALayer(module, r, alpha, dropout))
            wrapped += 1
    if wrapped == 0:
        raise MiniPeftError(f"targets: no module named {targets} in the model (already wrapped?)")
    return wrapped


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
