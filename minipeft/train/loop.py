"""The pieces of one training loop that are not PEFT: schedule, token-weighted accumulation, evaluation.

Gradient accumulation weighs every labelled token the same, as one big batch would: each micro-batch
adds its summed loss, divided by the labelled tokens of the whole step. (Dividing each micro-batch's
mean by the number of micro-batches would make a short sample's tokens weigh more.)
"""

import contextlib
import math
import resource

import torch

from ..errors import BadInput
from ..llama.loss import scored_count
from ..progress import Progress
from .batches import pad_batch
from .distributed import World, total


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def scored_tokens(labels, documents=None, model=None, mask=None) -> int:
    """How many positions a batch's loss covers: each predicts the next token, where it is labelled, and
    in a packed row only within a document. With a `model`, as its loss counts (llama/loss.py): a method's
    prepended positions predict the first token, and a token its method reads is not scored."""
    if model is not None:
        return scored_count(model, labels, mask, documents)
    scored = labels[:, 1:] != -100
    if documents is not None:
        scored &= documents[:, 1:] == documents[:, :-1]
    return int(scored.sum())


def accumulate_gradients(model, micro_batches, autocast, parallel=None, seeds=None) -> tuple[float, int]:
    """Backward through each (ids, mask, labels) or packed (ids, mask, labels, documents) micro-batch,
    every labelled token weighted the same.

    Args:
        parallel: a distributed.DataParallelLoss when the step is shared by several processes: these are
            this rank's micro-batches, weighed against the tokens of all ranks, synced on the last one.
        seeds: one per micro-batch, set before its forward, so that its dropout masks depend on the
            micro-batch alone (not on the world size, nor on what ran before).

    Returns the step's mean loss per token and the number of tokens it covers (padding excluded), over
    every rank."""
    world = parallel.world if parallel else World()
    device = micro_batches[0][0].device
    scored = sum(scored_tokens(*batch[2:], model=model, mask=batch[1]) for batch in micro_batches)
    total_scored = max(total(scored, world, device), 1)
    loss_of = parallel or model.loss
    step_loss, step_tokens = 0.0, 0
    for index, (ids, mask, labels, *documents) in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[index])
        with parallel.sync(last=index == len(micro_batches) - 1) if parallel else contextlib.nullcontext():
            with autocast():  # DDP averages over ranks: x world.size makes it their sum
                loss = loss_of(ids, labels, attention_mask=mask, reduction="sum",
                               documents=documents[0] if documents else None) * world.size / total_scored
            loss.backward()
        step_loss, step_tokens = step_loss + loss.item() / world.size, step_tokens + int(mask.sum())
    return total(step_loss, world, device), int(total(step_tokens, world, device))


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The RNG seed of a step's index-th micro-batch (counted over all ranks)."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % 2**63


@torch.no_grad()
def heldout_loss(model, samples, device, batch_size=8, world=None, progress=False) -> float | None:
    """Mean next-token NLL over every held-out token (each rank of a `world` takes its share of the batches),
    in the caller's compute dtype (its autocast, if any); None without samples. `progress`: a label, to show
    the samples scored and the time left (on rank 0)."""
    world = world or World()
    if not samples:
        return None
    loss_sum, count = 0.0, 0
    starts = range(world.rank * batch_size, len(samples), world.size * batch_size)
    shown = Progress(progress, len(starts), unit="batches", scale=1) if progress and world.main else None
    for start in starts:
        ids, mask, labels = pad_batch(samples[start:start + batch_size], device)
        loss = model.loss(ids, labels, attention_mask=mask, reduction="sum")
        loss_sum += loss.item()
        count += scored_tokens(labels, model=model, mask=mask)
        if shown:
            shown.advance(1)
    if shown:
        shown.close()
    return total(loss_sum, world, device) / total(count, world, device)


def clip_and_check(loss_value, parameters, step, max_norm=1.0):
    if not math.isfinite(loss_value):
        raise BadInput(f"loss became {loss_value} at step {step}; stopped, the last checkpoint is kept")
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA, or a CPU with AVX512-BF16 or AMX. Elsewhere a
    CPU emulates bf16 matmuls, hundreds of times slower than fp32 (0.23 against 69 GFLOP/s on AVX2)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype(choice: str, device) -> str:
    """--dtype auto|fp32|bf16 to "fp32" or "bf16": auto is bf16 where the hardware has it, fp32 elsewhere."""
    return ("bf16" if native_bf16(device) else "fp32") if choice == "auto" else choice


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
