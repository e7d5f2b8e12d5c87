"""Next-token cross-entropy: which positions are scored, and the loss through a frozen lm_head without ever
holding a (tokens, vocab) tensor.

Which positions: every labelled token (label != -100) at a real position, predicted by the position before it;
in a packed row (`documents`) nothing is predicted across a document boundary; a document's first token is
predicted from the last position prepended in front of the text (learned prompts), or not at all, as it would
be alone; a token that a layer prompt reads (contract 4 of model.py) is not scored. scored_positions says it
once, for the loss and for counting the loss's terms (scored_count) alike.

The loss:

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
import torch.nn as nn
import torch.nn.functional as F

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


def unread(model, labels, real_text):
    """`labels` with -100 on the text tokens that layer prompts read (contract 4): their loss would be a leak."""
    prompts = model.model.layer_prompts
    return labels if prompts is None else labels.masked_fill(prompts.reads(real_text), -100)


def scored_positions(labels, real, documents=None):
    """For labels (B, T) behind P = real.shape[1] - T prepended positions, real (B, P + T) bool and documents
    (B, T) or None: targets (B, P + T - 1), the token each position predicts; scored (B, P + T - 1) bool; and
    predictor (B, P + T - 1), the position whose hidden state predicts it (None: the one before it)."""
    prepended = real.shape[1] - labels.shape[1]
    targets = F.pad(labels, (prepended, 0), value=-100)[:, 1:]  # position t predicts token t + 1; prepended: none
    scored = (targets != -100) & real[:, :-1]  # only a real position predicts
    if documents is None:
        return targets, scored, None
    documents = F.pad(documents, (prepended, 0), value=-1)
    starts = documents[:, 1:] != documents[:, :-1]  # (B, P + T - 1): token t + 1 begins a document
    if prepended == 0:
        return targets, scored & ~starts, None
    predictor = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    predictor = predictor.masked_fill(starts, prepended - 1)  # a document's first token: from the last prepended
    return targets, (targets != -100) & real.gather(1, predictor), predictor


def next_token_loss(model, input_ids=None, labels=None, attention_mask=None, inputs_embeds=None, reduction="mean",
                    documents=None):
    """Llama.loss: the mean (or sum) cross-entropy over the scored positions; logits only at those, and through a
    frozen lm_head only a chunk at a time."""
    hidden, real = model.model(input_ids, attention_mask, None, inputs_embeds, with_mask=True,
                               documents=documents)  # (B, P + T, D), (B, P + T)
    labels = unread(model, labels, real[:, real.shape[1] - labels.shape[1]:])
    targets, scored, predictor = scored_positions(labels, real, documents)
    hidden = hidden[:, :-1]
    if predictor is not None:
        hidden = hidden.gather(1, predictor[..., None].expand(-1, -1, hidden.shape[-1]))
    hidden, targets = hidden[scored], targets[scored]  # (N, D), (N,)
    if isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad:
        total = linear_cross_entropy(hidden, model.lm_head.weight, targets)
    else:  # lm_head has its own adapter: the plain way
        total = F.cross_entropy(model.lm_head(hidden).float(), targets, reduction="sum")
    return total if reduction == "sum" else total / max(len(targets), 1)


@torch.no_grad()
def scored_count(model, labels, attention_mask=None, documents=None) -> int:
    """How many terms next_token_loss sums, without running the decoder: only the embedding is asked what it
    puts in front of an empty text (learned prompts: P positions, and in which rows they are real)."""
    real_text = attention_mask.bool() if attention_mask is not None else torch.ones_like(labels, dtype=torch.bool)
    front = model.model.embed_tokens(labels[:, :0])  # (B, P, D), or that and which of the P are real (B, P)
    front, front_real = front if isinstance(front, tuple) else (front, None)
    if front_real is None:
        front_real = torch.ones(front.shape[:2], dtype=torch.bool, device=labels.device)
    targets, scored, _ = scored_positions(unread(model, labels, real_text), torch.cat([front_real, real_text], 1),
                                          documents)
    return int(scored.sum())
