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
from typing import ClassVar

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import MiniPeftError, refuse_unhonoured, require
from .wrappers import PEFT_PREFIX, SHORT_NAMES, freeze_base, linear_names, record_settings, target_matches, wrap

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "model.norm")  # suffixes, as peft's modules_to_save
PEFT_READ = ("target_modules", "modules_to_save")
PEFT_NOT_MATH = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "init_weights")


class LinearWithLearnedBias(nn.Module):
    trainable_names, wrapped = ("beft_bias",), "base_layer"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.beft_bias = nn.Parameter(torch.zeros(1, base_layer.out_features, device=base_layer.weight.device))
        self.merged, self.enabled = False, True

    def forward(self, x):
        y = self.base_layer(x)  # (..., out)
        if self.merged or not self.enabled:
            return y
        return y + self.beft_bias.flatten().to(y.dtype)

    @torch.no_grad()
    def merge(self) -> float:
        if self.base_layer.bias is None:
            raise MiniPeftError("merge: BitFit's biases need a bias in the base layer to fold into, and this Llama's "
                                "linears have none; keep the adapter unmerged")
        if not self.merged:
            self.base_layer.bias += self.beft_bias.flatten().to(self.base_layer.bias.dtype)
        self.merged = True
        return 0.0

    @torch.no_grad()
    def unmerge(self) -> float:
        if self.merged:
            self.base_layer.bias -= self.beft_bias.flatten().to(self.base_layer.bias.dtype)
        self.merged = False
        return 0.0


class NormWithLearnedGain(nn.Module):
    """The frozen norm's own computation, with a trainable copy of its gain in place of the frozen one."""
    trainable_names, wrapped = ("weight",), "base_norm"

    def __init__(self, base_norm: nn.Module):
        super().__init__()
        self.base_norm = base_norm
        self.weight = nn.Parameter(base_norm.weight.detach().clone().float())  # (D,), starts as the base's gain
        self.merged, self.enabled = False, True

    def forward(self, x):
        if self.merged or not self.enabled:
            return self.base_norm(x)
        return functional_call(self.base_norm, {"weight": self.weight}, (x,))

    @torch.no_grad()
    def merge(self) -> float:
        if not self.merged:
            self.frozen_gain = self.base_norm.weight.clone()
            self.base_norm.weight.copy_(self.weight)
        self.merged = True
        return 0.0

    @torch.no_grad()
    def unmerge(self) -> float:
        if self.merged:
            self.base_norm.weight.copy_(self.frozen_gain)
        self.merged = False
        return 0.0


@dataclass
class BitFitSettings:
    """What add_bitfit was asked for; saved as peft's BeftConfig."""
    peft_type: ClassVar[str] = "BEFT"
    targets: list = field(default_factory=list)
    norms: list | None = None


def add_bitfit(model, targets=BLOCK_LINEARS, norms=False) -> int:
    """Give every linear that `targets` names a zero bias to train (and, with `norms`, the norms' gains).
    Returns how many modules now train.

    Args:
        targets: module names or name suffixes ("v" for short), or one regex, as in peft (its Llama default
            is v_proj alone; BitFit's is every bias, so ours is all seven linears of every block).
        norms: True for the gains of input_layernorm, post_attention_layernorm and the final norm, or a list
            of name suffixes (peft's modules_to_save rule).
    """
    targets = targets if isinstance(targets, str) else [SHORT_NAMES.get(t, t) for t in targets]
    linears = [name for name in linear_names(model) if target_matches(name, targets)]
    if not linears:
        raise MiniPeftError(f"targets: {targets!r} matches no linear in the model")
    norm_suffixes = list(NORMS) if norms is True else list(norms or [])
    chosen = [name for name, _ in model.named_modules() if name and any(name.endswith(s) for s in norm_suffixes)]
    not_norms = [name for name in chosen if not hasattr(model.get_submodule(name), "eps")]
    if not_norms or (norm_suffixes and not chosen):
        raise MiniPeftError(f"modules_to_save / norms: {norm_suffixes} should name RMSNorm modules only; "
                            f"they match {not_norms or 'nothing'}")
    for name in linears:
        wrap(model, name, LinearWithLearnedBias)
    for name in chosen:
        wrap(model, name, NormWithLearnedGain)
    record_settings(model, BitFitSettings(sorted(linears) if isinstance(targets, str) else list(targets),
                                          norm_suffixes or None))
    freeze_base(model)
    return len(linears) + len(chosen)


# ---- the adapter file, in peft's layout ------------------------------------------------------------------

def to_peft(model, settings: BitFitSettings) -> tuple[dict, dict]:
    config = {"peft_type": "BEFT", "task_type": "CAUSAL_LM", "target_modules": settings.targets,
              "modules_to_save": settings.norms, "init_weights": True}
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLearnedBias):
            tensors[f"{PEFT_PREFIX}{name}.beft_bias"] = module.beft_bias
        elif isinstance(module, NormWithLearnedGain):
            tensors[f"{PEFT_PREFIX}{name}.weight"] = module.weight
    return config, tensors


def from_peft(model, config: dict, source) -> dict:
    refuse_unhonoured(config, PEFT_READ, PEFT_NOT_MATH, {}, source)
    targets = require(config, "target_modules", (list, str), source)
    norms = require(config, "modules_to_save", list, source) if config.get("modules_to_save") is not None else None
    try:
        add_bitfit(model, targets, norms)
    except MiniPeftError as e:
        raise MiniPeftError(f"{source}: {e}") from None
    return to_peft(model, model.peft_settings["BEFT"])[1]
