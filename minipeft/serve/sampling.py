"""How a request's settings turn one row's logits into its next token, in the order vLLM and transformers apply
them, and what `logprobs` reports.

    model logits ─► logit_bias (added) ─► repetition_penalty (transformers: every token of prompt and answer,
                    a positive logit divided by it, a negative one multiplied)
                 ─► frequency and presence penalties (OpenAI: logit - count x frequency - [count > 0] x presence,
                    over the answer's tokens) ─► while fewer than min_tokens: no end-of-sequence
                 ─► greedy, or temperature, top-k, top-p, min-p and a draw (generate.choose_next)
    logprobs: log-softmax of the model's own logits (before any of the above), the chosen token and the top ones
"""

from dataclasses import dataclass, field

import torch

from ..llama.generate import choose_next


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)  # token id -> bias
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the top k

    def plain(self) -> bool:
        """Greedy on the model's logits: the engine's batched argmax serves it."""
        return (self.temperature == 0 and self.repetition_penalty == 1 and not self.frequency_penalty
                and not self.presence_penalty and not self.logit_bias and not self.min_tokens)


def adjusted(logits, sampling: Sampling, prompt: list, made: list, stop_ids) -> torch.Tensor:
    """One row's logits (vocab,) after its bias, penalties and min_tokens."""
    logits = logits.clone()
    if sampling.logit_bias:
        ids = torch.tensor(list(sampling.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(sampling.logit_bias.values()), device=logits.device)
    if sampling.repetition_penalty != 1:
        seen = torch.tensor(sorted({*prompt, *made}), device=logits.device)
        score = logits[seen]
        logits[seen] = torch.where(score < 0, score * sampling.repetition_penalty, score / sampling.repetition_penalty)
    if made and (sampling.frequency_penalty or sampling.presence_penalty):
        counts = torch.bincount(torch.tensor(made, device=logits.device), minlength=logits.shape[-1]).to(logits)
        logits -= counts * sampling.frequency_penalty + (counts > 0).to(logits) * sampling.presence_penalty
    if len(made) < sampling.min_tokens and stop_ids:
        logits[list(stop_ids)] = float("-inf")
    return logits


def next_token(logits, sampling: Sampling, prompt, made, stop_ids, generator) -> int:
    scores = adjusted(logits, sampling, prompt, made, stop_ids)[None]
    return int(choose_next(scores, sampling.temperature, sampling.top_p, generator, sampling.top_k,
                           sampling.min_p)[0])


def logprob_entry(logits, token: int, k: int) -> tuple:
    """(token, its logprob, [(id, logprob)] of the k likeliest) under the model's own distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k) if k else None
    return token, float(logprobs[token]), [] if top is None else list(zip(top.indices.tolist(),
                                                                          top.values.tolist()))
