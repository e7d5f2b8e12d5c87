"""LoRA: a frozen linear plus a trainable low-rank side path.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".

    x ─┬─► base_layer (frozen W, full precision or 4-bit) ──────────────┐
       │                                                               (+) ─► y = W x + (alpha / r) B A x
       └─► dropout ─► A (in ─► r) ─► B (r ─► out) ─► x (alpha / r) ──┘

A starts kaiming-uniform and B at zero, so an untouched adapter changes nothing. Only A and B train:
r x (in + out) numbers per wrapped layer, 65,536 for a 4096x4096 projection at r=8 (0.4% of it);
6,291,456 for r=8 on q, k and v of Llama-7B's 32 layers. On a 4-bit base this is QLoRA (Dettmers et
al. 2023). merge() folds B A into W for inference. DoRA adds a magnitude vector (dora.py).

On disk (peft's layout): adapter_config.json {"peft_type": "LORA", "r", "lora_alpha", "target_modules",
"lora_dropout", "rank_pattern", "alpha_pattern", "use_dora", ...} and per wrapped layer
    base_model.model.<layer name>.lora_A.weight   (r, in)
    base_model.model.<layer name>.lora_B.weight   (out, r)
    base_model.model.<layer name>.lora_magnitude_vector   (out,), with DoRA
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import PER_LAYER, FoldsIntoWeight, Wrapper, attach, innermost, linears_named, matmul_input, pattern_value


class LoRALayer(Wrapper, FoldsIntoWeight):
    trainable_names = ("lora_A.weight", "lora_B.weight")
    use_dora = False  # DoRA's layer (dora.py) learns each row's magnitude too

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora=False):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r  # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r)
        linear = innermost(base_layer)  # the frozen linear (under other adapters, when several share it)
        self.lora_A = nn.Linear(linear.in_features, r, bias=False, device=linear.weight.device)  # A: (r, in)
        self.lora_B = nn.Linear(r, linear.out_features, bias=False, device=linear.weight.device)  # B: (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapt_output(self, x, y):
        """y + (alpha / r) B A x, from the wrapped layer's output y = W x."""
        update = self.lora_B(self.lora_A(self.dropout(matmul_input(x, self.lora_A.weight))))  # B A x: (..., out)
        return y + (self.scaling * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: the (out, in) update this adapter adds to W; merge() folds it in (contract.py)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)


@dataclass
class LoRASettings:
    """What add_lora was asked for: what its adapter file is written from (formats/peft.py)."""
    r: int = field(metadata=PER_LAYER)  # PER_LAYER: a later add_lora may give its layers others
    alpha: float = field(metadata=PER_LAYER)
    dropout: float = 0.0
    targets: list = field(default_factory=list)  # the names asked for (a regex: the names it matched)
    rank_pattern: dict = field(default_factory=dict, metadata=PER_LAYER)  # layer name or suffix pattern -> r
    alpha_pattern: dict = field(default_factory=dict, metadata=PER_LAYER)  # likewise for alpha
    use_rslora: bool = False
    use_dora: bool = False


def add_lora(model, targets=("q_proj", "k_proj", "v_proj"), r=8, alpha=16, dropout=0.0,
             rank_pattern=None, alpha_pattern=None, use_rslora=False, name="default", *, layer=LoRALayer) -> int:
    """Wrap every linear that `targets` names in a LoRALayer. Returns how many.

    Args:
        targets: module names or name suffixes ("q_proj", or "q" for short), or one regex that whole
            names must match, as in peft.
        rank_pattern, alpha_pattern: {name or suffix pattern: r / alpha} for layers that differ.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        name: the adapter these layers belong to (several can share a base: minipeft.set_adapter).
        layer: the wrapper; DoRA's (dora.add_dora) learns a magnitude too.
    Call it again with other targets to give them their own r and alpha (one dropout for all, as in
    peft's file).
    """
    if not isinstance(r, int) or r <= 0:
        raise BadInput(f"r: expected a positive integer rank, got {r!r}")
    if not 0 <= dropout < 1:
        raise BadInput(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    slots, asked = linears_named(model, targets, every_name_must_match=True)
    settings = LoRASettings(r, alpha, dropout, asked, dict(rank_pattern or {}), dict(alpha_pattern or {}),
                            use_rslora, layer.use_dora)
    attach(model, name, settings, slots, lambda slot, base: layer(base, pattern_value(settings.rank_pattern, slot, r),
                                                                  pattern_value(settings.alpha_pattern, slot, alpha),
                                                                  dropout, use_rslora))
    return len(slots)


def lora_layers(model) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
