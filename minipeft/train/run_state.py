"""Resumable run state (a training checkpoint): what a run needs to continue exactly where it stopped.

One file, `checkpoint.pt`, written atomically (temp file, fsync, rename): the trainable tensors,
optimizer and scheduler state, every RNG state and the data position. Resuming from it replays the
run exactly: same batches, same dropout masks, same losses.

Not to be confused with gradient checkpointing (recompute in backward): minipeft/llama/gradient_checkpointing.py.
"""

import io
import random

import torch

from ..errors import MiniPeftError
from ..files import write_atomically


def rng_states(device):
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states, device):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def save_checkpoint(path, model, optimizer, scheduler, batches, device, **extra):
    state = {"trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(device),
             "data": {"epoch": batches.epoch, "cursor": batches.cursor}, **extra}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


def load_checkpoint(path, model, optimizer, scheduler, batches, device) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if set(state["trainable"]) != set(trainable):
            raise MiniPeftError(f"{path}: its trainable tensors do not match this model's (other --r or --targets?)")
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (OSError, RuntimeError, KeyError, EOFError, ValueError) as e:
        raise MiniPeftError(f"{path}: not a readable training checkpoint ({e})") from None
    set_rng_states(state["rng"], device)
    batches.epoch, batches.cursor = state["data"]["epoch"], state["data"]["cursor"]
    return state
