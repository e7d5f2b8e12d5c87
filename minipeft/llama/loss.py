"""Next-token cross-entropy through a frozen lm_head, without ever holding a (tokens, vocab) tensor.

    hidden (N, D) ─► for each chunk of rows:  logits = h W^T  (chunk, V)
                                              loss  += logsumexp(logits) - logits[target]
                                              dL/dh  = (softmax(logits) - onehot(target)) W   (chunk, D)
                       keep only dL/dh (N, D); backward scales it by the incoming gradient.

A plain `cross_entropy(lm_head(hidden))` keeps the logits' log-softmax for backward and builds their
gradient: three N x V float32 tensors, 600 MB for 4 x 256 tokens and a 49,152 vocabulary. Here the
peak is one chunk. W must be frozen (it is: lm_head is part of the base model).

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


def times_transposed(x, weight):
    """x @ weight.T in x's dtype: (..., D) x (V, D) -> (..., V)."""
    blocks = [x @ block.t() for _, block in widened_blocks(weight, x.dtype)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


def times(x, weight):
    """x @ weight in x's dtype: (N, V) x (V, D) -> (N, D)."""
    total = None
    for start, block in widened_blocks(weight, x.dtype):
        part = x[:, start:start + len(block)] @ block
        total = part if total is None else total.add_(part)
    return total


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, len(targets), chunk_size):
            rows = slice(start, start + chunk_size)
            logits = times_transposed(hidden[rows], weight).float()  # (chunk, V)
            target = targets[rows, None]  # (chunk, 1)
            logsumexp = logits.logsumexp(-1, keepdim=True)  # (chunk, 1)
            total += (logsumexp - logits.gather(1, target)).sum()
            if grad_hidden is not None:
                d_logits = logits.sub_(logsumexp).exp_()  # softmax, in place of the logits
                d_logits.scatter_add_(1, target, torch.full_like(target, -1, dtype=d_logits.dtype))
                grad_hidden[rows] = times(d_logits.to(hidden.dtype), weight)  # (chunk, D)
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
