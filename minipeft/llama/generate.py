"""Text generation with a KV cache: greedy, or sampling with temperature and top-p (nucleus).

    prompts, left-padded ─► one forward over all prompt tokens (prefill: fills the cache)
       └─► loop: choose the next token from the last position's logits ─► forward just that token
                 (its keys/values join the cache) ─► stop at EOS or max_new_tokens
"""

import itertools

import torch

from ..errors import BadInput
from ..progress import Progress
from .kv_cache import KVCache
from .quant import decoded_weights


def choose_next(logits, temperature: float, top_p: float, generator, top_k: int = 0, min_p: float = 0.0):
    """logits (B, vocab) -> token ids (B,): greedy at temperature 0, else a draw from `kept`."""
    if temperature <= 0:
        return logits.argmax(-1)
    sorted_probs, order = kept(logits, temperature, top_p, top_k, min_p)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1), renormalised by multinomial
    return order.gather(-1, choice).squeeze(-1)


def kept(logits, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0):
    """The cuts in transformers' order (temperature, top-k, top-p, min-p): (probabilities in ascending order,
    0 where cut, not renormalised; the token ids they belong to)."""
    scores = logits.float() / temperature
    if top_k > 0:  # the k highest scores (ties with the k-th kept, as transformers keeps them)
        scores = scores.masked_fill(scores < scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:],
                                    float("-inf"))
    sorted_probs, order = torch.softmax(scores, dim=-1).sort(dim=-1)  # ascending: the unlikely tail first
    # Drop the tail while it adds up to at most 1 - top_p; what is left is the nucleus (as transformers cuts it).
    cut = sorted_probs.cumsum(-1) <= 1 - top_p
    if min_p > 0:  # and what is less likely than min_p times the likeliest (a ratio: renormalising keeps it)
        cut |= sorted_probs < min_p * sorted_probs[..., -1:]
    cut[..., -1] = False  # the most likely token always stays
    return sorted_probs.masked_fill(cut, 0.0), order


@torch.no_grad()
def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0, seed=None, eos_id=None,
             progress=False, weight_cache_mb=1024, read_codes=True, ended=None):
    """Continue each prompt (a list of token ids); return the new ids per prompt, without EOS.

    Args:
        prompts: a list of token-id lists, of any lengths (a batch is left-padded).
        temperature: 0 for greedy decoding; otherwise sample from softmax(logits / temperature).
        top_p: sample only from the smallest set of tokens whose probability adds up to top_p.
        seed: makes sampling repeatable.
        eos_id: generation of a sequence stops at this token, or at any of a list of them (default: the
            model config's eos_token_id, which Llama 3 instruct gives as a list).
        progress: a label, to show the tokens made and the time left on stdout (minipeft/progress.py).
        ended: a function of a row's new ids so far that says when it is complete (a stop that is not one
            token, as a HumanEval completion ends where the function does); the row stops there, that last
            token kept.
        read_codes: on CPU, each token multiplies straight from a 4-bit weight's codes, without decoding it
            (llama/fast_gemv.py), where that kernel serves the layer.
        weight_cache_mb: on CPU, how much of the other 4-bit weights (all of them with read_codes=False) to
            keep decoded while generating, so that each token does not decode them again
            (quant.decoded_weights); 0 keeps none.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInput("generate: every prompt needs at least one token")
    if not 0 < top_p <= 1:
        raise BadInput(f"generate: top_p must be in (0, 1], got {top_p}")
    stop_ids = model.config.eos_token_ids if eos_id is None else eos_id if isinstance(eos_id, list) else [eos_id]
    device = model.model.norm.weight.device  # lm_head may be wrapped by an adapter
    input_ids, attention_mask = left_padded(prompts, device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    with decoded_weights(model, weight_cache_mb if max_new_tokens > 1 else 0, read_codes):
        rows = decode(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, generator, stop_ids,
                      progress, ended)
    return [list(itertools.takewhile(lambda token: token not in stop_ids and token != -1, row)) for row in rows]


def left_padded(prompts, device):
    """Token-id lists as input ids and attention mask (B, longest), padded on the left: every prompt ends at
    the last column, where the next token is chosen."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    attention_mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        attention_mask[row, longest - len(prompt):] = True
    return input_ids, attention_mask


def decode(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, generator, stop_ids, progress,
           ended=None):
    """The prefill and the loop: each row's new ids, -1 after the row has ended."""
    device = input_ids.device
    cache = KVCache(model.config.num_hidden_layers)
    logits = model(input_ids, attention_mask, cache, last_only=True)[:, -1]  # (B, vocab)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=device)
    new_tokens = []
    shown = Progress(progress, max_new_tokens, unit="tokens", scale=1) if progress else None
    for _ in range(max_new_tokens):
        if shown:
            shown.advance(1)
        next_ids = choose_next(logits, temperature, top_p, generator)  # (B,)
        new_tokens.append(next_ids.masked_fill(finished, -1))  # -1: after this row's end
        finished |= torch.isin(next_ids, stop)
        if ended:  # each row's ids so far, read as the caller reads them
            made = torch.stack(new_tokens, dim=1).tolist()
            finished |= torch.tensor([not done and ended(row) for row, done in zip(made, finished.tolist())],
                                     device=device)
        if finished.all():
            break
        logits = model(next_ids[:, None], cache=cache, last_only=True)[:, -1]
    if shown:
        shown.close()
    return torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in input_ids]
