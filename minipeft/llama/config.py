"""The Llama shape, as a dataclass whose defaults are Llama-7B, filled from a Hugging Face config.json.

Every key of config.json is read, listed as not changing the math, or refused by name: a checkpoint
loads as it is, or not at all, never quietly different. Both layouts are read: transformers 4
(`rope_theta`, `rope_scaling` at the top level) and transformers 5 (`rope_parameters`).
"""

import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import BadInput

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Keys read below, besides the dataclass fields.
READ_ELSEWHERE = ("architectures", "model_type", "rope_parameters", "rope_scaling",
                  "minipeft_merged")  # the last: which adapters `minipeft merge` folded in (bases.py)
# Keys that change nothing in the forward or backward pass: bookkeeping, initialisation, output options.
NOT_MATH = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "return_dict",
            "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type", "pad_token_id",
            "initializer_range", "chunk_size_feed_forward", "pretraining_tp", "tokenizer_class", "is_llama_config")
# Keys that would change the math if not at this value: anything else is refused by name.
ONLY_DEFAULT = {"hidden_act": "silu", "attention_dropout": 0.0, "is_encoder_decoder": False,
                "partial_rotary_factor": 1.0, "rope_interleaved": False}
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class LlamaConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # fewer than num_attention_heads means grouped-query attention
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}; None: plain
    attention_bias: bool = False
    mlp_bias: bool = False
    vocab_size: int = 32000
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2  # Llama 3 instruct lists several: generation stops at any

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if not self.head_dim or self.head_dim % 2:
            raise BadInput(f"config: head_dim {self.head_dim} should be even and > 0 (rotary pairs channels)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise BadInput(f"config: num_attention_heads {self.num_attention_heads} is not a "
                           f"multiple of num_key_value_heads {self.num_key_value_heads}")

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        return [i for i in ids if i is not None]

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: config.json not found (expected a Hugging Face Llama config)")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw, source="config") -> "LlamaConfig":
        if not isinstance(raw, dict):
            raise BadInput(f"{source}: expected a JSON object, got {type(raw).__name__}")
        check_architecture(raw, source)
        for key, default in ONLY_DEFAULT.items():
            if key in raw and raw[key] is not None and raw[key] != default:
                raise BadInput(f"{source}: key {key!r} is {raw[key]!r}; minipeft's Llama supports only "
                               f"{default!r}")
        known = {f.name for f in fields(cls)} | set(READ_ELSEWHERE) | set(NOT_MATH) | set(ONLY_DEFAULT)
        unknown = sorted(set(raw) - known)
        if unknown:
            warnings.warn(f"{source}: keys {unknown} are not Llama config keys; ignored, as transformers ignores them")
        values = {}
        for field in fields(cls):
            value = raw.get(field.name)
            if value is None and field.name in REQUIRED:
                raise BadInput(f"{source}: missing key {field.name!r}")
            if field.name in ("rope_theta", "rope_scaling"):
                continue  # read_rope reads both layouts
            if value is not None:
                values[field.name] = checked(field, value, source)
            elif field.name in raw and field.name in ("bos_token_id", "eos_token_id"):
                values[field.name] = None  # the checkpoint has no such token
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        context = values.get("max_position_embeddings", 2048)
        values["rope_theta"], values["rope_scaling"] = read_rope(raw, context, source)
        return cls(**values)


def check_architecture(raw, source):
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise BadInput(f"{source}: key 'architectures' should be a list of names, got {architectures!r}")
    if raw.get("model_type", "llama") != "llama" or not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise BadInput(f"{source}: unsupported architecture {architectures} / model_type "
                       f"{raw.get('model_type')!r}; minipeft reads Llama checkpoints (LlamaForCausalLM)")


def positive_number(value, integer: bool) -> bool:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_number and math.isfinite(value) and value > 0 and (not integer or value == int(value))


def is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked(field, value, source):
    """A config value converted to the field's type, or a one-line error naming the key."""
    name, default = field.name, field.default
    if name in ("bos_token_id", "eos_token_id"):
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if not ids or not all(map(is_token_id, ids)):
            raise BadInput(f"{source}: key {name!r} should be a token id (an integer >= 0), got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise BadInput(f"{source}: key {name!r} should be bool, got {value!r}")
        return value
    kind = type(default)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or kind is int and value != int(value):
        raise BadInput(f"{source}: key {name!r} should be {kind.__name__}, got {value!r}")
    if value <= 0:
        raise BadInput(f"{source}: key {name!r} should be > 0, got {value!r}")
    return kind(value)


def read_rope(raw, max_position_embeddings, source) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either layout; refuses a rope_type or a key it cannot honour."""
    theta = raw.get("rope_theta")
    parameters = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        raise BadInput(f"{source}: key 'rope_parameters' should be an object, got {parameters!r}")
    theta = parameters.get("rope_theta", theta)
    theta = 10000.0 if theta is None else theta
    if not positive_number(theta, False):
        raise BadInput(f"{source}: key 'rope_theta' should be a number > 0, got {theta!r}")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in ROPE_KEYS:
        raise BadInput(f"{source}: rope_type {rope_type!r} is not supported; expected one of {list(ROPE_KEYS)}")
    scaling = {"rope_type": rope_type}
    if rope_type == "llama3":
        scaling["original_max_position_embeddings"] = max_position_embeddings
    for key, value in parameters.items():
        if key in ("rope_type", "type", "rope_theta") or value is None:
            continue
        if key == "partial_rotary_factor" and value == 1.0:
            continue
        if key not in ROPE_KEYS[rope_type]:
            raise BadInput(f"{source}: rope key {key!r} = {value!r} is not supported with rope_type {rope_type!r}")
        if not positive_number(value, key == "original_max_position_embeddings"):
            raise BadInput(f"{source}: rope key {key!r} should be a number > 0, got {value!r}")
        scaling[key] = value
    missing = [key for key in ROPE_KEYS[rope_type] if key not in scaling]
    if missing:
        raise BadInput(f"{source}: rope_type {rope_type!r} needs {missing}")
    if rope_type == "llama3" and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise BadInput(f"{source}: rope low_freq_factor should be below high_freq_factor, got {scaling}")
    return float(theta), (scaling if rope_type != "default" else None)
