"""LoKr: the update to a frozen linear is the Kronecker product of two small matrices, either of them low-rank.

Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter", made a weight's update a
Kronecker product; LyCORIS (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning
to Model Evaluation") added low-rank factors, and peft's LoKr is LyCORIS's:

    out = a b, in = c d  (peft's factorization: a <= b, c <= d, near the square roots, or a = c = decompose_factor)
    ΔW = (alpha / r) W1 ⊗ W2        W1 (a, c)    W2 (b, d)    (out, in) = (a b, c d)
    W2 = W2a W2b, (b, r)(r, d), where r < max(b, d) / 2; W1 = W1a W1b likewise, with decompose_both
    y  = W x + ΔW x

    x ─┬─► base_layer (frozen W, full precision or 4-bit) ────────────────────────┐
       │                                                                         (+) ─► y
       └─► ΔW = (alpha / r) W1 ⊗ W2, built each forward (out, in) ─► ΔW x ──────┘

    W1 ⊗ W2 = [ W1[0,0] W2   W1[0,1] W2   ... ]      block (i, j) of ΔW is W1[i, j] W2: W1 says how much
              [ W1[1,0] W2   ...              ]      of one small pattern W2 each of the a x c blocks gets

W1 starts at zero (W1a, where it is low-rank) and W2 kaiming-uniform (peft's init_weights=True), so an untouched
adapter changes nothing. For a 4096 x 4096 projection at r=8: a = c = b = d = 64, W1 (64, 64) whole and W2 = W2a
W2b, 64 x 8 + 8 x 64: 5,120 numbers a layer (LoRA's: 65,536), for a ΔW whose rank can reach 64 x 8 = 512. As peft,
ΔW is built in full at every forward. merge() folds it into W (contract.FoldsIntoWeight).

On disk (peft's layout): adapter_config.json {"peft_type": "LOKR", "r", "alpha", "target_modules", "decompose_both",
"decompose_factor", "rank_pattern", "alpha_pattern", ...} and per wrapped layer base_model.model.<layer name>.lokr_w1
(a, c) or .lokr_w1_a (a, r) and .lokr_w1_b (r, c); .lokr_w2 (b, d) or .lokr_w2_a (b, r) and .lokr_w2_b (r, d).
peft's rank and module dropouts (random, during training only) are not built: a file that sets one is refused.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import (PER_LAYER, FoldsIntoWeight, Wrapper, attach, innermost, linears_named, matmul_input,
                       pattern_value)

INITS = (True, False, "lycoris")  # peft's init_weights: W1 = 0 (True), W2 = 0 ("lycoris"), or both random (False)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (LyCORIS's) split of a dimension into m <= n with m n = dimension: m = factor where it divides,
    else the divisor pair nearest the square root with m at most `factor` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > 1 + dimension or new_m > factor:  # peft's bound: the first pair's sum
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


class LoKrLayer(Wrapper, FoldsIntoWeight):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, decompose_both=False, factor=-1, init=True):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        linear = innermost(base_layer)  # the frozen linear (under other adapters, when several share it)
        (a, b), (c, d) = factorization(linear.out_features, factor), factorization(linear.in_features, factor)
        empty = lambda *shape: nn.Parameter(torch.empty(*shape, device=linear.weight.device))
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = empty(a, r), empty(r, c)
        else:
            self.lokr_w1 = empty(a, c)
        if r < max(b, d) / 2:
            self.lokr_w2_a, self.lokr_w2_b = empty(b, r), empty(r, d)
        else:
            self.lokr_w2 = empty(b, d)
        self.trainable_names = tuple(name for name, _ in self.named_parameters(recurse=False))
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init]
        for name in self.trainable_names:  # one factor (or one half of it) zero: ΔW = 0 at the start
            if name in zero:
                nn.init.zeros_(getattr(self, name))
            else:
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))

    def factor(self, which: str) -> torch.Tensor:
        """W1 or W2: whole, or the product of its two low-rank halves."""
        whole = f"lokr_{which}"
        return getattr(self, whole) if whole in self.trainable_names else (getattr(self, f"{whole}_a")
                                                                          @ getattr(self, f"{whole}_b"))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) W1 ⊗ W2: (out, in)."""
        return self.scaling * torch.kron(self.factor("w1"), self.factor("w2"))

    def adapt_output(self, x, y):
        """y + ΔW x, from the wrapped layer's output y = W x."""
        delta = self.delta_weight()
        return y + (matmul_input(x, delta) @ delta.T).to(y.dtype)


@dataclass
class LoKrSettings:
    """What add_lokr was asked for: what its adapter file is written from (formats/peft.py)."""
    r: int = field(metadata=PER_LAYER)  # PER_LAYER: a later add_lokr may give its layers others
    alpha: float = field(metadata=PER_LAYER)
    targets: list = field(default_factory=list)
    rank_pattern: dict = field(default_factory=dict, metadata=PER_LAYER)
    alpha_pattern: dict = field(default_factory=dict, metadata=PER_LAYER)
    decompose_both: bool = False
    decompose_factor: int = -1


def add_lokr(model, targets=("q_proj", "v_proj"), r=8, alpha=8, decompose_both=False, decompose_factor=-1,
             rank_pattern=None, alpha_pattern=None, init=True, name="default") -> int:
    """Wrap every linear that `targets` names in a LoKrLayer. Returns how many.

    Args:
        targets: module names or name suffixes ("q" for short), or one regex that whole names must match.
        r, alpha: the rank of the low-rank factor(s) and the scale alpha / r (peft's defaults: 8 and 8).
        decompose_both: W1 low-rank too, where r is small enough.
        decompose_factor: a and c, where it divides the dimensions (-1: near the square roots).
        rank_pattern, alpha_pattern: {name or suffix pattern: r / alpha} for layers that differ.
        init: which factor starts at zero: True (W1, peft's default), "lycoris" (W2), False (none: a random ΔW).
        name: the adapter these layers belong to.
    """
    if not isinstance(r, int) or r <= 0:
        raise BadInput(f"r: expected a positive integer rank, got {r!r}")
    if init not in INITS or isinstance(init, int) and not isinstance(init, bool):
        raise BadInput(f"init: expected one of {INITS}, got {init!r}")
    if not isinstance(decompose_factor, int) or decompose_factor == 0 or decompose_factor < -1:
        raise BadInput(f"decompose_factor: expected -1 or a positive integer, got {decompose_factor!r}")
    slots, asked = linears_named(model, targets, every_name_must_match=True)
    settings = LoKrSettings(r, alpha, asked, dict(rank_pattern or {}), dict(alpha_pattern or {}), decompose_both,
                            decompose_factor)
    attach(model, name, settings, slots, lambda slot, base: LoKrLayer(
        base, pattern_value(settings.rank_pattern, slot, r), pattern_value(settings.alpha_pattern, slot, alpha),
        decompose_both, decompose_factor, init))
    return len(slots)
