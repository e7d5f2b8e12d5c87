"""Next-token cross-entropy through a frozen lm_head, without ever holding a (tokens, vocab) tensor.

    hidden (N, D) ─► for each chunk of rows:  logits = h W^T                      (chunk, V)
                                              e = exp(logits - max)              in place of the logits
                                              loss  += max + log(sum e) - logits[target]
                                              dL/dh  = (e W) / sum e - W[target]  (chunk, D)
                       keep only dL/dh (N, D); backward scales it by the incoming gradient.

dL/dh is softmax(logits) W - onehot(target) W, with the softmax's division done on the (chunk, D)
product instead of the (chunk, V) probabilities, and the one-hot row picked out of W: one pass less
over the logits, and none to build the one-hot.

A plain `cross_entropy(lm_head(hidden))` keeps the logits' log-softmax for backward and builds their
gradient: three N x V float32 tensors, 600 MB for 4 x 256 tokens and a 49,152 vocabulary. Here the
peak is one chunk, and every chunk reuses the first one's memory (a fresh 50 MB block costs ~12 ms of
page faults on the CPU). W must be frozen (it is: lm_head is part of the base model).

W may be stored narrower than the hidden states (a bf16 checkpoint's lm_head under fp32 compute, see
quant.py): it is then widened a block of rows at a time, which is exact, so no wide copy of it exists.
"""

import torch

NUMBERS_AT_A_TIME = 1 << 22  # a narrower weight is widened about this many numbers at a time (16 MB in fp32)


def widened_blocks(weight, dtype):
    """(start, block) over the rows of a (V, D) weight, each block of about NUMBERS_AT_A_TIME weights in
    `dtype`; the weight itself, whole, when it is stored in `dtype` already."""
    if weight.dtype == dtype:
        yield 0, weight
        return
    rows = max(NUMBERS_AT_A_TIME // weight.shape[1], 1)
    for start in range(0, len(weight), rows):
        yield start, weight[start:start + rows].to(dtype)  # bf16/fp16 -> fp32 is exact


def matmul_dtype(x):
    """The dtype a matmul of x runs in: autocast's where it is on, else x's. A matmul written into `out=`
    is not autocast, so times_transposed casts by hand."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def times_transposed(x, weight, out=None):
    """x @ weight.T in matmul_dtype(x): (..., D) x (V, D) -> (..., V), written into `out` when given."""
    x = x.to(matmul_dtype(x))
    out = x.new_empty(*x.shape[:-1], len(weight)) if out is None else out
    for start, block in widened_blocks(weight, x.dtype):
        torch.matmul(x, block.t(), out=out[..., start:start + len(block)])
        del block  # before the next block is widened: one alive at a time, not two
    return out


def times(x, weight):
    """x @ weight in x's dtype: (N, V) x (V, D) -> (N, D)."""
    total = None
    for start, block in widened_blocks(weight, x.dtype):
        part = x[:, start:start + len(block)] @ block
        total = part if total is None else total.add_(part)
        del block
    return total


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        logits_memory = hidden.new_empty(min(chunk_size, len(targets)), len(weight),
                                         dtype=matmul_dtype(hidden))  # (chunk, V), reused by every chunk
        for start in range(0, len(targets), chunk_size):
            rows = slice(start, start + chunk_size)
            target = targets[rows, None]  # (chunk, 1)
            logits = times_transposed(hidden[rows], weight, out=logits_memory[:len(target)]).float()  # (chunk, V)
            picked = logits.gather(1, target)  # (chunk, 1): the target's logit
            peak = logits.amax(-1, keepdim=True)  # (chunk, 1)
            exps = logits.sub_(peak).exp_()  # exp(logits - max) <= 1, in place of the logits
            sums = exps.sum(-1, keepdim=True)  # (chunk, 1)
            total += (peak + sums.log() - picked).sum()  # logsumexp - the target's logit
            if grad_hidden is not None:
                grad = times(exps.to(hidden.dtype), weight) / sums  # softmax W: (chunk, D)
                grad_hidden[rows] = grad - weight[target[:, 0]].to(grad.dtype)  # less the target's row of W
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def linear_cross_entropy(hidden, weight, targets, chunk_size=256):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), for a frozen weight."""
    assert not weight.requires_grad, "linear_cross_entropy computes no gradient for the weight"
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
