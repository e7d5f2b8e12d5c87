"""The Llama shape, as a dataclass whose defaults are Llama-7B, filled from a Hugging Face config.json."""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import MiniPeftError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class LlamaConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # fewer than num_attention_heads means grouped-query attention
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    vocab_size: int = 32000
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise MiniPeftError(f"config: hidden_size {self.hidden_size} is not divisible by "
                                f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MiniPeftError(f"config: num_attention_heads {self.num_attention_heads} is not a "
                                f"multiple of num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise MiniPeftError(f"{path}: config.json not found (expected a Hugging Face Llama config)")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MiniPeftError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw, source="config") -> "LlamaConfig":
        if not isinstance(raw, dict):
            raise MiniPeftError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise MiniPeftError(f"{source}: key 'architectures' should be a list of names, got {architectures!r}")
        if raw.get("model_type", "llama") != "llama" or not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            raise MiniPeftError(f"{source}: unsupported architecture {architectures} / model_type "
                                f"{raw.get('model_type')!r}; minipeft reads Llama checkpoints (LlamaForCausalLM)")
        raw = dict(raw)
        raw.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
        if isinstance(raw.get("eos_token_id"), list) and raw["eos_token_id"]:  # Llama-3 lists several
            raw["eos_token_id"] = raw["eos_token_id"][0]
        values = {}
        for field in fields(cls):
            if field.name not in raw or raw[field.name] is None:
                if field.name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "vocab_size"):
                    raise MiniPeftError(f"{source}: missing key {field.name!r}")
                continue
            value, kind = raw[field.name], type(field.default)
            if kind is bool and not isinstance(value, bool) or kind is not bool and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or kind is int and value != int(value)):
                raise MiniPeftError(f"{source}: key {field.name!r} should be {kind.__name__}, got {value!r}")
            if kind is not bool and value <= 0 and field.name not in ("bos_token_id", "eos_token_id"):
                raise MiniPeftError(f"{source}: key {field.name!r} should be > 0, got {value!r}")
            values[field.name] = kind(value)
        return cls(**values)
