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

On disk (peft's layout, formats/peft.py): LoRA's file with "use_dora": true and, per wrapped layer, one
more tensor, base_model.model.<layer name>.lora_magnitude_vector (out,).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llama.quant import dequantize, is_4bit
from .lora import LoRALayer
from .contract import innermost


def full_precision_weight(base_layer) -> torch.Tensor:
    """W (out, in) as the layer computes with it: dequantized from a 4-bit base."""
    return dequantize(base_layer) if is_4bit(base_layer) else base_layer.weight


class MagnitudeVector(nn.Module):
    """m: one learned length per output row, (out,). B = 0 at the start, so m = ||W||_row: an untouched
    adapter changes nothing."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.linalg.norm(full_precision_weight(linear).float(), dim=1))


class DoRALayer(LoRALayer):
    trainable_names = (*LoRALayer.trainable_names, "lora_magnitude_vector.weight")

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora=False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = MagnitudeVector(innermost(base_layer))  # m: (out,)

    def adapt_output(self, x, y):
        """y = (m / n) ⊙ (W x + s B A x) + bias, from the wrapped layer's output y = W x + bias. With dropout, in
        training, W x is recomputed from the dropped-out x, as peft does."""
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        linear = innermost(self.base_layer)  # the frozen linear, under any other adapters on it
        weight = full_precision_weight(linear).to(x.dtype)  # W: (out, in)
        delta = (self.lora_B.weight @ self.lora_A.weight).detach().to(x.dtype)  # B A: (out, in), no gradient
        n = torch.linalg.norm(weight + self.scaling * delta, dim=1).detach()  # ||W + s B A||_row: (out,)
        scale = (self.lora_magnitude_vector.weight / n).to(x.dtype)  # m / n: (out,)
        base = y if linear.bias is None else y - linear.bias  # W x
        if self.training and isinstance(self.dropout, nn.Dropout):  # W x from the dropped-out x too
            base = F.linear(x, weight)
        update = self.lora_B(self.lora_A(x))  # B A x: (..., out)
        return y + ((scale - 1) * base + scale * self.scaling * update).to(y.dtype)

    def folded(self, weight, sign: int) -> torch.Tensor:
        """W' = (m / n) ⊙ (W + s B A), keeping n; and back: W = W' n / m - s B A."""
        delta, m = self.delta_weight().float(), self.lora_magnitude_vector.weight
        if sign > 0:
            self.norms_at_merge = torch.linalg.norm(weight + delta, dim=1)  # n: (out,)
            return (m / self.norms_at_merge)[:, None] * (weight + delta)
        return weight * (self.norms_at_merge / m)[:, None] - delta
