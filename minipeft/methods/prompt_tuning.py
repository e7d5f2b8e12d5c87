"""Prompt tuning: learn a few input vectors in front of the text; the whole model stays frozen.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".

    token ids ─► frozen embedding ─► (B, T, D) ───────────────┐
                                                              torch.cat(dim=1) ─► (B, P + T, D) ─► frozen Llama
    learned_prompts (P, D): the only trainable tensor ─► expand to (B, P, D) ┘

Trains num_prompts x hidden_size numbers: 16 x 4096 = 65,536 on Llama-7B (0.001% of 6.7B). The
decoder treats the P prepended positions as always attended, never scored; with a KV cache they are
processed once, at prefill (contract 2 in llama/model.py).

On disk (peft's layout): adapter_config.json {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": P,
"prompt_tuning_init", ...} and one tensor, prompt_embeddings (P, D).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInput
from .contract import Prepends, attach

INITS = ("random", "vocab", "text")  # Lester et al.'s three starting points


class PromptsInFront(Prepends):
    """Wraps the frozen token embedding and puts the P vectors of prompts() in front of every sequence (prompt
    tuning's; LoPT's and P-tuning's make them otherwise)."""
    wrapped = "word_embeddings"

    @property
    def weight(self):  # the vocabulary matrix, for lookups that must not prepend (cached decoding)
        return self.word_embeddings.weight

    def prompts(self) -> torch.Tensor:
        raise NotImplementedError

    def adapt_output(self, input_ids, tokens):
        """The learned prompts in front of the tokens' embeddings (B, T, D): (B, P + T, D)."""
        prompts = self.prompts().to(tokens.dtype).expand(len(tokens), -1, -1)  # (B, P, D)
        return torch.cat([prompts, tokens], dim=1)


class WordEmbeddingsWithLearnedPrompts(PromptsInFront):
    """Prepends `num_prompts` learned vectors to every sequence."""
    trainable_names = ("learned_prompts",)

    def __init__(self, word_embeddings: nn.Embedding, learned_prompts: torch.Tensor):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.learned_prompts = nn.Parameter(learned_prompts.detach().clone().float())  # (P, D)

    @property
    def num_prompts(self) -> int:
        return self.learned_prompts.shape[0]

    def prompts(self) -> torch.Tensor:
        return self.learned_prompts  # (P, D)


@dataclass
class PromptTuningSettings:
    """What add_prompt_tuning was asked for: what its adapter file is written from (formats/peft.py)."""
    num_prompts: int
    init: str
    init_text: str | None = None


def initial_prompts(embedding, num_prompts, init, init_text, tokenizer, generator):
    """Lester et al.'s three starting points: random normal, sampled vocabulary rows, or a text's embedding."""
    vocab = embedding.weight.detach()  # (V, D); may be stored 16-bit: only the rows taken are widened
    if vocab.is_meta:  # a model without weights, for shape and count checks
        return torch.empty(num_prompts, vocab.shape[1], device="meta")
    if init == "random":  # at the scale of the vocabulary's own vectors
        return torch.randn(num_prompts, vocab.shape[1], generator=generator) * vocab.float().std()
    if init == "vocab":
        return vocab[torch.randint(0, vocab.shape[0], (num_prompts,), generator=generator)].float()
    if not init_text or tokenizer is None:
        raise BadInput("add_prompt_tuning: init='text' needs init_text and tokenizer")
    ids = tokenizer.encode(init_text, add_bos=False)
    ids = (ids * (num_prompts // max(len(ids), 1) + 1))[:num_prompts]  # repeated, then cut to P
    return vocab[torch.tensor(ids)].float()


def nearest_tokens(prompts: torch.Tensor, vocabulary: torch.Tensor, k: int = 5):
    """What a learned prompt means, read off the vocabulary: for each of the P vectors, the k rows of the
    vocabulary embedding (V, D) nearest by cosine. Lester et al. found a trained prompt's neighbours form tight
    semantic clusters. Returns (similarities (P, k), token ids (P, k)), nearest first."""
    cosine = F.normalize(prompts.float(), dim=-1) @ F.normalize(vocabulary.float(), dim=-1).T  # (P, V)
    return cosine.topk(k, dim=-1)


def add_prompt_tuning(model, num_prompts=16, init="vocab", init_text=None, tokenizer=None, seed=0, name="default"):
    """Freeze the model and put `num_prompts` learned vectors in front of every input. Returns the wrapper.

    Args:
        init: "random" (normal), "vocab" (rows of the vocabulary embedding) or "text" (the embedding of
            `init_text`, repeated or cut to num_prompts tokens).
        name: the adapter they belong to.
    """
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise BadInput(f"num_prompts: expected a positive integer, got {num_prompts!r}")
    if init not in INITS:
        raise BadInput(f"add_prompt_tuning: init must be one of {INITS}, got {init!r}")
    embedding = model.model.embed_tokens
    generator = torch.Generator().manual_seed(seed)
    prompts = initial_prompts(embedding, num_prompts, init, init_text, tokenizer, generator).to(embedding.weight.device)
    settings = PromptTuningSettings(num_prompts, init, init_text if init == "text" else None)
    made = attach(model, name, settings, ["model.embed_tokens"],
                  lambda _, inner: WordEmbeddingsWithLearnedPrompts(inner, prompts))
    return made["model.embed_tokens"]
