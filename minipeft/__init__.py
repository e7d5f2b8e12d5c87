"""minipeft: parameter-efficient fine-tuning of Llama, from scratch.

    weights ─► loader (4-bit) ─► model ─► PEFT wrappers (prompt tuning, LoRA, checkpointing) ─► train ─► adapter file
"""

from .adapters import load_adapter, save_adapter
from .checkpoint import enable_checkpointing
from .config import LlamaConfig
from .errors import MiniPeftError
from .generate import generate
from .loader import build_model, load, load_model
from .lora import LoRALayer, add_lora, merge, unmerge
from .model import KVCache, Llama
from .parameters import base_fingerprint, count_parameters
from .prompt_tuning import WordEmbeddingsWithLearnedPrompts, add_prompt_tuning
from .tokenizer import load_tokenizer

__all__ = ["KVCache", "Llama", "LlamaConfig", "LoRALayer", "MiniPeftError", "WordEmbeddingsWithLearnedPrompts",
           "add_lora", "add_prompt_tuning", "base_fingerprint", "build_model", "count_parameters",
           "enable_checkpointing", "generate", "load", "load_adapter", "load_model", "load_tokenizer", "merge",
           "save_adapter", "unmerge"]
