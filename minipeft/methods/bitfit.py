"""BitFit: train only the biases (and, optionally, the norms' gains); every weight matrix stays frozen.

Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models".

    y = W x + b          W frozen, b trained (zero at the start)
    Llama's linears have no biases, so BitFit here adds them:

    x ─► base_layer (frozen W) ─► (+) beft_bias (1, out), zero at first ─► y

    rms_norm(x) * g      optionally g too: a trainable copy of each norm's gain, starting at its value

Trains the output width of every wrapped linear: (3 x 4096 + 4096 + 2 x 11008 + 4096) x 32 = 1,359,872
on Llama-7B for all seven linears of every block (0.02% of 6.7B), plus 266,240 for the norms' gains.

On disk (peft's layout, method BEFT): adapter_config.json {"peft_type": "BEFT", "target_modules",
"modules_to_save": the norms, or null} and per wrapped linear base_model.model.<layer name>.beft_bias
(1, out); per trained norm base_model.model.<norm name>.weight (D,), as peft's modules_to_save writes it.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import BadInput
from .contract import Mergeable, Wrapper, attach, innermost, linears_named

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "model.norm")  # name suffixes: the norms whose gains train


class LinearWithLearnedBias(Wrapper, Mergeable):
    trainable_names = ("beft_bias",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        linear = innermost(base_layer)  # the frozen linear, under any other adapters on it
        self.beft_bias = nn.Parameter(torch.zeros(1, linear.out_features, device=linear.weight.device))

    def adapt_output(self, x, y):
        return y + self.beft_bias.flatten().to(y.dtype)  # W x + b

    @classmethod
    def prepare_export(cls, model, config: dict) -> dict:
        """Llama's linears have no biases to fold into: give a group's linears zero biases (config.json's
        attention_bias, mlp_bias) where any of them has a learned one."""
        groups = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp_bias": ("gate_proj", "up_proj", "down_proj")}
        slot = lambda name: name.replace(".base_layer", "").rsplit(".", 1)[-1]  # q_proj, ..., lora_A, ...
        biased = [slot(name) for name, m in model.named_modules() if isinstance(m, cls)]
        for key, members in groups.items():
            if any(name in members for name in biased):
                config[key] = True
                for name, module in model.named_modules():
                    if isinstance(module, nn.Linear) and slot(name) in members and module.bias is None:
                        module.bias = nn.Parameter(torch.zeros(module.out_features))
        return config

    def fold(self, sign: int) -> float:
        if self.base_layer.bias is None:
            raise BadInput("merge: BitFit's biases need a bias in the base layer to fold into, and this Llama's "
                           "linears have none; keep the adapter unmerged")
        self.base_layer.bias += sign * self.beft_bias.flatten().to(self.base_layer.bias.dtype)
        return 0.0


class NormWithLearnedGain(Wrapper, Mergeable):
    """The frozen norm's own computation, with a trainable copy of its gain in place of the frozen one."""
    trainable_names, wrapped = ("weight",), "base_norm"

    def __init__(self, base_norm: nn.Module):
        super().__init__()
        self.base_norm = base_norm
        self.weight = nn.Parameter(innermost(base_norm).weight.detach().clone().float())  # (D,): the base's gain
        self.register_buffer("frozen_gain", None, persistent=False)  # the base's, kept by merge() for unmerge()

    def forward(self, x):
        if self.enabled and self.rows is None and not self.merged:  # every row is this adapter's: the frozen
            return self.adapt_output(x, None)                      # norm's output would not be used
        return super().forward(x)

    def adapt_output(self, x, y):
        return functional_call(innermost(self), {"weight": self.weight}, (x,))  # rms_norm(x) * g, g trained

    def fold(self, sign: int) -> float:
        if sign > 0:
            self.frozen_gain = self.base_norm.weight.clone()
        self.base_norm.weight.copy_(self.weight if sign > 0 else self.frozen_gain)
        return 0.0


@dataclass
class BitFitSettings:
    """What add_bitfit was asked for: what its adapter file is written from (formats/peft.py)."""
    targets: list = field(default_factory=list)
    norms: list | None = None


def add_bitfit(model, targets=BLOCK_LINEARS, norms=False, name="default") -> int:
    """Give every linear that `targets` names a zero bias to train (and, with `norms`, the norms' gains).
    Returns how many modules now train.

    Args:
        targets: module names or name suffixes ("v" for short), or one regex, as in peft (its Llama default
            is v_proj alone; BitFit's is every bias, so ours is all seven linears of every block).
        norms: True for the gains of input_layernorm, post_attention_layernorm and the final norm, or a list
            of name suffixes (peft's modules_to_save rule).
        name: the adapter these belong to.
    """
    linears, asked = linears_named(model, targets)
    norm_suffixes = list(NORMS) if norms is True else list(norms or [])
    chosen = [slot for slot, m in model.named_modules() if any(slot.endswith(s) for s in norm_suffixes)
              and not slot.endswith(".base_norm")]
    not_norms = [slot for slot in chosen if not hasattr(innermost(model.get_submodule(slot)), "eps")]
    if not_norms or (norm_suffixes and not chosen):
        raise BadInput(f"modules_to_save / norms: {norm_suffixes} should name RMSNorm modules only; "
                       f"they match {not_norms or 'nothing'}")
    attach(model, name, BitFitSettings(asked, norm_suffixes or None), linears + chosen,
           lambda slot, base: LinearWithLearnedBias(base) if slot in linears else NormWithLearnedGain(base))
    return len(linears) + len(chosen)
