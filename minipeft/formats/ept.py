"""EPT's file: minipeft's own, in peft's layout, since peft has no EPT (and says so when it is given this file,
by its unknown peft_type).

    adapter_config.json   {"peft_type": "EPT", "format": ..., "num_virtual_tokens": m, "max_length": s, "r": r,
                           "num_spaces": S}
    adapter_model.safetensors: short_prompt (m, D), knowledge_A (s, r), knowledge_B (r, D),
                               space_down (S, D, r), space_up (S, r, D), space_gate (D, S)

A file of minipeft's first EPT (its key num_knowledge_rows: A B only attended to, the text never updated) is
refused by that key: its tensors mean something else here.
"""

from ..errors import BadInput, require
from ..methods.ept import EPTSettings, LowRankTextUpdate, WordEmbeddingsWithFusedPrompts, add_ept
from ..methods.placing import adapters_named
from .peft import Format, Keys, reported_against

FORMAT = "minipeft EPT 2 (a short prompt, DePT's low-rank update of the text, fusion, gated subspaces); not for peft"
EPT_KEYS = Keys(read=("num_virtual_tokens", "max_length", "r", "num_spaces", "num_knowledge_rows"),
                not_math=("format",))


def wrappers(model, name):
    (prompts,), (update,) = (adapters_named(model, name, kind).values()
                             for kind in (WordEmbeddingsWithFusedPrompts, LowRankTextUpdate))
    return prompts, update


def write_ept(model, settings: EPTSettings, name):
    config = {"peft_type": "EPT", "format": FORMAT, "num_virtual_tokens": settings.num_prompts,
              "max_length": settings.max_length, "r": settings.r, "num_spaces": settings.spaces}
    return config, {key: w.get_parameter(key) for w in wrappers(model, name) for key in w.trainable_names}


def read_ept(model, config, source, name):
    if "num_knowledge_rows" in config:
        raise BadInput(f"{source}: key 'num_knowledge_rows' marks a file of minipeft's first EPT, whose low-rank "
                       f"prompt never updated the text as the paper's does; its tensors do not fit: train it again")
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
    max_length = require(config, "max_length", int, source, 1, 1 << 20)
    r = require(config, "r", int, source, 1, min(max_length, model.config.hidden_size))
    spaces = require(config, "num_spaces", int, source, 1, 1 << 10)
    reported_against(source, add_ept, model, num_prompts, max_length, r, spaces, 0, name)  # filled from the file
    return {key: w.get_parameter(key) for w in wrappers(model, name) for key in w.trainable_names}


EPT = Format("EPT", EPTSettings, EPT_KEYS, write_ept, read_ept)
