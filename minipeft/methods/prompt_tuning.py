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
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import MiniPeftError, refuse_unhonoured, require
from .wrappers import adapters_named, check_free, freeze_base, record_settings, row_mask, wrap

PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # ours -> peft's prompt_tuning_init
# Every key of peft's PromptTuningConfig: honoured, without effect once the prompts are trained, or refused.
PEFT_READ = ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "prompt_tuning_init",
             "prompt_tuning_init_text")
PEFT_NOT_MATH = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "num_attention_heads", "num_layers", "tokenizer_name_or_path", "tokenizer_kwargs")
PEFT_ONLY_DEFAULT = {"modules_to_save": None}


class WordEmbeddingsWithLearnedPrompts(nn.Module):
    """Wraps the frozen token embedding and prepends `num_prompts` learned vectors to every sequence."""
    trainable_names, wrapped = ("learned_prompts",), "word_embeddings"

    def __init__(self, word_embeddings: nn.Embedding, learned_prompts: torch.Tensor):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.learned_prompts = nn.Parameter(learned_prompts.detach().clone().float())  # (P, D)
        self.enabled, self.adapter_name, self.rows = True, "default", None

    @property
    def num_prompts(self) -> int:
        return self.learned_prompts.shape[0]

    @property
    def weight(self):  # the vocabulary matrix, for lookups that must not prepend (cached decoding)
        return self.word_embeddings.weight

    def forward(self, input_ids):
        inner = self.word_embeddings(input_ids)  # (B, T, D), or another adapter's (B, P' + T, D) and its mask
        tokens, inner_real = inner if isinstance(inner, tuple) else (inner, None)
        serves = row_mask(self, len(input_ids), tokens.device)  # (B,): the rows with this adapter
        if not serves.any():
            return inner
        prompts = self.learned_prompts.to(tokens.dtype).expand(len(input_ids), -1, -1)  # (B, P, D)
        if serves.all() and inner_real is None:
            return torch.cat([prompts, tokens], dim=1)  # (B, P + T, D)
        # A mixed batch: the P positions are real only in this adapter's rows (contract 2's mask), where they
        # go last, next to the text (its first token is predicted from the last prompt, as when alone).
        real = serves[:, None].expand(-1, self.num_prompts)  # (B, P)
        prompts = prompts * serves[:, None, None]
        if inner_real is None:
            return torch.cat([prompts, tokens], dim=1), real  # (B, P + T, D)
        inner_prompts, text = tokens[:, :inner_real.shape[1]], tokens[:, inner_real.shape[1]:]  # (B, P', D), (B, T, D)
        mine_last = serves[:, None, None]
        x = torch.where(mine_last, torch.cat([inner_prompts, prompts], 1), torch.cat([prompts, inner_prompts], 1))
        real = torch.where(mine_last[..., 0], torch.cat([inner_real, real], 1), torch.cat([real, inner_real], 1))
        return torch.cat([x, text], dim=1), real  # (B, P + P' + T, D), (B, P + P')


@dataclass
class PromptTuningSettings:
    """What add_prompt_tuning was asked for; saved as peft's PromptTuningConfig."""
    peft_type: ClassVar[str] = "PROMPT_TUNING"
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
        raise MiniPeftError("add_prompt_tuning: init='text' needs init_text and tokenizer")
    ids = tokenizer.encode(init_text, add_bos=False)
    ids = (ids * (num_prompts // max(len(ids), 1) + 1))[:num_prompts]  # repeat, then cut, as peft does
    return vocab[torch.tensor(ids)].float()


def add_prompt_tuning(model, num_prompts=16, init="vocab", init_text=None, tokenizer=None, seed=0, name="default"):
    """Freeze the model and put `num_prompts` learned vectors in front of every input. Returns the wrapper.

    Args:
        init: "random" (normal), "vocab" (rows of the vocabulary embedding) or "text" (the embedding of
            `init_text`, repeated or cut to num_prompts tokens).
        name: the adapter they belong to.
    """
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise MiniPeftError(f"num_prompts: expected a positive integer, got {num_prompts!r}")
    if init not in PEFT_INITS:
        raise MiniPeftError(f"add_prompt_tuning: init must be one of {tuple(PEFT_INITS)}, got {init!r}")
    check_free(model, "model.embed_tokens", name, WordEmbeddingsWithLearnedPrompts)
    embedding = model.model.embed_tokens
    generator = torch.Generator().manual_seed(seed)
    prompts = initial_prompts(embedding, num_prompts, init, init_text, tokenizer, generator).to(embedding.weight.device)
    wrap(model, "model.embed_tokens", lambda inner: WordEmbeddingsWithLearnedPrompts(inner, prompts), name)
    record_settings(model, name, PromptTuningSettings(num_prompts, init, init_text if init == "text" else None))
    freeze_base(model)
    return model.model.embed_tokens


# ---- the adapter file, in peft's layout ------------------------------------------------------------------

def to_peft(model, settings: PromptTuningSettings, name="default") -> tuple[dict, dict]:
    """peft's PromptTuningConfig and the one tensor, prompt_embeddings (P, D)."""
    shape = model.config
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": settings.num_prompts,
              "token_dim": shape.hidden_size, "num_transformer_submodules": 1,
              "num_attention_heads": shape.num_attention_heads, "num_layers": shape.num_hidden_layers,
              "prompt_tuning_init": PEFT_INITS[settings.init], "prompt_tuning_init_text": settings.init_text}
    wrapper, = adapters_named(model, name, WordEmbeddingsWithLearnedPrompts).values()
    return config, {"prompt_embeddings": wrapper.learned_prompts}


def from_peft(model, config: dict, source, name="default") -> dict:
    """Put learned prompts in front of `model` as the PromptTuningConfig says; return {file key: parameter}."""
    refuse_unhonoured(config, PEFT_READ, PEFT_NOT_MATH, PEFT_ONLY_DEFAULT, source)
    hidden = model.config.hidden_size
    require(config, "token_dim", int, source, hidden, hidden, default=hidden)  # the vectors live in the embedding
    require(config, "num_transformer_submodules", int, source, 1, 1, default=1)  # decoder-only: one stack
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
    init = {peft: ours for ours, peft in PEFT_INITS.items()}.get(config.get("prompt_tuning_init"), "random")
    wrapper = add_prompt_tuning(model, num_prompts, init="random", name=name)  # the file's values replace these
    model.peft_settings[name]["PROMPT_TUNING"] = PromptTuningSettings(num_prompts, init,
                                                                      config.get("prompt_tuning_init_text"))
    return {"prompt_embeddings": wrapper.learned_prompts}
