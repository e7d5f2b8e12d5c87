"""Where a method's wrappers go: peft's rules for naming the layers to wrap (a regex, or names and name
suffixes; per-layer patterns), the slots they fill, and putting a wrapper in a slot as part of a named
adapter. Several adapters on one slot are stacked: the second wraps the first.

Each method records what it was asked for (a small settings dataclass) in
`model.adapter_settings[adapter name][its class]`, which is what its adapter file is written from (formats/).
"""

import re

import torch.nn as nn

from ..errors import MiniPeftError
from .named_adapters import wrappers


SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
               "up": "up_proj", "down": "down_proj"}  # the linears' names, short, as targets may give them


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
    first adapter added is the active one, and so is one added after every other was deleted."""
    if not isinstance(name, str) or not name:
        raise MiniPeftError(f"name: expected a non-empty adapter name, got {name!r}")
    if not hasattr(model, "adapter_settings"):
        model.adapter_settings = {}
    model.adapter_settings.setdefault(name, {})[type(settings)] = settings
    if getattr(model, "active_adapter", None) is None and list(model.adapter_settings) == [name]:
        model.active_adapter = name
