"""Data parallelism across processes: the same script under `torchrun`, PyTorch's own DDP underneath.

    torchrun --nproc_per_node=N train_code.py ...        (python train_code.py ... : one process, as ever)

    rank 0: micro-batches 0, N, 2N, ...  ─┐
    rank 1: micro-batches 1, N+1, ...     ├─► each its own backward ─► all-reduce of the trainable
    ...                                   ┘   gradients only, once per step ─► the same AdamW step everywhere

Every rank holds the whole frozen 4-bit base (DDP, not FSDP: docs/scaling.md says when that stops
fitting). The base is never broadcast or all-reduced: DDP is told to ignore every frozen tensor. Inside
an accumulation step only the last micro-batch's backward syncs (`no_sync` before it). Every labelled
token weighs the same across ranks too: each rank divides its summed loss by the step's token count over
all ranks, and DDP's average over N ranks is undone by a factor N, so the step is one big batch.
"""

import contextlib
import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import BadInput



@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:  # the one process that prints and writes
        return self.rank == 0


def world_from_environment() -> World:
    """This process's place, from torchrun's variables; one process alone when they are absent."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise BadInput("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None


def start_processes(world: World, device: torch.device) -> torch.device:
    """Join the process group (gloo on CPU, nccl on CUDA) and return this rank's device; ranks other than 0
    print nothing from here on but errors."""
    if world.size == 1:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise BadInput(f"LOCAL_RANK {world.local_rank}: this machine has {torch.cuda.device_count()} GPUs; "
                           f"start at most that many processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    seconds = os.environ.get("MINIPEFT_DIST_TIMEOUT", "1800")  # how long a collective waits: torch's default
    if not seconds.isdigit() or int(seconds) == 0:
        raise BadInput(f"MINIPEFT_DIST_TIMEOUT: expected a whole number of seconds > 0, got {seconds!r}")
    timeout = datetime.timedelta(seconds=int(seconds))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    if not world.main:
        sys.stdout = open(os.devnull, "w")
    return device


@contextlib.contextmanager
def collective_failure(world: World, then=""):
    """A collective that fails (another rank died: killed, out of memory) ends this rank with one line,
    not a hang: gloo and nccl raise when a peer's connection drops, or after MINIPEFT_DIST_TIMEOUT.
    `then`: what to do."""
    try:
        yield
    except RuntimeError as e:
        if world.size == 1:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BadInput(f"rank {world.rank}: a step shared with the other processes failed ({reason}); another "
                       f"process has probably died.{then}") from None


def total(value, world: World, device) -> float:
    """The sum over ranks of a number (tokens, a loss)."""
    if world.size == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item()


class LossOf(nn.Module):
    """model.loss as a module's forward: DDP hooks into forward, and the loss is what we call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)


class DataParallelLoss:
    """`loss(...)` as model.loss, and `sync(last)` around each micro-batch: gradients meet across ranks
    only on the last micro-batch of a step. With one process, the plain model."""

    def __init__(self, model, world: World):
        self.world, self.module = world, LossOf(model)
        if world.size > 1:  # DDP neither broadcasts nor all-reduces what it is told to ignore: the frozen base
            frozen = [name for name, p in self.module.named_parameters() if not p.requires_grad]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.module, frozen + [name for name, _ in self.module.named_buffers()])
            self.module = DistributedDataParallel(self.module)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sync(self, last: bool):
        return contextlib.nullcontext() if self.world.size == 1 or last else self.module.no_sync()

    def close(self):
        """Leave the process group. DDP's reducer goes first, while the group lives: freed last, it would
        join gloo's threads while holding the GIL that they wait for, and the process would never exit."""
        if self.world.size > 1 and dist.is_initialized():
            self.module = None
            gc.collect()
            dist.destroy_process_group()
