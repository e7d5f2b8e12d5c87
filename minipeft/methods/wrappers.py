"""What every PEFT method shares: freezing, counting, fingerprints, switching off, and peft's rules for
naming the layers to wrap. None of it keeps a list of methods: it asks the modules that the methods put
into the model.

A wrapper (any module a method adds) declares
    trainable_names   the names of its own parameters that train, e.g. ("lora_A.weight", "lora_B.weight")
    wrapped           the attribute holding the frozen module it wraps, if any, e.g. "base_layer"
    enabled           False makes it pass the bare base through (see `disabled`)

and each method records what it was asked for (a small settings dataclass with its `peft_type`) in
`model.peft_settings`, which is what its adapter file is written from.
"""

import hashlib
import json
import re

import torch
import torch.nn as nn

from ..errors import MiniPeftError


SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
               "up": "up_proj", "down": "down_proj"}  # the linears' names, short, as targets may give them
PEFT_PREFIX = "base_model.model."  # in front of every layer name in peft's adapter files


def wrappers(model):
    """(name, module) for every module a PEFT method added."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "trainable_names")]


def adapter_parameters(model) -> dict:
    """{full name: parameter} of every tensor that a method trains."""
    found = {}
    for name, module in wrappers(model):
        for tensor_name in module.trainable_names:
            found[f"{name}.{tensor_name}" if name else tensor_name] = module.get_parameter(tensor_name)
    return found


def freeze_base(model):
    """requires_grad=False on every tensor that no wrapper declares as trainable."""
    trainable = {id(p) for p in adapter_parameters(model).values()}
    for parameter in model.parameters():
        if id(parameter) not in trainable:
            parameter.requires_grad_(False)


def target_matches(name: str, targets) -> bool:
    """peft's rule for target_modules: a string is a regex the whole name must match; a list holds names
    or name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{target}") for target in targets)


def pattern_value(pattern: dict, name: str, default):
    """peft's rule for per-layer settings (rank_pattern, ...): the first key that is the name or ends it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def linear_names(model) -> list[str]:
    """The linears a method can wrap: not those inside a wrapper already (its base and its own tensors)."""
    inside = {id(sub) for _, m in wrappers(model) for sub in m.modules() if sub is not m}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]


def wrap(model, name: str, make_wrapper):
    """Put make_wrapper(the module called `name`) where that module was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, make_wrapper(model.get_submodule(name)))


def record_settings(model, settings):
    """Keep what a method was asked for, to be saved in its adapter file."""
    if not hasattr(model, "peft_settings"):
        model.peft_settings = {}
    model.peft_settings[settings.peft_type] = settings


def real_numel(parameter) -> int:
    """Numbers a tensor stands for: a 4-bit weight packs two per uint8 byte, counted as (out x in)."""
    quant_state = getattr(parameter, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


def count_parameters(model, verbose=False) -> dict:
    """Trainable and total numbers (4-bit weights counted as the weights they encode)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(real_numel(p) for p in model.parameters())
    report = {"trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total}
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable: {report['trainable_percent']:.4f}%")
    return report


def base_name(name: str, wrapped_paths: dict) -> str:
    """A tensor's name as in the bare base: `...q_proj.base_layer.weight` -> `...q_proj.weight`."""
    for inner, outer in wrapped_paths.items():
        if name.startswith(inner):
            return outer + name[len(inner):]
    return name


def base_fingerprint(model) -> dict[str, str]:
    """sha256 of every base tensor (4-bit ones as stored, with their scales): to prove they never change."""
    adapter = {id(p) for p in adapter_parameters(model).values()}
    wrapped_paths = {f"{name}.{m.wrapped}.": f"{name}." for name, m in wrappers(model) if getattr(m, "wrapped", None)}
    digests = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in adapter:
            continue
        parts = [tensor]
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            parts += [quant_state.absmax] + ([quant_state.state2.absmax] if quant_state.nested else [])
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests[base_name(name, wrapped_paths)] = digest.hexdigest()
    return digests


def fingerprint_digest(fingerprint: dict[str, str]) -> str:
    """One sha256 for a whole base_fingerprint: a training checkpoint keeps it to refuse another base."""
    return hashlib.sha256(json.dumps(sorted(fingerprint.items())).encode()).hexdigest()


def merge(model) -> float:
    """Fold every change to a weight (LoRA, DoRA, IA3, BitFit) into the base, for inference; return the worst
    rounding error (0 unless the base is 4-bit). Learned prompts, a learned past and bottleneck adapters are
    not changes to a weight: they stay as they are, and still work."""
    found = [(name, m) for name, m in wrappers(model) if hasattr(m, "merge")]
    if any(name == "lm_head" for name, _ in found) and model.config.tie_word_embeddings:
        raise MiniPeftError("merge: lm_head shares its weight with the input embedding (tie_word_embeddings); "
                            "merging its adapter would change the embedding too. Keep that adapter unmerged")
    return max((m.merge() for _, m in found), default=0.0)


def unmerge(model) -> float:
    """Take every method's tensors back out of the base weights; return the worst rounding error."""
    return max((m.unmerge() for _, m in wrappers(model) if hasattr(m, "unmerge")), default=0.0)


class disabled:
    """`with minipeft.disabled(model): ...` runs the bare frozen base, whatever methods are on."""

    def __init__(self, model):
        self.modules = [m for _, m in wrappers(model)]
        merged = [name for name, m in wrappers(model) if getattr(m, "merged", False)]
        if merged:
            raise MiniPeftError(f"disabled: {merged[0]} is merged into its base weight; unmerge() first")

    def __enter__(self):
        self.was = [m.enabled for m in self.modules]
        for module in self.modules:
            module.enabled = False

    def __exit__(self, *exc):
        for module, was in zip(self.modules, self.was):
            module.enabled = was
