"""LoRA: a frozen linear plus a trainable low-rank side path.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".

    x ─┬─► base_layer (frozen W, full precision or 4-bit) ──────────────┐
       │                                                               (+) ─► y = W x + (alpha / r) B A x
       └─► dropout ─► A (in ─► r) ─► B (r ─► out) ─► x (alpha / r) ──┘

A starts kaiming-uniform and B at zero, so an untouched adapter changes nothing. Only A and B train:
r x (in + out) numbers per wrapped layer, 65,536 for a 4096x4096 projection at r=8 (0.4% of it);
6,291,456 for r=8 on q, k and v of Llama-7B's 32 layers. On a 4-bit base this is QLoRA (Dettmers et
al. 2023). merge() folds B A into W for inference. `use_dora` adds DoRA's magnitude vector (dora.py).

On disk (peft's layout): adapter_config.json {"peft_type": "LORA", "r", "lora_alpha", "target_modules",
"lora_dropout", "rank_pattern", "alpha_pattern", "use_dora", ...} and per wrapped layer
    base_model.model.<layer name>.lora_A.weight   (r, in)
    base_model.model.<layer name>.lora_B.weight   (out, r)
    base_model.model.<layer name>.lora_magnitude_vector   (out,), with DoRA
"""

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import MiniPeftError, refuse_unhonoured, require, require_mapping
from ..llama.quant import dequantize, is_4bit, requantize_
from .dora import MagnitudeVector
from .wrappers import (PEFT_PREFIX, SHORT_NAMES, adapters_named, check_free, freeze_base, in_rows, innermost,
                       linear_names, pattern_value, record_settings, target_matches, wrap)

# Every key of peft's LoraConfig: honoured, without effect on the math of a trained adapter, or refused
# unless it has the value shown.
PEFT_READ = ("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
             "use_dora")
PEFT_NOT_MATH = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                 "runtime_config", "megatron_core", "qalora_group_size")
PEFT_ONLY_DEFAULT = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False,
                     "use_qalora": False, "ensure_weight_tying": False, "exclude_modules": None,
                     "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                     "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
                     "megatron_config": None, "velora_config": None, "alora_invocation_tokens": None,
                     "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None}


class LoRALayer(nn.Module):
    trainable_names, wrapped = ("lora_A.weight", "lora_B.weight"), "base_layer"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora=False,
                 use_dora=False):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r  # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r)
        linear = innermost(base_layer)  # the frozen linear (under other adapters, when several share it)
        self.lora_A = nn.Linear(linear.in_features, r, bias=False, device=linear.weight.device)  # A: (r, in)
        self.lora_B = nn.Linear(r, linear.out_features, bias=False, device=linear.weight.device)  # B: (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = MagnitudeVector(linear) if use_dora else None  # DoRA's m: (out,)
        if use_dora:
            self.trainable_names = (*self.trainable_names, "lora_magnitude_vector.weight")
        self.merged, self.enabled, self.adapter_name, self.rows = False, True, "default", None

    def dropout_is_on(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def forward(self, x):
        y = self.base_layer(x)  # (..., out)
        if self.merged and self.training and torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
            raise MiniPeftError("LoRA: this adapter is merged into its base weight, so training A and B would change "
                                "nothing; unmerge() before training")
        return y if self.merged else in_rows(self, x, y, self.adapt)  # in the rows this adapter serves

    def adapt(self, x, y):
        """y + (alpha / r) B A x, from the wrapped layer's output y."""
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(x))  # B A x: (..., out)
        if self.lora_magnitude_vector is not None:  # DoRA: rescale each output row to its learned length
            return self.lora_magnitude_vector(x, y, update, self)
        return y + (self.scaling * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: the (out, in) update this adapter adds to W."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merge(self) -> float:
        """W <- W + (alpha/r) B A. Returns the max abs rounding error (0 unless the base is 4-bit)."""
        return self.fold(+1) if not self.merged else 0.0

    def unmerge(self) -> float:
        """W <- W - (alpha/r) B A. On a 4-bit base this re-quantizes, so W comes back only approximately."""
        return self.fold(-1) if self.merged else 0.0

    @torch.no_grad()
    def fold(self, sign: int) -> float:
        weight = dequantize(self.base_layer).float() if is_4bit(self.base_layer) else self.base_layer.weight.float()
        delta, dora = self.delta_weight().float(), self.lora_magnitude_vector
        if dora is None:
            weight = weight + sign * delta
        else:  # DoRA: W' = (m / n) (W + s B A), and back
            weight = dora.merge(weight, delta) if sign > 0 else dora.unmerge(weight, delta)
        if is_4bit(self.base_layer):  # re-quantize: rounds to the 4-bit grid again
            error = requantize_(self.base_layer, weight)
        else:
            self.base_layer.weight.copy_(weight.to(self.base_layer.weight.dtype))
            error = 0.0
        self.merged = sign > 0
        return error


@dataclass
class LoRASettings:
    """What add_lora was asked for; saved as peft's LoraConfig."""
    peft_type: ClassVar[str] = "LORA"
    r: int
    alpha: float
    dropout: float
    targets: list | str = field(default_factory=list)  # names or name suffixes, or one full-match regex
    rank_pattern: dict = field(default_factory=dict)  # layer name or suffix pattern -> r, where it differs from r
    alpha_pattern: dict = field(default_factory=dict)  # likewise for alpha
    use_rslora: bool = False
    use_dora: bool = False


def add_lora(model, targets=("q_proj", "k_proj", "v_proj"), r=8, alpha=16, dropout=0.0,
             rank_pattern=None, alpha_pattern=None, use_rslora=False, use_dora=False, name="default") -> int:
    """Wrap every linear that `targets` names in a LoRALayer. Returns how many.

    Args:
        targets: module names or name suffixes ("q_proj", or "q" for short), or one regex that whole
            names must match, as in peft.
        rank_pattern, alpha_pattern: {name or suffix pattern: r / alpha} for layers that differ.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        use_dora: DoRA, a learned length for every output row (dora.py).
        name: the adapter these layers belong to (several can share a base: minipeft.set_adapter).
    Call it again with other targets to give them their own r and alpha (one dropout for all, as in
    peft's file).
    """
    if not isinstance(r, int) or r <= 0:
        raise MiniPeftError(f"r: expected a positive integer rank, got {r!r}")
    if not 0 <= dropout < 1:
        raise MiniPeftError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    candidates = linear_names(model)
    if not isinstance(targets, str):
        targets = [SHORT_NAMES.get(t, t) for t in targets]
        unknown = [t for t in targets if not any(target_matches(layer, [t]) for layer in candidates)]
        if unknown:
            raise MiniPeftError(f"targets: no linear named {unknown} in the model; it has "
                                f"{sorted({n.rsplit('.', 1)[-1] for n in candidates})}")
    settings = getattr(model, "peft_settings", {}).get(name, {}).get("LORA") or LoRASettings(r, alpha, dropout, [], dict(
        rank_pattern or {}), dict(alpha_pattern or {}), use_rslora, use_dora)
    if (dropout, use_rslora, use_dora) != (settings.dropout, settings.use_rslora, settings.use_dora):
        raise MiniPeftError(f"dropout / use_rslora / use_dora: {dropout} / {use_rslora} / {use_dora} differ from this "
                            f"model's other LoRA layers ({settings.dropout} / {settings.use_rslora} / "
                            f"{settings.use_dora}); peft's adapter file holds one")
    wrapped = [layer for layer in candidates if target_matches(layer, targets)]
    for layer in wrapped:
        layer_r, layer_alpha = pattern_value(rank_pattern or {}, layer, r), pattern_value(alpha_pattern or {}, layer, alpha)
        check_free(model, layer, name, LoRALayer)
        wrap(model, layer, lambda base: LoRALayer(base, layer_r, layer_alpha, dropout, use_rslora, use_dora), name)
        if pattern_value(settings.rank_pattern, layer, settings.r) != layer_r:  # a later call's own r
            settings.rank_pattern = {layer: layer_r, **settings.rank_pattern}
        if pattern_value(settings.alpha_pattern, layer, settings.alpha) != layer_alpha:
            settings.alpha_pattern = {layer: layer_alpha, **settings.alpha_pattern}
    if not wrapped:
        raise MiniPeftError(f"targets: {targets!r} matches no linear in the model")
    # what the file will say: the names asked for, or, for a regex, the names it matched
    settings.targets = sorted(set(settings.targets) | set(wrapped if isinstance(targets, str) else targets))
    record_settings(model, name, settings)
    freeze_base(model)
    return len(wrapped)


def lora_layers(model) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


# ---- the adapter file, in peft's layout ------------------------------------------------------------------

def to_peft(model, settings: LoRASettings, name="default") -> tuple[dict, dict]:
    """peft's LoraConfig and tensors for the LoRA layers of adapter `name`."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.alpha,
              "target_modules": settings.targets, "lora_dropout": settings.dropout, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              "rank_pattern": dict(settings.rank_pattern), "alpha_pattern": dict(settings.alpha_pattern),
              "use_rslora": settings.use_rslora, "use_dora": settings.use_dora}
    tensors = {}
    for slot, layer in adapters_named(model, name, LoRALayer).items():
        tensors[f"{PEFT_PREFIX}{slot}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PEFT_PREFIX}{slot}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            tensors[f"{PEFT_PREFIX}{slot}.lora_magnitude_vector"] = layer.lora_magnitude_vector.weight
    return config, tensors


def from_peft(model, config: dict, source, name="default") -> dict:
    """Wrap `model` as the LoraConfig says; return {file key: parameter} for the tensors to load."""
    refuse_unhonoured(config, PEFT_READ, PEFT_NOT_MATH, PEFT_ONLY_DEFAULT, source)
    shape = model.config
    largest = max(shape.hidden_size, shape.intermediate_size, shape.vocab_size)
    r = require(config, "r", int, source, 1, largest)
    alpha = require(config, "lora_alpha", (int, float), source, -1e9, 1e9)
    dropout = require(config, "lora_dropout", (int, float), source, 0, 0.999, default=0.0)
    ranks = require_mapping(config, "rank_pattern", int, source, largest)
    alphas = require_mapping(config, "alpha_pattern", (int, float), source, 1e9)
    use_rslora = require(config, "use_rslora", bool, source, default=False)
    use_dora = require(config, "use_dora", bool, source, default=False)
    targets = require(config, "target_modules", (list, str), source)
    named_by_list = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (named_by_list or isinstance(targets, str)):
        raise MiniPeftError(f"{source}: target_modules should be a regex or a list of module names, got {targets!r}")
    try:
        add_lora(model, targets, r, alpha, dropout, ranks, alphas, use_rslora, use_dora, name)
    except (MiniPeftError, re.error) as e:
        raise MiniPeftError(f"{source}: target_modules {targets!r} are not all modules of this model ({e})") from None
    return to_peft(model, model.peft_settings[name]["LORA"], name)[1]
