"""Where a method's wrappers go: peft's rules for naming the layers to wrap (a regex, or names and name
suffixes; per-layer patterns), the slots they fill, and putting a wrapper in a slot as part of a named
adapter. Several adapters on one slot are stacked: the second wraps the first.

Each method records what it was asked for (a small settings dataclass) in
`model.adapter_settings[adapter name][its class]`, which is what its adapter file is written from (formats/).
"""

import re
from dataclasses import fields, replace

import torch.nn as nn

from ..errors import BadInput
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


def linears_named(model, targets, every_name_must_match=False, argument="targets") -> tuple[list, list]:
    """The linear slots that `targets` names, and the names an adapter file records for them: the names
    asked for (short ones spelt out: "q" is q_proj) or, for a regex, the names it matched. Refused if
    nothing matches, or, with every_name_must_match, if any one name matches nothing."""
    candidates = linear_names(model)
    if not isinstance(targets, str):
        targets = [SHORT_NAMES.get(t, t) for t in targets]
        unknown = [t for t in targets if not any(target_matches(layer, [t]) for layer in candidates)]
        if every_name_must_match and unknown:
            raise BadInput(f"{argument}: no linear named {unknown} in the model; it has "
                           f"{sorted({n.rsplit('.', 1)[-1] for n in candidates})}")
    found = [layer for layer in candidates if target_matches(layer, targets)]
    if not found:
        raise BadInput(f"{argument}: {targets!r} matches no linear in the model")
    return found, sorted(found) if isinstance(targets, str) else list(targets)


def check_free(model, slot: str, name: str, wrapper):
    """Refuse a second wrapper of the same method (a class, its subclass or its parent) and adapter name on
    one slot."""
    slots = slot_names(model)
    taken = [m for n, m in wrappers(model) if slots[n] == slot and m.adapter_name == name
             and (isinstance(m, type(wrapper)) or isinstance(wrapper, type(m)))]
    if taken:
        raise BadInput(f"{slot} already has a {type(taken[0]).__name__} in adapter {name!r}; give the new one "
                       f"another name (name=...)")


def in_slot(model, slot: str):
    """The module in a slot (None in an empty one: the decoder's learned_past without prefix tuning)."""
    parent, _, child = slot.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, child)


def place(model, slot: str, wrapper, adapter_name: str):
    """Put `wrapper` where the module called `slot` was, as part of adapter `adapter_name`."""
    parent, _, child = slot.rpartition(".")
    wrapper.adapter_name = adapter_name
    wrapper.rows = None
    setattr(model.get_submodule(parent) if parent else model, child, wrapper)


def check_name(name):
    if not isinstance(name, str) or not name:
        raise BadInput(f"name: expected a non-empty adapter name, got {name!r}")


PER_LAYER = {"per_layer": True}  # a settings field that the wrappers hold, each its own: field(metadata=PER_LAYER)


def joined_settings(model, name: str, settings):
    """What an adapter file will say after another call of one method on one adapter (LoRA on other layers):
    the targets of both; the first call's PER_LAYER settings (the wrappers hold their own); any other setting
    must be the same in both, as the file holds one. The first call's settings as they are."""
    earlier = getattr(model, "adapter_settings", {}).get(name, {}).get(type(settings))
    if earlier is None:
        return settings
    joined = {}
    for field in fields(settings):
        new, old = getattr(settings, field.name), getattr(earlier, field.name)
        if isinstance(new, list):
            joined[field.name] = old + [item for item in new if item not in old]
        elif not field.metadata.get("per_layer") and new != old:
            raise BadInput(f"{field.name}: {new!r} differs from {old!r}, what adapter {name!r} was given before; "
                           f"its adapter file holds one (give the new layers another name=)")
    return replace(earlier, **joined)


def record_settings(model, name: str, settings):
    """Keep what a method was asked for, under its adapter's name, to be saved in its adapter file. The
    first adapter added is the active one, and so is one added after every other was deleted."""
    check_name(name)
    if not hasattr(model, "adapter_settings"):
        model.adapter_settings = {}
    model.adapter_settings.setdefault(name, {})[type(settings)] = settings
    if getattr(model, "active_adapter", None) is None and list(model.adapter_settings) == [name]:
        model.active_adapter = name
