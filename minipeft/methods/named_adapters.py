"""Several named adapters on one frozen base, and batches in which each row runs with its own.

    model.model.layers[i].self_attn.q_proj = LoRA "code" ─wraps─► LoRA "fox" ─wraps─► frozen q_proj
    batch rows:  0 "fox"   1 "code"   2 None (the bare base)   3 "code"

    y = W x                          the frozen base, once, over the whole batch (the innermost module)
    y[rows of fox]  += fox's update  each adapter only over its own rows (in_mixed_batch)
    y[rows of code] += code's update

Adapters are stacked on a slot, each single-adapter as its method file writes it; since a row has one
adapter, the others pass it through untouched, and the row gets what it would get alone. Learned
prompts and a learned past go in front of every row, masked out in the rows of other adapters, so a
row's text keeps the positions it would have alone (the contract in llama/model.py). This works in
training too: gradients reach only the adapters that some row used. (peft's mixed batches are for
inference only, and leave out DoRA and the prompt methods.)

Which rows an adapter serves is set by `set_adapter`; the first adapter added is active until then.
"""

import torch

from ..errors import BadInput


def wrappers(model):
    """(name, module) for every module a PEFT method added."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "trainable_names")]


def route(model):
    """Give every wrapper the rows it serves, from `model.active_adapter`: one name (its adapters serve all
    rows, the others none), None (none serve any), or a list with a name or None per row. Only adapters that
    serve some row train."""
    active = getattr(model, "active_adapter", None)
    for _, module in wrappers(model):
        if isinstance(active, list):
            module.rows = tuple(row for row, name in enumerate(active) if name == module.adapter_name)
        else:
            module.rows = None if active == module.adapter_name else ()
        for tensor_name in module.trainable_names:
            module.get_parameter(tensor_name).requires_grad_(module.rows is None or len(module.rows) > 0)


def row_index(module, batch_size: int, device):
    """The rows a wrapper serves, as an index tensor; None for every row."""
    if module.rows is None:
        return None
    if module.rows and module.rows[-1] >= batch_size:
        raise BadInput(f"set_adapter: adapters were set for {module.rows[-1] + 1}+ rows, the batch has "
                       f"{batch_size}")
    return torch.tensor(module.rows, dtype=torch.long, device=device)


def in_mixed_batch(module, x, inner):
    """A wrapper's output when some rows of the batch are its adapter's: the wrapped module `inner` runs once, over
    the whole batch; adapt_input and adapt_output only over the rows this adapter serves, and the other rows
    get what `inner` gives them. x: (B, ..., in)."""
    rows = row_index(module, x.shape[0], x.device)
    y = inner(x.index_copy(0, rows, module.adapt_input(x[rows]).to(x.dtype)))  # (B, ..., out)
    return y.index_copy(0, rows, module.adapt_output(x[rows], y[rows]).to(y.dtype))


def on_own_rows(module, x, y, adapt):
    """adapt(x, y) in the rows a wrapper serves, y in the others: only the served rows are computed."""
    if not module.enabled:
        return y
    rows = row_index(module, x.shape[0], x.device)
    if rows is None:
        return adapt(x, y)
    if len(rows) == 0:
        return y
    return y.index_copy(0, rows, adapt(x[rows], y[rows]).to(y.dtype))


def row_mask(module, batch_size: int, device) -> torch.Tensor:
    """(B,) bool: True in the rows a wrapper serves (for prepended positions, which exist in every row)."""
    rows = row_index(module, batch_size, device)
    if not module.enabled:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    if rows is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    return torch.zeros(batch_size, dtype=torch.bool, device=device).index_fill(0, rows, True)


def prepended_on_own_rows(module, inner, adapt):
    """Learned prompts in a batch: adapt(y) puts a wrapper's P positions in front of y (B, T, D). `inner` is what
    the wrapped module gave: (B, T, D), or another adapter's (B, P' + T, D) with which of its P' positions
    are real (B, P'). In a mixed batch the P positions are real only in this adapter's rows (contract 2's
    mask in llama/model.py), where they go last, next to the text (its first token is predicted from the
    last prompt, as when alone)."""
    tokens, inner_real = inner if isinstance(inner, tuple) else (inner, None)
    serves = row_mask(module, len(tokens), tokens.device)  # (B,): the rows with this adapter
    if not serves.any():
        return inner
    if serves.all() and inner_real is None:
        return adapt(tokens)  # (B, P + T, D)
    prompts = adapt(tokens[:, :0]) * serves[:, None, None]  # (B, P, D): in front of nothing
    real = serves[:, None].expand(-1, prompts.shape[1])  # (B, P)
    if inner_real is None:
        return torch.cat([prompts, tokens], dim=1), real  # (B, P + T, D)
    inner_prompts, text = tokens[:, :inner_real.shape[1]], tokens[:, inner_real.shape[1]:]  # (B, P', D), (B, T, D)
    mine_last = serves[:, None, None]
    x = torch.where(mine_last, torch.cat([inner_prompts, prompts], 1), torch.cat([prompts, inner_prompts], 1))
    real = torch.where(mine_last[..., 0], torch.cat([inner_real, real], 1), torch.cat([real, inner_real], 1))
    return torch.cat([x, text], dim=1), real  # (B, P + P' + T, D), (B, P + P')


def filled_on_own_rows(module, x, real, prepended, soft_tokens):
    """Layer prompts in a batch (contract 4): in the rows a wrapper serves, its P positions, the last of the
    `prepended` in front of the text (where prepended_on_own_rows put them), get soft_tokens(text (B, T, D),
    the tokens it reads (B, T)) (B, P, D). x: (B, prepended + T, D), real: (B, prepended + T)."""
    P = module.num_prompts

    def fill(real, x):
        if prepended < P:
            raise BadInput(f"{type(module).__name__}: the batch has {prepended} positions in front of the text for "
                           f"its {P}; give input_ids, not inputs_embeds")
        text = x[:, prepended:]
        soft = soft_tokens(text, module.instruction(real[:, prepended:]))
        return torch.cat([x[:, :prepended - P], soft.to(x.dtype), text], dim=1)
    return on_own_rows(module, real, x, fill)


def past_on_own_rows(module, inner, batch_size, device, keys_and_values):
    """Learned pasts in a batch: keys_and_values(B) gives a wrapper's per-layer keys and values, `inner`
    another adapter's (or None). In a mixed batch the P positions are real only in this adapter's rows:
    returns keys, values and which positions are real (B, P' + P)."""
    serves = row_mask(module, batch_size, device)  # (B,): the rows with this adapter
    if not serves.any():
        return inner
    keys, values = keys_and_values(batch_size)
    if serves.all() and inner is None:
        return keys, values
    real = serves[:, None].expand(-1, keys[0].shape[2])  # (B, P): the positions are real only in this adapter's rows
    if inner is None:
        return keys, values, real
    inner_keys, inner_values, inner_real = inner if len(inner) == 3 else (
        *inner, torch.ones(batch_size, inner[0][0].shape[2], dtype=torch.bool, device=real.device))
    join = lambda a, b: [torch.cat([x, y], dim=2) for x, y in zip(a, b)]  # along the positions
    return join(inner_keys, keys), join(inner_values, values), torch.cat([inner_real, real], dim=1)


def adapter_names(model) -> list[str]:
    """The names of the adapters on the model, in the order they were added."""
    return list(getattr(model, "adapter_settings", {}))


def set_adapter(model, names):
    """Which adapter runs: a name for the whole batch, None for the bare base, or a list with a name (or
    None) for each row of the batches to come. Only the adapters in use train."""
    known = adapter_names(model)
    wanted = names if isinstance(names, list) else [names]
    unknown = [name for name in wanted if name is not None and name not in known]
    if unknown:
        raise BadInput(f"set_adapter: no adapter named {unknown[0]!r}; the model has {known}")
    if isinstance(names, list) and not names:
        raise BadInput("set_adapter: an empty list names no rows; give one name (or None) per row")
    model.active_adapter = list(names) if isinstance(names, list) else names
    route(model)


def delete_adapter(model, name: str):
    """Take adapter `name` off the model: each of its wrappers is replaced by what it wrapped."""
    if name not in adapter_names(model):
        raise BadInput(f"delete_adapter: no adapter named {name!r}; the model has {adapter_names(model)}")
    for path, module in reversed(wrappers(model)):  # inner ones first, so the paths stay valid
        if module.adapter_name == name:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, getattr(module, module.wrapped))
    del model.adapter_settings[name]
    active = model.active_adapter
    model.active_adapter = [None if n == name else n for n in active] if isinstance(active, list) else (
        None if active == name else active)
    route(model)
