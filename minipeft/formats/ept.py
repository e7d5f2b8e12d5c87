"""EPT's file: minipeft's own, in peft's layout, since peft has no EPT (and says so when it is given this file,
by its unknown peft_type).

    adapter_config.json   {"peft_type": "EPT", "format": ..., "num_virtual_tokens": m, "num_knowledge_rows": n,
                           "r": r, "num_spaces": S}
    adapter_model.safetensors: short_prompt (m, D), knowledge_A (n, r), knowledge_B (r, D),
                               space_down (S, D, r), space_up (S, r, D), space_gate (D, S)
"""

from ..errors import require
from ..methods.ept import EPTSettings, WordEmbeddingsWithFusedPrompts, add_ept
from ..methods.placing import adapters_named
from .peft import Format, Keys, reported_against

FORMAT = "minipeft EPT (a short prompt fused with a low-rank one, projected into gated subspaces); not for peft"
EPT_KEYS = Keys(read=("num_virtual_tokens", "num_knowledge_rows", "r", "num_spaces"), not_math=("format",))


def write_ept(model, settings: EPTSettings, name):
    config = {"peft_type": "EPT", "format": FORMAT, "num_virtual_tokens": settings.num_prompts,
              "num_knowledge_rows": settings.knowledge_rows, "r": settings.r, "num_spaces": settings.spaces}
    wrapper, = adapters_named(model, name, WordEmbeddingsWithFusedPrompts).values()
    return config, {key: wrapper.get_parameter(key) for key in wrapper.trainable_names}


def read_ept(model, config, source, name):
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
    rows = require(config, "num_knowledge_rows", int, source, 1, 1 << 20)
    r = require(config, "r", int, source, 1, min(rows, model.config.hidden_size))
    spaces = require(config, "num_spaces", int, source, 1, 1 << 10)
    wrapper = reported_against(source, add_ept, model, num_prompts, rows, r, spaces, 0, name)  # filled from the file
    return {key: wrapper.get_parameter(key) for key in wrapper.trainable_names}


EPT = Format("EPT", EPTSettings, EPT_KEYS, write_ept, read_ept)
