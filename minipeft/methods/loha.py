"""LoHa: the update to a frozen linear is the Hadamard (element-wise) product of two low-rank matrices.

Hyeon-Woo, Ye-Bin and Oh 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning" (ICLR 2022), parameterises a weight as W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ): with inner rank R each factor has rank
at most R, and their element-wise product has rank up to R² (FedPara's Proposition 1), from 2R(m + n) numbers.
LyCORIS (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation") applies it to the update of a frozen W, as LoRA applies B A; peft's LoHa is LyCORIS's:

    ΔW = (alpha / r) (B1 A1) ⊙ (B2 A2)          B1, B2 (out, r)   A1, A2 (r, in)
    y  = W x + ΔW x

    x ─┬─► base_layer (frozen W, full precision or 4-bit) ─────────────────────────┐
       │                                                                          (+) ─► y
       └─► ΔW = (alpha / r) (B1 A1) ⊙ (B2 A2), built each forward (out, in) ─► ΔW x ┘

B1, A1 and B2 start kaiming-uniform and A2 at zero (peft's init_weights=True), so an untouched adapter changes
nothing. It trains 2 r (in + out) numbers a layer, twice LoRA's at the same r, for a ΔW of rank up to r² where
LoRA's is r: at r=8 on q, k and v of Llama-7B's 32 layers, 12,582,912 numbers. Unlike LoRA, ΔW is built in
full, out x in, at every forward (as peft builds it): memory and time grow with the layer, not with r. merge()
folds ΔW into W (contract.FoldsIntoWeight; on a 4-bit base W is rounded to the grid again).

On disk (peft's layout): adapter_config.json {"peft_type": "LOHA", "r", "alpha", "target_modules", "rank_pattern",
"alpha_pattern", ...} and per wrapped layer
    base_model.model.<layer name>.hada_w1_a   (out, r)    B1
    base_model.model.<layer name>.hada_w1_b   (r, in)     A1
    base_model.model.<layer name>.hada_w2_a   (out, r)    B2
    base_model.model.<layer name>.hada_w2_b   (r, in)     A2
peft's rank and module dropouts (random during training only) are not built: a file that sets one is refused.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import (PER_LAYER, FoldsIntoWeight, Wrapper, attach, innermost, linears_named, matmul_input,
                       pattern_value)


class LoHaLayer(Wrapper, FoldsIntoWeight):
    trainable_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base_layer: nn.Module, r: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        linear = innermost(base_layer)  # the frozen linear (under other adapters, when several share it)
        out, into, device = linear.out_features, linear.in_features, linear.weight.device
        self.hada_w1_a = nn.Parameter(torch.empty(out, r, device=device))  # B1
        self.hada_w1_b = nn.Parameter(torch.empty(r, into, device=device))  # A1
        self.hada_w2_a = nn.Parameter(torch.empty(out, r, device=device))  # B2
        self.hada_w2_b = nn.Parameter(torch.zeros(r, into, device=device))  # A2 = 0: ΔW = 0 at the start
        for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) (B1 A1) ⊙ (B2 A2): (out, in)."""
        return self.scaling * ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b))

    def adapt_output(self, x, y):
        """y + ΔW x, from the wrapped layer's output y = W x."""
        delta = self.delta_weight()
        return y + (matmul_input(x, delta) @ delta.T).to(y.dtype)


@dataclass
class LoHaSettings:
    """What add_loha was asked for: what its adapter file is written from (formats/peft.py)."""
    r: int = field(metadata=PER_LAYER)  # PER_LAYER: a later add_loha may give its layers others
    alpha: float = field(metadata=PER_LAYER)
    targets: list = field(default_factory=list)  # the names asked for (a regex: the names it matched)
    rank_pattern: dict = field(default_factory=dict, metadata=PER_LAYER)  # layer name or suffix pattern -> r
    alpha_pattern: dict = field(default_factory=dict, metadata=PER_LAYER)  # likewise for alpha


def add_loha(model, targets=("q_proj", "v_proj"), r=8, alpha=8, rank_pattern=None, alpha_pattern=None,
             name="default") -> int:
    """Wrap every linear that `targets` names in a LoHaLayer. Returns how many.

    Args:
        targets: module names or name suffixes ("q" for short), or one regex that whole names must match.
        r, alpha: the inner rank of each factor and the scale alpha / r (peft's defaults: 8 and 8).
        rank_pattern, alpha_pattern: {name or suffix pattern: r / alpha} for layers that differ.
        name: the adapter these layers belong to.
    """
    if not isinstance(r, int) or r <= 0:
        raise BadInput(f"r: expected a positive integer rank, got {r!r}")
    slots, asked = linears_named(model, targets, every_name_must_match=True)
    settings = LoHaSettings(r, alpha, asked, dict(rank_pattern or {}), dict(alpha_pattern or {}))
    attach(model, name, settings, slots, lambda slot, base: LoHaLayer(
        base, pattern_value(settings.rank_pattern, slot, r), pattern_value(settings.alpha_pattern, slot, alpha)))
    return len(slots)
