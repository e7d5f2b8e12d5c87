"""ALoRA's file: once trained, an ALoRA adapter is a LoRA adapter with its own rank in each module, so it is
written as peft's LoRA file, which peft and minipeft both load as LoRA (read_lora).

    adapter_config.json   {"peft_type": "LORA", "r": the starting r, "lora_alpha": alpha,
                           "rank_pattern": {layer: r_i}, "alpha_pattern": {layer: s r_i}, ...}
    adapter_model.safetensors: per layer, the open ranks only: lora_A.weight (r_i, in), lora_B.weight (out, r_i)

s r_i as alpha keeps each module's scale s = alpha / r (alpha_i / r_i = s). A module that lost every rank is
written with one rank whose B column is zero (LoRA's rank is at least 1): it adds nothing, as in training.
"""

from ..methods.alora import ALoRALayer, ALoRASettings
from ..methods.placing import adapters_named
from .peft import LORA_KEYS, PREFIX, Format, read_lora


def write_alora(model, settings: ALoRASettings, name):
    ranks, alphas, tensors = {}, {}, {}
    for slot, layer in adapters_named(model, name, ALoRALayer).items():
        open_ranks = layer.open_ranks() or [0]  # a module with none: one rank of B = 0
        A, B = layer.lora_A.weight[open_ranks], layer.lora_B.weight[:, open_ranks] * layer.lora_gate[open_ranks]
        tensors[f"{PREFIX}{slot}.lora_A.weight"], tensors[f"{PREFIX}{slot}.lora_B.weight"] = A, B
        ranks[slot], alphas[slot] = len(open_ranks), layer.scaling * len(open_ranks)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.alpha,
              "target_modules": settings.targets, "lora_dropout": settings.dropout, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              "rank_pattern": {slot: r for slot, r in ranks.items() if r != settings.r},
              "alpha_pattern": {slot: a for slot, a in alphas.items() if a != settings.alpha},
              "use_rslora": False, "use_dora": False}
    return config, tensors


ALORA = Format("LORA", ALoRASettings, LORA_KEYS, write_alora, read_lora)  # written as LoRA, read back as LoRA
