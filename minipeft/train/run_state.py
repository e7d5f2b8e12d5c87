"""Resumable run state (a training checkpoint): what a run needs to continue exactly where it stopped.

One file, `checkpoint.safetensors`, written atomically (temp file, fsync, rename), so it is complete or
absent, never half of a new one:

    tensors     trainable/<name>          the adapter as trained so far
                kept/<name>               what a method changed without training it (ALoRA's gates)
                optimizer/<i>/<key>       AdamW's moments and step count for the i-th trainable tensor
                rng/torch, rng/cuda       the generators' states (dropout masks, sampling)
    metadata    {"state": JSON}           step, data position, settings, scheduler, optimizer hyper-parameters,
                                          Python's RNG state, and what the script adds (losses before, ...)

Nothing is unpickled: a planted or swapped file is data that is checked, never code that runs. Resuming
replays the run exactly: same batches, same dropout masks, same losses.

Not to be confused with gradient checkpointing (recompute in backward): minipeft/llama/gradient_checkpointing.py.
"""

import json
import random

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ..errors import BadInput
from ..files import write_atomically
from ..methods.freezing import adapter_state

CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(path, model, optimizer, scheduler, batches, device, **extra):
    """Everything a resume needs; `extra` must be JSON (numbers, strings, lists, dicts)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors = {f"trainable/{name}": p.detach().cpu().contiguous() for name, p in trainable}
    tensors.update({f"kept/{name}": t.detach().cpu().contiguous() for name, t in adapter_state(model).items()})
    optimizer_state = optimizer.state_dict()
    for index, moments in optimizer_state["state"].items():
        for key, value in moments.items():
            tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    version, python_state, gauss = random.getstate()
    state = {"optimizer_param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict(),
             "python_rng": [version, list(python_state), gauss], "trainable_names": [n for n, _ in trainable],
             "data": {"epoch": batches.epoch, "cursor": batches.cursor}, **extra}
    metadata = {"format": "minipeft-run-state-1", "state": json.dumps(state)}
    write_atomically(path, save_safetensors_bytes(tensors, metadata=metadata))


def read_checkpoint(path) -> tuple[dict, dict]:
    """(state, tensors) of a checkpoint file, or one clear error: it is never unpickled, only parsed."""
    try:
        data = path.read_bytes()
        tensors = load_safetensors_bytes(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_length]).get("__metadata__") or {}
        state = json.loads(metadata.get("state", "null"))
    except (OSError, SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise BadInput(f"{path}: not a readable training checkpoint ({str(e)[:200]})") from None
    if metadata.get("format") != "minipeft-run-state-1" or not isinstance(state, dict):
        raise BadInput(f"{path}: not a minipeft training checkpoint (no run state in its metadata)")
    for key, kind in STATE_TYPES.items():  # what a resume reads, each of the type it is read as
        value = state.get(key)
        if key in EXTRA and key not in state:  # what a script added (Run does), absent from a bare checkpoint
            continue
        if not isinstance(value, kind) or isinstance(value, bool) or key in COUNTS and value < 0:
            raise BadInput(f"{path}: its run state's {key!r} is {str(value)[:40]!r}, not a "
                           f"{getattr(kind, '__name__', 'number')}{' >= 0' if key in COUNTS else ''}")
    data, groups, number = state["data"], state["optimizer_param_groups"], (int, float)
    if not all(isinstance(data.get(k), int) and data[k] >= 0 for k in ("epoch", "cursor")):
        raise BadInput(f"{path}: its run state's 'data' should hold an epoch and a cursor, whole numbers")
    if not isinstance(state["scheduler"].get("last_epoch"), int) or not all(
            isinstance(g, dict) and all(isinstance(g.get(k), number) for k in ("lr", "eps", "weight_decay"))
            and isinstance(g.get("betas"), list) and all(isinstance(b, number) for b in g["betas"]) for g in groups):
        raise BadInput(f"{path}: its run state's scheduler or optimizer settings are not of the types saved")
    return state, tensors


STATE_TYPES = {"step": int, "tokens_seen": int, "seconds": (int, float), "settings": dict, "data": dict,
               "trainable_names": list, "optimizer_param_groups": list, "scheduler": dict, "python_rng": list}
COUNTS = ("step", "tokens_seen", "seconds")
EXTRA = ("step", "tokens_seen", "seconds", "settings")


def changed_settings(saved: dict, settings: dict) -> list[str]:
    """The settings (script arguments, and the base's fingerprint) that differ from the checkpoint's."""
    names = {"base_fingerprint": "the base weights (their fingerprint)",
             "micro_batches_per_step": f"the micro-batches per step, processes x --accum "
                                       f"({saved.get('micro_batches_per_step')} in the checkpoint, "
                                       f"{settings.get('micro_batches_per_step')} here)"}
    return [names.get(k, f"--{k.replace('_', '-')} ({saved.get(k, 'missing')!r} in the checkpoint, {settings[k]!r} "
                         f"here)") for k in settings if saved.get(k, "missing") != settings[k]]


def checkpoint_settings(path) -> dict:
    return read_checkpoint(path)[0].get("settings") or {}


def check_resume_settings(path, settings, state=None, may_grow=(), say=True):
    """Refuse, by name and with both values, a resume whose settings differ from the checkpoint's (`state`, or
    read from `path`). Those named in `may_grow` (--max-steps) may be larger: the run goes on further, which
    is said in one line; smaller than the checkpoint's step is refused."""
    state = state if state is not None else read_checkpoint(path)[0]
    saved = state.get("settings") or {}
    step = state.get("step", 0)
    for name in may_grow:
        flag, value, before = "--" + name.replace("_", "-"), settings[name], saved.get(name, settings[name])
        if value < step:
            raise BadInput(f"--resume: {flag} {value} is below the checkpoint's step {step} (its run had {flag} "
                           f"{before}); give at least {step}")
    changed = changed_settings(saved, {k: v for k, v in settings.items() if k not in may_grow})
    if changed:
        raise BadInput(f"--resume: {', '.join(changed)} differ; use the same settings or a new --out")
    for name in may_grow:
        flag, value, before = "--" + name.replace("_", "-"), settings[name], saved.get(name, settings[name])
        if value != before and say:
            print(f"note: {flag} {value} instead of the checkpoint's {before}: from step {step} the learning rate "
                  f"follows the schedule of a {value}-step run (the same warmup, then cosine decay to 0 at step "
                  f"{value})")


def load_checkpoint(path, model, optimizer, scheduler, batches, device, settings=None, may_grow=()) -> dict:
    """Put the checkpoint's adapter, optimizer, scheduler, RNG and data position back; return its state.

    `settings` that change the result must equal the checkpoint's; a mismatch is refused by name."""
    state, tensors = read_checkpoint(path)
    check_resume_settings(path, settings or {}, state, may_grow, say=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if state.get("trainable_names") != list(trainable):
        raise BadInput(f"{path}: its trainable tensors do not match this model's "
                       f"(other method, --r or --targets?)")
    try:
        with torch.no_grad():
            held = [(f"trainable/{name}", p) for name, p in trainable.items()] + [  # and what a method changed
                (f"kept/{name}", t) for name, t in adapter_state(model).items()]  # without training it (ALoRA)
            for key, parameter in held:
                saved = tensors[key]
                if saved.dtype != parameter.dtype or saved.shape != parameter.shape:
                    raise BadInput(f"{path}: {key} is {saved.dtype} {tuple(saved.shape)}, this run's is "
                                   f"{parameter.dtype} {tuple(parameter.shape)}")
                parameter.copy_(saved)
        moments = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                moments.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": moments, "param_groups": state["optimizer_param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng/torch"])
        version, python_state, gauss = state["python_rng"]
        random.setstate((version, tuple(python_state), gauss))
        if device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], device)
        batches.epoch, batches.cursor = state["data"]["epoch"], state["data"]["cursor"]
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise BadInput(f"{path}: not a complete training checkpoint ({str(e)[:200]})") from None
    return state
