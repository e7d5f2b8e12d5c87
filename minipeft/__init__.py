"""minipeft: parameter-efficient fine-tuning of Llama, from scratch.

    weights ─► loader (4-bit) ─► model ─► PEFT wrappers (prompt tuning, LoRA, checkpointing) ─► train ─► adapter file
"""

from .config import LlamaConfig
from .errors import MiniPeftError
from .generate import generate
from .loader import build_model, load, load_model
from .model import KVCache, Llama
from .tokenizer import load_tokenizer
