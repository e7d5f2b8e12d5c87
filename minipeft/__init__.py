"""minipeft: parameter-efficient fine-tuning of Llama, from scratch.

    llama/      weights ─► config ─► loader (4-bit) ─► model ─► loss, generate        (tokenizers beside)
                                                         ▲
    methods/    one file a method (prompt/prefix tuning, P-tuning, LoPT, EPT, IAPT, Plug and Play prompts, LoRA/DoRA,
                LoHa, LoKr, VeRA, ALoRA, IA3, BitFit, LN tuning, bottleneck adapters, a task head), each
                putting its modules into the model's slots (llama/model.py); what they all keep: contract.py;
                several adapters and mixed batches: named_adapters.py; placing, freezing, counting,
                fingerprints and merging ask the modules in the model
                                                         │
    formats/    each method's tensors and config ─► peft-layout files, and back (peft.py: one table a method)
                                                         │
    train/      data ─► batches ─► the loop's pieces ─► resumable run state, reports
                                                         │
    cli.py      the `minipeft` command: generate, merge, count, nearest, and serve/ (an OpenAI-compatible
    serve/      API, continuous batching, a page); bases.py, which base to load under a set of adapters

    tools/      beside it all: building the default model, the methods' comparison table

Imports run one way, down this picture: llama/ knows nothing of methods/, formats/, train/ or serve/, methods/
nothing of formats/, train/ or serve/, and nothing imports tools/ (tests/test_layout.py checks it, and that
no two modules import each other round a loop).
"""

from .formats import load_adapter, save_adapter
from .errors import BadInput, MiniPeftError
from .llama.config import LlamaConfig
from .llama.generate import generate
from .llama.compiling import compile_blocks
from .llama.gradient_checkpointing import enable_checkpointing
from .llama.loader import build_model, load, load_model, save_model
from .llama.kv_cache import KVCache
from .llama.model import Llama
from .llama.tokenizer import load_tokenizer
from .methods.bitfit import add_bitfit
from .methods.bottleneck import add_bottleneck_adapters
from .methods.ia3 import add_ia3
from .methods.lora import LoRALayer, add_lora
from .methods.loha import add_loha
from .methods.lokr import add_lokr
from .methods.ln_tuning import add_ln_tuning
from .methods.p_tuning import add_p_tuning
from .methods.vera import add_vera
from .methods.dora import add_dora
from .methods.named_adapters import adapter_names, delete_adapter, set_adapter
from .methods.prefix_tuning import add_prefix_tuning
from .methods.prompt_tuning import WordEmbeddingsWithLearnedPrompts, add_prompt_tuning
from .methods.lopt import add_lopt
from .methods.alora import add_alora, reallocate
from .methods.ept import add_ept
from .methods.iapt import add_iapt
from .methods.plug_and_play import Steering, add_plug_and_play, plug_and_play_loss
from .methods.task_head import add_task_head, classify
from .methods.counting import count_parameters
from .methods.fingerprints import base_fingerprint
from .methods.merging import disabled, merge, unmerge

__all__ = ["BadInput", "KVCache", "Llama", "LlamaConfig", "LoRALayer", "MiniPeftError",
           "WordEmbeddingsWithLearnedPrompts", "adapter_names", "add_bitfit", "add_bottleneck_adapters", "add_ia3",
           "add_alora", "add_dora", "add_ept", "add_iapt", "add_ln_tuning", "add_loha", "add_lokr", "add_lopt",
           "add_lora", "add_p_tuning", "add_vera", "reallocate", "add_prefix_tuning",
           "add_plug_and_play", "plug_and_play_loss", "Steering", "save_model",
           "add_prompt_tuning", "add_task_head", "base_fingerprint", "classify", "build_model", "compile_blocks",
           "count_parameters",
           "disabled",
           "enable_checkpointing", "generate", "load", "delete_adapter", "load_adapter", "load_model", "load_tokenizer",
           "merge", "save_adapter", "set_adapter", "unmerge"]
