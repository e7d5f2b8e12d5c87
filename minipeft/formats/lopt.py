"""LoPT's file: minipeft's own, in peft's layout, since peft has no LoPT (and says so when it is given this
file, by its unknown peft_type).

    adapter_config.json   {"peft_type": "LOPT", "format": ..., "num_virtual_tokens": P, "r": r}
    adapter_model.safetensors: prompt_U (P, r) and prompt_V (r, D); the prompts are prompt_U @ prompt_V
"""

from ..errors import require
from ..methods.lopt import LoPTSettings, WordEmbeddingsWithLowRankPrompts, add_lopt
from ..methods.placing import adapters_named
from .peft import Format, Keys, reported_against

FORMAT = "minipeft low-rank prompt tuning (LoPT-1, prompts = prompt_U @ prompt_V); peft cannot read this file"
LOPT_KEYS = Keys(read=("num_virtual_tokens", "r"), not_math=("format",))


def write_lopt(model, settings: LoPTSettings, name):
    config = {"peft_type": "LOPT", "format": FORMAT, "num_virtual_tokens": settings.num_prompts, "r": settings.r}
    wrapper, = adapters_named(model, name, WordEmbeddingsWithLowRankPrompts).values()
    return config, {"prompt_U": wrapper.prompt_U, "prompt_V": wrapper.prompt_V}


def read_lopt(model, config, source, name):
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
    r = require(config, "r", int, source, 1, num_prompts)
    wrapper = reported_against(source, add_lopt, model, num_prompts, r, 0, name)  # the file's values replace these
    return {"prompt_U": wrapper.prompt_U, "prompt_V": wrapper.prompt_V}


LOPT = Format("LOPT", LoPTSettings, LOPT_KEYS, write_lopt, read_lopt)
