"""Adapter files: only the trained tensors plus a small JSON config, in the peft library's layout.

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
                                 {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 16, ...}
    adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (r, in)
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  (out, r)
                                 prompt_embeddings                                               (P, D)

so an adapter trained here loads in peft (and the serving stacks that read peft's files), and one
trained with peft loads here. Files are written atomically: a crash leaves the old file or the new one.
"""

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import MiniPeftError
from .lora import LoRALayer, add_lora, lora_layers
from .prompt_tuning import WordEmbeddingsWithLearnedPrompts, add_prompt_tuning

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def write_atomically(path, data: bytes):
    """Write to a temporary file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_state(model) -> tuple[dict, dict]:
    """The peft config and tensors of whatever PEFT mechanism the model carries."""
    layers = lora_layers(model)
    embedding = model.model.embed_tokens
    prompted = isinstance(embedding, WordEmbeddingsWithLearnedPrompts)
    if layers and prompted:
        raise MiniPeftError("save_adapter: the model has both LoRA and prompt tuning; peft's format holds one")
    if prompted:
        c = model.config
        config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": embedding.num_prompts,
                  "token_dim": c.hidden_size, "num_transformer_submodules": 1, "num_attention_heads":
                  c.num_attention_heads, "num_layers": c.num_hidden_layers, "prompt_tuning_init": "RANDOM"}
        return config, {"prompt_embeddings": embedding.learned_prompts.detach()}
    if not layers:
        raise MiniPeftError("save_adapter: the model has no LoRA layers and no learned prompts")
    short = {name: name.rsplit(".", 1)[-1] for name in layers}
    r, alpha = (Counter(getattr(m, key) for m in layers.values()).most_common(1)[0][0] for key in ("r", "alpha"))
    dropout = next(iter(layers.values())).dropout
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": sorted(set(short.values())), "lora_dropout": getattr(dropout, "p", 0.0),
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              # peft reads ranks and alphas that differ from the default per module name
              "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
              "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha}}
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return config, tensors


def save_adapter(model, directory, base_model_name_or_path=None):
    """Write adapter_config.json and adapter_model.safetensors (trainable tensors only) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config, tensors = adapter_state(model)
    config["base_model_name_or_path"] = base_model_name_or_path
    config["inference_mode"] = True
    tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items()}
    write_atomically(directory / WEIGHTS_FILE, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())


def read_adapter(directory) -> tuple[dict, dict]:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MiniPeftError(f"{path}: not found (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise MiniPeftError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MiniPeftError(f"{config_path}: expected a JSON object")
    try:
        tensors = load_safetensors_bytes(weights_path.read_bytes())
    except Exception as e:  # any failure to parse these bytes means the same thing to the user
        raise MiniPeftError(f"{weights_path}: not a readable safetensors file ({e})") from None
    return config, tensors


def require(config, key, kind, source, low=None, high=None, default=None):
    """config[key], checked to be of `kind` and within [low, high]; a clear error otherwise."""
    value = config.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not isinstance(value, kind) or isinstance(value, bool) or number and (
            value != value or low is not None and value < low or high is not None and value > high):
        expected = getattr(kind, "__name__", " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind)
        limits = f" in [{low}, {high}]" if low is not None else ""
        raise MiniPeftError(f"{source}: key {key!r} should be {expected}{limits}, got {value!r}")
    return value


def require_pattern(config, key, kind, source, high):
    """peft's rank_pattern / alpha_pattern: {module name: value}."""
    pattern = require(config, key, dict, source, default={}) if config.get(key) is not None else {}
    for name, value in pattern.items():
        require({name: value}, name, kind, f"{source} ({key})", 1e-9, high)
    return pattern


def load_adapter(model, directory):
    """Attach the adapter in `directory` (minipeft's or peft's) to `model`, checking it fits the base."""
    config, tensors = read_adapter(directory)
    source = Path(directory) / CONFIG_FILE
    peft_type = config.get("peft_type")
    largest = max(model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size)
    if peft_type == "PROMPT_TUNING":
        num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
        wrapper = add_prompt_tuning(model, num_prompts, init="random")
        expected = {"prompt_embeddings": wrapper.learned_prompts}
    elif peft_type == "LORA":
        r = require(config, "r", int, source, 1, largest)
        alpha = require(config, "lora_alpha", (int, float), source, -1e9, 1e9)
        dropout = require(config, "lora_dropout", (int, float), source, 0, 0.999, default=0.0)
        ranks = require_pattern(config, "rank_pattern", int, source, largest)
        alphas = require_pattern(config, "alpha_pattern", (int, float), source, 1e9)
        targets = require(config, "target_modules", (list, str), source)
        targets = [targets] if isinstance(targets, str) else targets
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        if not targets or not all(isinstance(t, str) for t in targets) or not set(targets) <= present:
            raise MiniPeftError(f"{source}: target_modules {targets} are not all modules of this model")
        for target in targets:
            add_lora(model, [target], r, alpha, dropout)
        for name, layer in lora_layers(model).items():  # per-module ranks and alphas, as peft writes them
            if name in ranks or name in alphas:
                new = LoRALayer(layer.base_layer, ranks.get(name, r), alphas.get(name, alpha), dropout)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
        expected = {}
        for name, layer in lora_layers(model).items():
            expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
            expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    else:
        raise MiniPeftError(f"{source}: peft_type {peft_type!r} is not supported; expected 'LORA' or 'PROMPT_TUNING'")

    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}  # peft's in-memory names
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise MiniPeftError(f"{Path(directory) / WEIGHTS_FILE}: tensors do not fit the base model: "
                            f"missing {missing[:4]} extra {extra[:4]}")
    with torch.no_grad():
        for key, parameter in expected.items():
            if tensors[key].shape != parameter.shape:
                raise MiniPeftError(f"{Path(directory) / WEIGHTS_FILE}: {key} has shape {tuple(tensors[key].shape)}, "
                                    f"the base model needs {tuple(parameter.shape)}")
            parameter.copy_(tensors[key])
    return config
