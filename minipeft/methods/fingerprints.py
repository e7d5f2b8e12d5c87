"""Fingerprints of the frozen base: a sha256 of every base tensor, named as in the bare base, to prove
that training never changes it (a training checkpoint keeps one digest of them to refuse another base)."""

import hashlib
import json

import torch

from .freezing import adapter_parameters, adapter_state
from .named_adapters import wrappers
from .placing import slot_names


def base_name(name: str, wrapped_paths: dict) -> str:
    """A tensor's name as in the bare base: `...q_proj.base_layer.weight` -> `...q_proj.weight`."""
    inner = max((path for path in wrapped_paths if name.startswith(path)), key=len, default=None)
    return name if inner is None else wrapped_paths[inner] + name[len(inner):]


def base_fingerprint(model) -> dict[str, str]:
    """sha256 of every base tensor (4-bit ones as stored, with their scales): to prove they never change."""
    adapter = {id(t) for t in [*adapter_parameters(model).values(), *adapter_state(model).values()]}
    adapter |= {id(t) for _, m in wrappers(model) for t in m.buffers(recurse=False)}  # a wrapper's own (DoRA's norms)
    slots = slot_names(model)
    wrapped_paths = {f"{name}.{m.wrapped}.": f"{slots[name]}." for name, m in wrappers(model)
                     if getattr(m, "wrapped", None)}
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
