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
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import MiniPeftError, refuse_unhonoured, require
from ..llama.quant import is_4bit
from .wrappers import (PEFT_PREFIX, SHORT_NAMES, adapters_named, check_free, freeze_base, in_rows, innermost,
                       linear_names, record_settings, target_matches, wrap)

PEFT_READ = ("target_modules", "feedforward_modules")
PEFT_NOT_MATH = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "init_ia3_weights")
PEFT_ONLY_DEFAULT = {"fan_in_fan_out": False, "modules_to_save": None, "exclude_modules": None}


class IA3Layer(nn.Module):
    trainable_names, wrapped = ("ia3_l",), "base_layer"

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer, self.feedforward = base_layer, feedforward
        linear = innermost(base_layer)  # the frozen linear, under any other adapters on it
        shape = (1, linear.in_features) if feedforward else (linear.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=linear.weight.device))
        self.merged, self.enabled, self.adapter_name, self.rows = False, True, "default", None

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        if self.feedforward:  # scale the input features, in the rows this adapter serves
            return self.base_layer(in_rows(self, x, x, lambda x, _: (x.to(self.ia3_l.dtype) * self.ia3_l.flatten())))
        return in_rows(self, x, self.base_layer(x), lambda x, y: y * self.ia3_l.flatten())  # scale the outputs

    @torch.no_grad()
    def merge(self) -> float:
        """W <- W scaled (rows, or columns for a feedforward layer); an output layer's bias is scaled too."""
        if is_4bit(self.base_layer):
            raise MiniPeftError("merge: IA3 on a 4-bit base cannot be folded into the weight without rounding it to "
                                "the 4-bit grid again (peft refuses it too); keep the adapter unmerged")
        if not self.merged:
            self.rescale(self.ia3_l)
        self.merged = True
        return 0.0

    @torch.no_grad()
    def unmerge(self) -> float:
        if self.merged:
            self.rescale(1 / self.ia3_l)
        self.merged = False
        return 0.0

    def rescale(self, by):
        weight = self.base_layer.weight
        weight.copy_((weight.float() * by).to(weight.dtype))  # (out, in) * (out, 1) or (1, in)
        if not self.feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.copy_(self.base_layer.bias * by.flatten())


@dataclass
class IA3Settings:
    """What add_ia3 was asked for; saved as peft's IA3Config."""
    peft_type: ClassVar[str] = "IA3"
    targets: list = field(default_factory=list)
    feedforward: list = field(default_factory=list)


def add_ia3(model, targets=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",), name="default") -> int:
    """Wrap every linear that `targets` names in an IA3Layer (peft's Llama defaults). Returns how many.

    Args:
        targets: module names or name suffixes ("k" for short), or one regex, as in peft.
        feedforward: those of the targets whose input is scaled instead of their output.
        name: the adapter these layers belong to.
    """
    targets = targets if isinstance(targets, str) else [SHORT_NAMES.get(t, t) for t in targets]
    feedforward = [SHORT_NAMES.get(t, t) for t in feedforward]
    wrapped = [layer for layer in linear_names(model) if target_matches(layer, targets)]
    if not wrapped:
        raise MiniPeftError(f"targets: {targets!r} matches no linear in the model")
    is_feedforward = lambda layer: any(layer.endswith(f) for f in feedforward)  # peft's rule: a plain suffix
    outside = [f for f in feedforward if not any(layer.endswith(f) for layer in wrapped)]
    if outside:
        raise MiniPeftError(f"feedforward: {outside} are not among the wrapped targets {targets!r}")
    for layer in wrapped:
        check_free(model, layer, name, IA3Layer)
        wrap(model, layer, lambda base: IA3Layer(base, is_feedforward(layer)), name)
    record_settings(model, name, IA3Settings(sorted(wrapped) if isinstance(targets, str) else list(targets), feedforward))
    freeze_base(model)
    return len(wrapped)


# ---- the adapter file, in peft's layout ------------------------------------------------------------------

def to_peft(model, settings: IA3Settings, name="default") -> tuple[dict, dict]:
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": settings.targets,
              "feedforward_modules": settings.feedforward, "fan_in_fan_out": False, "modules_to_save": None,
              "init_ia3_weights": True}
    layers = adapters_named(model, name, IA3Layer)
    return config, {f"{PEFT_PREFIX}{slot}.ia3_l": layer.ia3_l for slot, layer in layers.items()}


def from_peft(model, config: dict, source, name="default") -> dict:
    refuse_unhonoured(config, PEFT_READ, PEFT_NOT_MATH, PEFT_ONLY_DEFAULT, source)
    targets = require(config, "target_modules", (list, str), source)
    feedforward = require(config, "feedforward_modules", (list, str), source, default=[])
    if isinstance(feedforward, str):  # a regex in peft: the wrapped names it matches
        feedforward = [n for n in linear_names(model) if target_matches(n, feedforward)]
    try:
        add_ia3(model, targets, feedforward, name)
    except MiniPeftError as e:
        raise MiniPeftError(f"{source}: target_modules {targets!r} do not fit this model ({e})") from None
    return to_peft(model, model.peft_settings[name]["IA3"], name)[1]
