"""LoPT: prompt tuning whose prompt matrix is low-rank, the product of two thin learned matrices.

Guo, Damani and Chang 2024, "LoPT: Low-Rank Prompt Tuning for Parameter Efficient Language Models"
(arXiv 2406.19486), its first form, LoPT-1: X = U V.

    token ids ─► frozen embedding ─► (B, T, D) ──────────────────────────┐
                                                                         torch.cat(dim=1) ─► (B, P + T, D) ─► Llama
    U (P, r) @ V (r, D) = prompts (P, D) ─► expand to (B, P, D) ──────────┘

Trains r (P + D) numbers instead of prompt tuning's P D: 16,448 against 65,536 at P = 16, r = 4 on Llama-7B
(4x fewer); the paper reports prompt tuning's accuracy with about 5x fewer. At r = P every prompt matrix is
some U V, and LoPT is prompt tuning (tested). The rest is prompt tuning's: the decoder treats the P positions
as always attended and never scored, and a KV cache holds them from prefill on.

Choices where the paper leaves them open: the start is the best rank-r approximation of prompt tuning's
vocabulary start (P sampled vocabulary rows), by truncated SVD, U = U_r sqrt(S_r) and V = sqrt(S_r) V_r^T,
so both factors start at one scale. The paper's second form, X = sigma(X0 U) V, is not built.

On disk (minipeft's own file; peft has no LoPT): adapter_config.json {"peft_type": "LOPT",
"num_virtual_tokens": P, "r": r} and two tensors, prompt_U (P, r) and prompt_V (r, D) (formats/lopt.py).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import attach
from .prompt_tuning import PromptsInFront, initial_prompts


class WordEmbeddingsWithLowRankPrompts(PromptsInFront):
    """Prepends the P rows of U V to every sequence (prompt tuning's wrapper, its prompts made otherwise)."""
    trainable_names = ("prompt_U", "prompt_V")

    def __init__(self, word_embeddings: nn.Embedding, U: torch.Tensor, V: torch.Tensor):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.prompt_U = nn.Parameter(U.detach().clone().float())  # U: (P, r)
        self.prompt_V = nn.Parameter(V.detach().clone().float())  # V: (r, D)

    def prompts(self) -> torch.Tensor:
        return self.prompt_U @ self.prompt_V  # (P, D), of rank r at most: prompt tuning's wrapper puts it in front


@dataclass
class LoPTSettings:
    """What add_lopt was asked for: what its adapter file is written from (formats/lopt.py)."""
    num_prompts: int
    r: int


def low_rank_start(prompts: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U (P, r), V (r, D) with U V the best rank-r approximation of `prompts` (P, D) (Eckart-Young)."""
    if prompts.is_meta:  # a model without weights, for shape and count checks
        return torch.empty(prompts.shape[0], r, device="meta"), torch.empty(r, prompts.shape[1], device="meta")
    left, singular, right = torch.linalg.svd(prompts.float(), full_matrices=False)  # (P, k), (k,), (k, D)
    root = singular[:r].sqrt()
    return left[:, :r] * root, root[:, None] * right[:r]


def add_lopt(model, num_prompts=16, r=4, seed=0, name="default") -> WordEmbeddingsWithLowRankPrompts:
    """Freeze the model and put `num_prompts` learned vectors of rank `r` in front of every input. Returns the
    wrapper.

    Args:
        r: the rank of the P x D prompt matrix, at most num_prompts (where LoPT is prompt tuning).
        seed: the vocabulary rows sampled for the start.
        name: the adapter it belongs to.
    """
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise BadInput(f"num_prompts: expected a positive integer, got {num_prompts!r}")
    if not isinstance(r, int) or not 0 < r <= num_prompts:
        raise BadInput(f"r: expected a rank from 1 to num_prompts ({num_prompts}), got {r!r}")
    embedding = model.model.embed_tokens
    start = initial_prompts(embedding, num_prompts, "vocab", None, None, torch.Generator().manual_seed(seed))
    U, V = (t.to(embedding.weight.device) for t in low_rank_start(start, r))
    made = attach(model, name, LoPTSettings(num_prompts, r), ["model.embed_tokens"],
                  lambda _, inner: WordEmbeddingsWithLowRankPrompts(inner, U, V))
    return made["model.embed_tokens"]
