"""The parts of a training run that are not PEFT: schedule, batches, evaluation, resumable checkpoints.

A checkpoint is one file, `checkpoint.pt`, written atomically (temp file, fsync, rename): the trainable
tensors, optimizer and scheduler state, every RNG state and the data position. Resuming from it
replays the run exactly: same batches, same dropout masks, same losses.
"""

import io
import math
import random
import resource

import torch

from .adapters import write_atomically
from .errors import MiniPeftError


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pad_batch(samples, device, pad_id=0):
    """Right-pad token lists into input ids, attention mask and labels (-100 on padding)."""
    longest = max(len(s) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = torch.tensor(sample)
        mask[row, :len(sample)] = True
    return ids.to(device), mask.to(device), ids.masked_fill(~mask, -100).to(device)


class Batches:
    """Endless micro-batches from a shuffled order that depends only on (seed, epoch): resumable by position."""

    def __init__(self, samples, batch_size, seed, epoch=0, cursor=0):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.epoch, self.cursor = epoch, cursor

    def order(self):
        if getattr(self, "order_epoch", None) != self.epoch:  # one shuffle per epoch
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self.shuffled, self.order_epoch = torch.randperm(len(self.samples), generator=generator).tolist(), self.epoch
        return self.shuffled

    def next(self):
        batch = []
        while len(batch) < self.batch_size:
            if self.cursor == len(self.samples):
                self.epoch, self.cursor = self.epoch + 1, 0
            batch.append(self.samples[self.order()[self.cursor]])
            self.cursor += 1
        return batch


@torch.no_grad()
def heldout_loss(model, samples, device, batch_size=8, autocast_dtype=None) -> float:
    """Mean next-token NLL over every held-out token."""
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        ids, mask, labels = pad_batch(samples[start:start + batch_size], device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model.loss(ids, labels, attention_mask=mask)
        tokens = (labels[:, 1:] != -100).sum().item()
        total, count = total + loss.item() * tokens, count + tokens
    return total / count


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


def clip_and_check(loss_value, parameters, step, max_norm=1.0):
    if not math.isfinite(loss_value):
        raise MiniPeftError(f"loss became {loss_value} at step {step}; stopped, the last checkpoint is kept")
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()


