"""Several named adapters on one frozen base, and batches in which each row runs with its own.

    model.model.layers[i].self_attn.q_proj = LoRA "code" ─wraps─► LoRA "fox" ─wraps─► frozen q_proj
    batch rows:  0 "fox"   1 "code"   2 None (the bare base)   3 "code"

    y = W x                          the frozen base, once, over the whole batch (the innermost module)
    y[rows of fox]  += fox's update  each adapter only over its own rows (wrappers.in_rows)
    y[rows of code] += code's update

Adapters are stacked on a slot, each single-adapter as its method file writes it; since a row has one
adapter, the others pass it through untouched, and the row gets what it would get alone. Learned
prompts and a learned past go in front of every row, masked out in the rows of other adapters, so a
row's text keeps the positions it would have alone (the contract in llama/model.py). This works in
training too: gradients reach only the adapters that some row used. (peft's mixed batches are for
inference only, and leave out DoRA and the prompt methods.)

Which rows an adapter serves is set by `set_adapter`; the first adapter added is active until then.
"""

from ..errors import MiniPeftError
from .wrappers import route, wrappers


def adapter_names(model) -> list[str]:
    """The names of the adapters on the model, in the order they were added."""
    return list(getattr(model, "peft_settings", {}))


def set_adapter(model, names):
    """Which adapter runs: a name for the whole batch, None for the bare base, or a list with a name (or
    None) for each row of the batches to come. Only the adapters in use train."""
    known = adapter_names(model)
    wanted = names if isinstance(names, list) else [names]
    unknown = [name for name in wanted if name is not None and name not in known]
    if unknown:
        raise MiniPeftError(f"set_adapter: no adapter named {unknown[0]!r}; the model has {known}")
    if isinstance(names, list) and not names:
        raise MiniPeftError("set_adapter: an empty list names no rows; give one name (or None) per row")
    model.active_adapter = list(names) if isinstance(names, list) else names
    route(model)


def delete_adapter(model, name: str):
    """Take adapter `name` off the model: each of its wrappers is replaced by what it wrapped."""
    if name not in adapter_names(model):
        raise MiniPeftError(f"delete_adapter: no adapter named {name!r}; the model has {adapter_names(model)}")
    for path, module in reversed(wrappers(model)):  # inner ones first, so the paths stay valid
        if module.adapter_name == name:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, getattr(module, module.wrapped))
    del model.peft_settings[name]
    active = model.active_adapter
    model.active_adapter = [None if n == name else n for n in active] if isinstance(active, list) else (
        None if active == name else active)
    route(model)
