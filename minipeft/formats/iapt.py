"""IAPT's file: minipeft's own, in peft's layout, since peft has no IAPT (and says so when it is given this file,
by its unknown peft_type).

    adapter_config.json   {"peft_type": "IAPT", "format": ..., "num_virtual_tokens": P, "r": r,
                           "instruction_tokens": n, "num_layers": L}
    adapter_model.safetensors, for each layer l: generators.l.down.weight (r, D), generators.l.queries (P, r),
        generators.l.activation.numerator (6,), generators.l.activation.denominator (4,), generators.l.up.weight (D, r)
"""

from ..errors import BadInput, require
from ..methods.iapt import IAPTSettings, LayerPrompts, add_iapt
from ..methods.placing import adapters_named
from .peft import Format, Keys, reported_against

FORMAT = "minipeft IAPT (per-layer soft tokens made from the instruction by pooling generators); not for peft"
IAPT_KEYS = Keys(read=("num_virtual_tokens", "r", "instruction_tokens", "num_layers"), not_math=("format",))


def write_iapt(model, settings: IAPTSettings, name):
    config = {"peft_type": "IAPT", "format": FORMAT, "num_virtual_tokens": settings.num_prompts, "r": settings.r,
              "instruction_tokens": settings.instruction_tokens, "num_layers": model.config.num_hidden_layers}
    prompts, = adapters_named(model, name, LayerPrompts).values()
    return config, {key: prompts.get_parameter(key) for key in prompts.trainable_names}


def read_iapt(model, config, source, name):
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
    r = require(config, "r", int, source, 1, model.config.hidden_size)
    instruction_tokens = require(config, "instruction_tokens", int, source, 1, model.config.max_position_embeddings)
    layers = require(config, "num_layers", int, source, 1, 1 << 16)
    if layers != model.config.num_hidden_layers:
        raise BadInput(f"{source}: num_layers is {layers}, the model has {model.config.num_hidden_layers} layers")
    prompts = reported_against(source, add_iapt, model, num_prompts, r, instruction_tokens, 0, name)
    return {key: prompts.get_parameter(key) for key in prompts.trainable_names}  # filled from the file


IAPT = Format("IAPT", IAPTSettings, IAPT_KEYS, write_iapt, read_iapt)
