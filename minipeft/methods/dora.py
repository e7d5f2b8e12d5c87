"""DoRA: LoRA that learns each output row's length apart from its direction (a LoRA option, `use_dora`).

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation".

    W' = m ⊙ (W + s B A) / ||W + s B A||_row       s = alpha / r; m (out,) learned, starting at ||W||_row

    so, with the base output W x already computed:
    y = W' x = (m / n) ⊙ (W x + s B A x),   n = ||W + s B A||_row with B A detached (the paper's section 4.3:
                                            the norm changes with B A but passes it no gradient)

    x ─┬─► base_layer (frozen W) ─► W x ──────────────────────┐
       │                                                    (+) ─► x (m / n) ─► y
       └─► dropout ─► A ─► B ─► x s ─► s B A x ─────────────┘        (n: row norms of W + s B A, no gradient)

LoRA's A and B learn the direction, m the magnitude: out more numbers per wrapped layer than LoRA, 4,096
for a 4096x4096 projection; 6,684,672 for r=8 on q, k and v of Llama-7B (LoRA's 6,291,456 + 393,216).
On a 4-bit base (QDoRA) the norm is taken of the dequantized W, as peft does.

On disk (peft's layout): LoRA's file with "use_dora": true and, per wrapped layer, one more tensor
    base_model.model.<layer name>.lora_magnitude_vector   (out,)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llama.quant import dequantize, is_4bit
from .wrappers import innermost


def full_precision_weight(base_layer) -> torch.Tensor:
    """W (out, in) as the layer computes with it: dequantized from a 4-bit base."""
    return dequantize(base_layer) if is_4bit(base_layer) else base_layer.weight


def row_norms(weight, delta, scaling) -> torch.Tensor:
    """||W + s B A|| of each output row: (out,)."""
    return torch.linalg.norm(weight + scaling * delta, dim=1)


class MagnitudeVector(nn.Module):
    """m, one length per output row, and the rescaling of a LoRA layer's output that it stands for."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        with torch.no_grad():  # B = 0 at the start, so m = ||W||: an untouched adapter changes nothing
            self.weight = nn.Parameter(torch.linalg.norm(full_precision_weight(base_layer).float(), dim=1))  # (out,)

    def forward(self, x, base_output, lora_output, layer):
        """y = (m / n) ⊙ (W x + s B A x) + bias, from the base output and the unscaled B A x of `layer`."""
        linear = innermost(layer.base_layer)  # the frozen linear, under any other adapters on it
        weight = full_precision_weight(linear).to(x.dtype)  # (out, in)
        delta = (layer.lora_B.weight @ layer.lora_A.weight).detach().to(x.dtype)  # B A: (out, in), no gradient
        scale = (self.weight / row_norms(weight, delta, layer.scaling).detach()).to(x.dtype)  # m / n: (out,)
        bias = linear.bias
        without_bias = base_output if bias is None else base_output - bias
        if layer.dropout_is_on():  # W x must see the same dropped-out x as the side path, as in peft
            without_bias = F.linear(x, weight)
        y = (scale - 1) * without_bias + scale * layer.scaling * lora_output
        return base_output + y.to(base_output.dtype)

    @torch.no_grad()
    def merge(self, weight, delta) -> torch.Tensor:
        """W' = (m / n) ⊙ (W + s B A): the (out, in) weight that computes what the layer does. n is kept."""
        self.norms_at_merge = torch.linalg.norm(weight + delta, dim=1)  # (out,)
        return (self.weight / self.norms_at_merge)[:, None] * (weight + delta)

    @torch.no_grad()
    def unmerge(self, merged, delta) -> torch.Tensor:
        """W = W' n / m - s B A."""
        return merged * (self.norms_at_merge / self.weight)[:, None] - delta
