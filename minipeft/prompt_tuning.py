"""Prompt tuning: learn a few input vectors in front of the text; the whole model stays frozen.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".

    token ids ─► frozen embedding ─► (B, T, D) ───────────────┐
                                                              torch.cat(dim=1) ─► (B, P + T, D) ─► frozen Llama
    learned_prompts (P, D): the only trainable tensor ─► expand to (B, P, D) ┘

Trains num_prompts x hidden_size numbers: 16 x 4096 = 65,536 on Llama-7B (0.001% of 6.7B). The
decoder treats the P prepended positions as always attended, never scored; with a KV cache they are
processed once, at prefill.
"""

import torch
import torch.nn as nn

from .errors import MiniPeftError
from .parameters import freeze_base

INITS = ("random", "vocab", "text")


class WordEmbeddingsWithLearnedPrompts(nn.Module):
    """Wraps the frozen token embedding and prepends `num_prompts` learned vectors to every sequence."""

    def __init__(self, word_embeddings: nn.Embedding, learned_prompts: torch.Tensor):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.learned_prompts = nn.Parameter(learned_prompts.detach().clone().float())  # (P, D)

    @property
    def num_prompts(self) -> int:
        return self.learned_prompts.shape[0]

    @property
    def weight(self):  # the vocabulary matrix, for lookups that must not prepend (cached decoding)
        return self.word_embeddings.weight

    def forward(self, input_ids):
        tokens = self.word_embeddings(input_ids)  # (B, T, D)
        prompts = self.learned_prompts.to(tokens.dtype).expand(len(input_ids), -1, -1)  # (B, P, D)
        return torch.cat([prompts, tokens], dim=1)  # (B, P + T, D)


def initial_prompts(embedding, num_prompts, init, init_text, tokenizer, generator):
    """Lester et al.'s three starting points: random normal, sampled vocabulary rows, or a text's embedding."""
    vocab = embedding.weight.detach().float()  # (V, D)
    if vocab.is_meta:  # a model without weights, for shape and count checks
        return torch.empty(num_prompts, vocab.shape[1], device="meta")
    if init == "random":  # at the scale of the vocabulary's own vectors
        return torch.randn(num_prompts, vocab.shape[1], generator=generator) * vocab.std()
    if init == "vocab":
        return vocab[torch.randint(0, vocab.shape[0], (num_prompts,), generator=generator)]
    if not init_text or tokenizer is None:
        raise MiniPeftError("add_prompt_tuning: init='text' needs init_text and tokenizer")
    ids = tokenizer.encode(init_text, add_bos=False)
    ids = (ids * (num_prompts // max(len(ids), 1) + 1))[:num_prompts]  # repeat, then cut, as peft does
    return vocab[torch.tensor(ids)]


def add_prompt_tuning(model, num_prompts=16, init="vocab", init_text=None, tokenizer=None, seed=0):
    """Freeze the model and put `num_prompts` learned vectors in front of every input. Returns the wrapper.

    Args:
        init: "random" (normal), "vocab" (rows of the vocabulary embedding) or "text" (the embedding of
            `init_text`, repeated or cut to num_prompts tokens).
    """
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise MiniPeftError(f"num_prompts: expected a positive integer, got {num_prompts!r}")
    if init not in INITS:
        raise MiniPeftError(f"add_prompt_tuning: init must be one of {INITS}, got {init!r}")
    if isinstance(model.model.embed_tokens, WordEmbeddingsWithLearnedPrompts):
        raise MiniPeftError("add_prompt_tuning: the model already has learned prompts")
    freeze_base(model)
    embedding = model.model.embed_tokens
    generator = torch.Generator().manual_seed(seed)
    prompts = initial_prompts(embedding, num_prompts, init, init_text, tokenizer, generator)
    wrapper = WordEmbeddingsWithLearnedPrompts(embedding, prompts.to(embedding.weight.device))
    model.model.embed_tokens = wrapper
    return wrapper


class without_prompts:
    """`with without_prompts(model): ...` runs the bare frozen model, then puts the prompts back."""

    def __init__(self, model):
        self.model, self.wrapper = model, model.model.embed_tokens

    def __enter__(self):
        self.model.model.embed_tokens = self.wrapper.word_embeddings
        return self.model

    def __exit__(self, *exc):
        self.model.model.embed_tokens = self.wrapper
