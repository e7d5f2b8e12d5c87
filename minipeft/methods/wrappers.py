"""What every PEFT method shares: freezing, counting, fingerprints, merge and `disabled()`, and peft's rules
for naming the layers to wrap. None of it keeps a list of methods: it asks the modules that the methods put
into the model, which keep the contract in contract.py (trainable_names, wrapped, adapter_name, enabled,
rows, merged). Which rows each adapter serves is named_adapters.py's.

Each method records what it was asked for (a small settings dataclass) in
`model.adapter_settings[adapter name][its class]`, which is what its adapter file is written from (formats/).
"""

import hashlib
import json
import re

import torch
import torch.nn as nn

from ..errors import MiniPeftError
from .named_adapters import route, wrappers


SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
               "up": "up_proj", "down": "down_proj"}  # the linears' names, short, as targets may give them


def adapter_parameters(model) -> dict:
    """{full name: parameter} of every tensor that a method trains."""
    found = {}
    for name, module in wrappers(model):
        for tensor_name in module.trainable_names:
            found[f"{name}.{tensor_name}" if name else tensor_name] = module.get_parameter(tensor_name)
    return found


def freeze_base(model):
    """requires_grad=False on every tensor that no wrapper declares as trainable; new wrappers take the
    model's mode (a LoRA dropout added to a model in eval mode stays off); then `route`."""
    trainable = {id(p) for p in adapter_parameters(model).values()}
    for parameter in model.parameters():
        if id(parameter) not in trainable:
            parameter.requires_grad_(False)
    for _, module in wrappers(model):
        module.train(model.training)
    route(model)


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


def innermost(module):
    """The frozen module at the bottom of a stack of wrappers (None for an empty slot)."""
    while getattr(module, "wrapped", None):
        module = getattr(module, module.wrapped)
    return module


def linear_names(model) -> list[str]:
    """The linear slots a method can wrap: a bare linear, or the outermost wrapper around one (another
    adapter stacks on it). Not the linears inside a wrapper (its base and its own tensors)."""
    inside = {id(sub) for _, m in wrappers(model) for sub in m.modules() if sub is not m}
    return [n for n, m in model.named_modules() if id(m) not in inside and isinstance(innermost(m), nn.Linear)]


def slot_names(model) -> dict[str, str]:
    """{wrapper name: the slot it fills}: `...q_proj.base_layer` -> `...q_proj` for a stacked adapter."""
    slots = {}
    for name, module in wrappers(model):  # outer wrappers come before the ones they wrap
        slots.setdefault(name, name)
        if getattr(module, "wrapped", None):
            slots[f"{name}.{module.wrapped}" if name else module.wrapped] = slots[name]
    return slots


def adapters_named(model, name: str, kind) -> dict:
    """{slot name: wrapper} of one adapter's wrappers of one class."""
    slots = slot_names(model)
    return {slots[n]: m for n, m in wrappers(model) if isinstance(m, kind) and m.adapter_name == name}


def check_free(model, slot: str, name: str, kind):
    """Refuse a second wrapper of the same class and adapter name on one slot."""
    if slot in adapters_named(model, name, kind):
        raise MiniPeftError(f"{slot} already has a {kind.__name__} in adapter {name!r}; give the new one another "
                            f"name (name=...)")


def wrap(model, name: str, make_wrapper, adapter_name: str):
    """Put make_wrapper(the module called `name`) where that module was, as part of adapter `adapter_name`."""
    parent, _, child = name.rpartition(".")
    wrapper = make_wrapper(model.get_submodule(name))
    wrapper.adapter_name, wrapper.rows = adapter_name, None
    setattr(model.get_submodule(parent) if parent else model, child, wrapper)


def record_settings(model, name: str, settings):
    """Keep what a method was asked for, under its adapter's name, to be saved in its adapter file. The
    first adapter added is the active one."""
    if not isinstance(name, str) or not name:
        raise MiniPeftError(f"name: expected a non-empty adapter name, got {name!r}")
    if not hasattr(model, "adapter_settings"):
        model.adapter_settings = {}
    model.adapter_settings.setdefault(name, {})[type(settings)] = settings
    if not hasattr(model, "active_adapter"):
        model.active_adapter = name


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
    inner = max((path for path in wrapped_paths if name.startswith(path)), key=len, default=None)
    return name if inner is None else wrapped_paths[inner] + name[len(inner):]


def base_fingerprint(model) -> dict[str, str]:
    """sha256 of every base tensor (4-bit ones as stored, with their scales): to prove they never change."""
    adapter = {id(p) for p in adapter_parameters(model).values()}
    slots = slot_names(model)
    wrapped_paths = {f"{name}.{m.wrapped}.": f"{slots[name]}." for name, m in wrappers(model) if getattr(m, "wrapped", None)}
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
    names = list(getattr(model, "adapter_settings", {}))
    if len(names) > 1:
        raise MiniPeftError(f"merge: the model holds adapters {names}; folding one into the base would change it "
                            f"under the others. delete_adapter the others first")
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
