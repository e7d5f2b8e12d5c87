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

from ..llama.quant import dequantize, is_4bit
from .contract import innermost, matmul_input
from .lora import LoRALayer, add_lora


class MagnitudeVector(nn.Module):
    """m: one learned length per output row, (out,). B = 0 at the start, so m = ||W||_row: an untouched
    adapter changes nothing."""

    def __init__(self, norms: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norms.clone())


class DoRALayer(LoRALayer):
    trainable_names = (*LoRALayer.trainable_names, "lora_magnitude_vector.weight")
    use_dora = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora=False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        linear = innermost(base_layer)  # the frozen linear, under any other adapters on it
        with torch.no_grad():
            W = dequantize(linear).float() if is_4bit(linear) else linear.weight.float()  # (out, in): this once
            self.register_buffer("weight_norms_squared", (W * W).sum(1), persistent=False)  # ||W||^2 by rows: (out,)
        self.lora_magnitude_vector = MagnitudeVector(self.weight_norms_squared.sqrt())  # m: (out,)
        self.register_buffer("norms_at_merge", None, persistent=False)  # n, kept by merge() for unmerge()

    def adapt_output(self, x, y):
        """y = (m / n) ⊙ (W x + s B A x) + bias, from the wrapped layer's output y = W x + bias. With dropout, in
        training, W x is recomputed from the dropped-out x, as peft does."""
        x = self.dropout(matmul_input(x, self.lora_A.weight))
        linear = innermost(self.base_layer)  # the frozen linear, under any other adapters on it
        bias = 0 if linear.bias is None else linear.bias
        Wx = y - bias  # W x: (..., out)
        if self.training and isinstance(self.dropout, nn.Dropout):  # W x from the dropped-out x too
            Wx = linear(x) - bias
        scale = self.lora_magnitude_vector.weight / self.row_norms()  # m / n: (out,)
        update = self.lora_B(self.lora_A(x))  # B A x: (..., out)
        return y + ((scale - 1) * Wx + scale * self.scaling * update).to(y.dtype)

    @torch.no_grad()  # the paper's section 4.3: n changes with B A but passes it no gradient
    def row_norms(self) -> torch.Tensor:
        """n = ||W + s B A||_row (out,), without W: n^2 = ||W||^2 + 2 s rowsum(B ⊙ W A^T) + s^2 ||B A||^2 by
        rows, where W A^T is the frozen linear applied to A's r rows: no full-precision copy of a 4-bit W is made."""
        linear = innermost(self.base_layer)
        A, B, s = self.lora_A.weight, self.lora_B.weight, self.scaling  # (r, in), (out, r)
        with torch.autocast(A.device.type, enabled=False):
            WAt = (linear(A) - (0 if linear.bias is None else linear.bias)).T.float()  # (out, r)
        BA = B @ A  # (out, in)
        squared = self.weight_norms_squared + 2 * s * (B * WAt).sum(1) + s * s * (BA * BA).sum(1)  # (out,)
        return squared.clamp_min(0).sqrt()

    def folded(self, weight, sign: int) -> torch.Tensor:
        """W' = (m / n) ⊙ (W + s B A), keeping n; and back: W = W' n / m - s B A."""
        delta, m = self.delta_weight().float(), self.lora_magnitude_vector.weight
        if sign > 0:
            self.norms_at_merge = torch.linalg.norm(weight + delta, dim=1)  # n: (out,)
            return (m / self.norms_at_merge)[:, None] * (weight + delta)
        return weight * (self.norms_at_merge / m)[:, None] - delta


def add_dora(model, targets=("q_proj", "k_proj", "v_proj"), r=8, alpha=16, dropout=0.0, rank_pattern=None,
             alpha_pattern=None, use_rslora=False, name="default") -> int:
    """add_lora's arguments (lora.py), with DoRALayers: peft's LoRA with use_dora. Returns how many."""
    return add_lora(model, targets, r, alpha, dropout, rank_pattern, alpha_pattern, use_rslora, name, layer=DoRALayer)
