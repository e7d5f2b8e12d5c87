"""Bottleneck adapters: a small down-project / non-linearity / up-project block with a skip connection,
inserted after the attention and after the MLP of every layer; the whole model stays frozen.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; the MLP-only placement is Pfeiffer
et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning".

    h = o_proj(attention)        (D)                   h = down_proj(SwiGLU)      (D)
    h + up(act(down(h)))         D ─► m ─► D           h + up(act(down(h)))
        └ then the block's residual add, as before

    adapter(h) = h + W_up act(W_down h + b_down) + b_up     W_down (m, D), W_up (D, m)

W_up and b_up start at zero, so an untouched adapter changes nothing. The adapter sits right after the
layer it wraps (o_proj, down_proj), before the residual add, where Houlsby places it. Houlsby trains
2 x layers x (2 D m + D + m) numbers: 2 x 32 x (2 x 4096 x 64 + 4096 + 64) = 33,820,672 on Llama-7B at
m = 64 (0.5% of 6.7B); Pfeiffer half that. It cannot be merged: the non-linearity keeps it a layer of
its own, which is also why it adds latency at small batch sizes (the "disadvantages" in the lecture notes
"Parameter-Efficient Fine-tuning").

On disk: minipeft's own format (peft has no bottleneck adapters, and says so when it is given this
file): adapter_config.json {"peft_type": "BOTTLENECK", "placement": "houlsby" | "pfeiffer",
"bottleneck_size": m, "non_linearity", "format": ...} and per wrapped layer
    base_model.model.<layer name>.adapter_down.weight (m, D), .adapter_down.bias (m,)
    base_model.model.<layer name>.adapter_up.weight (D, m), .adapter_up.bias (D,)
"""

from dataclasses import dataclass

import torch.nn as nn

from ..errors import BadInput
from .contract import Wrapper, attach, innermost, linears_named, matmul_input

PLACEMENTS = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}  # after attention and/or the MLP
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(Wrapper):
    trainable_names = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

    def __init__(self, base_layer: nn.Module, bottleneck_size: int, non_linearity: str):
        super().__init__()
        self.base_layer = base_layer
        linear = innermost(base_layer)  # the frozen linear, under any other adapters on it
        D, device = linear.out_features, linear.weight.device
        self.adapter_down = nn.Linear(D, bottleneck_size, device=device)  # W_down (m, D), b_down (m,)
        self.non_linearity = NON_LINEARITIES[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck_size, D, device=device)  # W_up (D, m), b_up (D,)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def adapt_output(self, x, h):
        """h + up(act(down(h))), from the wrapped layer's output h (..., D)."""
        update = self.adapter_up(self.non_linearity(self.adapter_down(matmul_input(h, self.adapter_down.weight))))
        return h + update.to(h.dtype)  # (..., D): the skip connection around the bottleneck


@dataclass
class BottleneckSettings:
    """What add_bottleneck_adapters was asked for: what its adapter file is written from (formats/bottleneck.py)."""
    placement: str
    bottleneck_size: int
    non_linearity: str


def add_bottleneck_adapters(model, bottleneck_size=64, placement="houlsby", non_linearity="relu",
                            name="default") -> int:
    """Put an adapter after every layer's attention and MLP ("houlsby") or its MLP alone ("pfeiffer").
    Returns how many.

    Args:
        bottleneck_size: m, the width of the bottleneck (the lecture notes' "dim").
        non_linearity: one of relu, gelu, silu, tanh.
        name: the adapter these belong to.
    """
    if placement not in PLACEMENTS:
        raise BadInput(f"placement: expected one of {tuple(PLACEMENTS)}, got {placement!r}")
    if non_linearity not in NON_LINEARITIES:
        raise BadInput(f"non_linearity: expected one of {tuple(NON_LINEARITIES)}, got {non_linearity!r}")
    if not isinstance(bottleneck_size, int) or bottleneck_size <= 0:
        raise BadInput(f"bottleneck_size: expected a positive integer, got {bottleneck_size!r}")
    layers, _ = linears_named(model, list(PLACEMENTS[placement]), argument=f"placement {placement!r}")
    attach(model, name, BottleneckSettings(placement, bottleneck_size, non_linearity), layers,
           lambda _, base: BottleneckAdapter(base, bottleneck_size, non_linearity))
    return len(layers)
