"""Adapter files: only the trained tensors plus a small JSON config, in the peft library's layout.

    adapter_config.json          {"peft_type": "LORA", ...} or {"peft_type": "PROMPT_TUNING", ...}
    adapter_model.safetensors    the method's tensors, named as peft names them

Each method's keys and tensor names are one entry: in peft.py for the methods peft has (LoRA and DoRA,
prompt tuning, prefix tuning, IA3, BitFit); in a file of its own for those it lacks (bottleneck.py, lopt.py,
ept.py, iapt.py); alora.py writes a trained ALoRA as peft's LoRA, and task_head.py a trained head beside any
method (peft's modules_to_save). This module finds the entry by `peft_type`, checks that the tensors fit the
base, and writes atomically, so an adapter trained here loads in peft (and the serving stacks that read
peft's files), and one trained with peft loads here.

Several named adapters are saved as peft saves them: "default" in the directory itself, every other
one in a subdirectory named after it (`runs/both/`, `runs/both/code/`).
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ..errors import BadInput
from ..files import write_atomically
from .alora import ALORA
from .bottleneck import BOTTLENECK
from .ept import EPT
from .iapt import IAPT
from .lopt import LOPT
from .peft import FORMATS as PEFT_FORMATS
from .task_head import TaskHeadSettings, read_task_head, split_task_head, write_task_head

FORMATS = {entry.peft_type: entry for entry in [*PEFT_FORMATS, BOTTLENECK, LOPT, EPT, IAPT]}  # the last four: ours
BY_SETTINGS = {entry.settings: entry for entry in [*FORMATS.values(), ALORA]}  # a method's settings -> its format
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_state(model, name: str) -> tuple[dict, dict]:
    """The peft config and tensors of adapter `name`, which holds one PEFT method (and maybe a task head)."""
    settings = dict(getattr(model, "adapter_settings", {}).get(name, {}))
    head = settings.pop(TaskHeadSettings, None)
    if len(settings) > 1:
        kinds = " and ".join(BY_SETTINGS[kind].peft_type for kind in settings)
        raise BadInput(f"save_adapter: adapter {name!r} carries {kinds}; peft's format holds "
                       f"one method per adapter (give each its own name)")
    if not settings:
        raise BadInput(f"save_adapter: adapter {name!r} has a task head and no method; peft's format keeps a head "
                       f"beside a method (add_lora, add_prompt_tuning, ... with name={name!r})")
    (kind, method_settings), = settings.items()
    config, tensors = BY_SETTINGS[kind].write(model, method_settings, name)
    return write_task_head(model, head, name, config, tensors) if head else (config, tensors)


def save_adapter(model, directory, base_model_name_or_path=None):
    """Write each adapter's adapter_config.json and adapter_model.safetensors (trained tensors only):
    "default" into `directory`, any other into `directory/<name>`."""
    names = list(getattr(model, "adapter_settings", {}))
    if not names:
        raise BadInput("save_adapter: the model has no PEFT method on it (add_lora, add_prompt_tuning, ...)")
    for name in names:
        target = Path(directory) if name == "default" else Path(directory) / name
        target.mkdir(parents=True, exist_ok=True)
        for file_name, content in adapter_files(model, name, base_model_name_or_path).items():
            write_atomically(target / file_name, content)


def adapter_files(model, name: str, base_model_name_or_path=None) -> dict[str, bytes]:
    """Adapter `name` as the two files of peft's layout: {file name: its bytes}."""
    config, tensors = adapter_state(model, name)
    config["base_model_name_or_path"] = base_model_name_or_path
    config["inference_mode"] = True
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", **base_metadata(getattr(model, "loaded_as", None))}
    return {WEIGHTS_FILE: save_safetensors_bytes(tensors, metadata=metadata),
            CONFIG_FILE: json.dumps(config, indent=2).encode()}


BASE_METADATA = {"minipeft_base_quantize": ("quantize", {"none": None, "nf4": "nf4", "fp4": "fp4"}),
                 "minipeft_base_double_quant": ("double_quant", {"false": False, "true": True}),
                 "minipeft_base_dtype": ("dtype", {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"})}


def base_metadata(loaded_as) -> dict:
    """How the base was loaded while the adapter trained (llama/loader.py's model.loaded_as), as strings for
    the safetensors header: peft and every other reader of the file pass over them."""
    if not loaded_as:
        return {}
    return {key: next(text for text, value in values.items() if value == loaded_as[field])
            for key, (field, values) in BASE_METADATA.items()}


def trained_base(directory) -> dict | None:
    """{"quantize", "double_quant", "dtype"}: how the base was loaded when this adapter was saved, from its
    safetensors header; None for an adapter saved without that note (peft's, or an older minipeft's)."""
    weights_path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(weights_path, "pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise BadInput(f"{weights_path}: not found (an adapter directory holds {CONFIG_FILE} and "
                       f"{WEIGHTS_FILE})") from None
    except Exception as e:  # any failure to parse the header means the same thing to the user
        raise BadInput(f"{weights_path}: not a readable safetensors file ({e})") from None
    if not any(key in metadata for key in BASE_METADATA):
        return None
    loaded_as = {}
    for key, (field, values) in BASE_METADATA.items():
        if metadata.get(key) not in values:
            raise BadInput(f"{weights_path}: header key {key!r} is {metadata.get(key)!r}; expected one of "
                           f"{sorted(values)}")
        loaded_as[field] = values[metadata[key]]
    return loaded_as


def read_adapter(directory) -> tuple[dict, dict]:
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise BadInput(f"{path}: not found (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{config_path}: expected a JSON object")
    try:
        tensors = load_safetensors_bytes(weights_path.read_bytes())
    except Exception as e:  # any failure to parse these bytes means the same thing to the user
        raise BadInput(f"{weights_path}: not a readable safetensors file ({e})") from None
    return config, tensors


def load_adapter(model, directory, name="default"):
    """Attach the adapter in `directory` (minipeft's or peft's) to `model` as adapter `name`, checking that
    it fits the base."""
    config, tensors = read_adapter(directory)
    source = Path(directory) / CONFIG_FILE
    weights_path = Path(directory) / WEIGHTS_FILE
    peft_type = config.get("peft_type")
    entry = FORMATS.get(peft_type) if isinstance(peft_type, str) else None
    if entry is None:
        raise BadInput(f"{source}: peft_type {peft_type!r} is not supported; "
                       f"expected one of {sorted(FORMATS)}")
    if name in getattr(model, "adapter_settings", {}):
        raise BadInput(f"load_adapter: the model already has an adapter named {name!r}; pass another name=")
    config, heads = split_task_head(config, source)  # a trained lm_head or classifier: modules_to_save
    entry.keys.check(config, source)
    expected = entry.read(model, config, source, name)  # {file key: parameter}, after wrapping the model
    if heads:
        expected |= read_task_head(model, heads, tensors, source, name)

    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}  # peft's in-memory names
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise BadInput(f"{weights_path}: tensors do not fit the base model: missing {missing[:4]} "
                       f"extra {extra[:4]}")
    with torch.no_grad():
        for key, parameter in expected.items():
            if tensors[key].shape != parameter.shape:
                raise BadInput(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, "
                               f"the base model needs {tuple(parameter.shape)}")
            if not tensors[key].is_floating_point():
                raise BadInput(f"{weights_path}: {key} is {tensors[key].dtype}; an adapter's tensors are floats")
            parameter.copy_(tensors[key])
    return config
