"""IA3: learned vectors that rescale a few activations; the whole model stays frozen.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
("Infused Adapter by Inhibiting and Amplifying Inner Activations").

    attention:  k = l_k ⊙ (W_k x)       v = l_v ⊙ (W_v x)         one number per output feature
    MLP:        y = W_down (l_ff ⊙ h)   h = silu(gate(x)) * up(x)  one number per input feature

    x ─► base_layer (frozen W) ─► ⊙ ia3_l (out, 1) ─► y          (k_proj, v_proj: "output" layers)
    x ─► ⊙ ia3_l (1, in) ─► base_layer (frozen W) ─► y          (down_proj: a "feedforward" layer)

The vectors start at ones, so an untouched adapter changes nothing. Trains kv_dim + kv_dim + intermediate
numbers per layer: (4096 + 4096 + 11008) x 32 = 614,400 on Llama-7B (0.009% of 6.7B). merge() folds them
into W (rows for output layers, columns for feedforward ones); on a 4-bit base it is refused, as peft
refuses it: the scaled weight would have to be rounded to the 4-bit grid again.

On disk (peft's layout): adapter_config.json {"peft_type": "IA3", "target_modules", "feedforward_modules",
...} and per wrapped layer base_model.model.<layer name>.ia3_l, (out, 1) or (1, in).
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import BadInput
from ..llama.quant import is_4bit
from .contract import SHORT_NAMES, Mergeable, Wrapper, attach, innermost, linears_named


class IA3Layer(Wrapper, Mergeable):
    """l ⊙ (W x): one learned number per output feature (k_proj, v_proj)."""
    trainable_names = ("ia3_l",)
    scales_bias = True  # W x + b is scaled as a whole

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        linear = innermost(base_layer)  # the frozen linear, under any other adapters on it
        self.ia3_l = nn.Parameter(torch.ones(self.shape(linear), device=linear.weight.device))  # ones: no change

    def shape(self, linear):
        return (linear.out_features, 1)  # (out, 1)

    def adapt_output(self, x, y):
        return y * self.ia3_l.flatten()  # l ⊙ (W x)

    def fold(self, sign: int) -> float:
        """W <- diag(l) W, and back; an output layer's bias is scaled too. Refused on a 4-bit base."""
        if is_4bit(self.base_layer):
            raise BadInput("merge: IA3 on a 4-bit base cannot be folded into the weight without rounding it to "
                           "the 4-bit grid again; keep the adapter unmerged")
        by = self.ia3_l if sign > 0 else 1 / self.ia3_l
        weight = self.base_layer.weight
        weight.copy_((weight.float() * by).to(weight.dtype))  # (out, in) * (out, 1) or (1, in)
        if self.scales_bias and self.base_layer.bias is not None:
            self.base_layer.bias.copy_(self.base_layer.bias * by.flatten())
        return 0.0


class IA3FeedforwardLayer(IA3Layer):
    """W (l ⊙ x): one learned number per input feature (down_proj, a "feedforward" layer)."""
    scales_bias = False  # the bias is added after W (l ⊙ x): untouched

    def shape(self, linear):
        return (1, linear.in_features)  # (1, in)

    def adapt_input(self, x):
        return x.to(self.ia3_l.dtype) * self.ia3_l.flatten()  # l ⊙ x, then the frozen W

    def adapt_output(self, x, y):
        return y  # W (l ⊙ x) is the whole formula: the output passes as it is


@dataclass
class IA3Settings:
    """What add_ia3 was asked for: what its adapter file is written from (formats/peft.py)."""
    targets: list = field(default_factory=list)
    feedforward: list = field(default_factory=list)


def add_ia3(model, targets=("k_proj", "v_proj", "down_proj"), feedforward=None, name="default") -> int:
    """Wrap every linear that `targets` names in an IA3Layer (peft's Llama defaults). Returns how many.

    Args:
        targets: module names or name suffixes ("k" for short), or one regex, as in peft.
        feedforward: those of the targets whose input is scaled instead of their output; by default the
            down projection, if it is a target (peft's Llama default, and the paper's l_ff).
        name: the adapter these layers belong to.
    """
    layers, asked = linears_named(model, targets)
    if feedforward is None:
        feedforward = ["down_proj"] if any(layer.endswith("down_proj") for layer in layers) else []
    feedforward = [SHORT_NAMES.get(t, t) for t in feedforward]
    outside = [f for f in feedforward if not any(layer.endswith(f) for layer in layers)]
    if outside:
        raise BadInput(f"feedforward: {outside} are not among the wrapped targets {targets!r}")
    is_feedforward = lambda layer: any(layer.endswith(f) for f in feedforward)  # a plain suffix, as in the file
    attach(model, name, IA3Settings(asked, feedforward), layers,
           lambda layer, base: IA3FeedforwardLayer(base) if is_feedforward(layer) else IA3Layer(base))
    return len(layers)
