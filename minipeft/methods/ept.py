"""EPT: a short soft prompt, enriched by a longer low-rank one it attends to, then projected into several
subspaces whose results a gate mixes, per prompt vector.

Lan, Yang, Liu, Guo, Jiang, Zhao and Wang 2024, "Efficient Prompt Tuning by Multi-Space Projection and Prompt
Fusion" (arXiv 2405.11464).

    P (m, D) ──┬─────────────────────────────► (+) ─► F ──┬─────────────────────────────► (+) ─► E (m, D)
               └─► softmax(P K^T / √D) K ───────┘         ├─► F Down_s Up_s ─► x g_s ──────┘   for s = 1 .. S
                                       ▲                  └─► g = softmax(F W_gate): (m, S)
    K = A B (n, D), rank r ────────────┘  the longer prompt, decomposed

    prompt fusion          F = P + softmax(P K^T / √D) K                 K = A B, A (n, r), B (r, D)
    multi-space projection E = F + sum_s g_s ⊙ (F Down_s Up_s)           Down_s (D, r), Up_s (r, D)
    gating network         g = softmax(F W_gate)                         W_gate (D, S): one weight a space a row

E (m, D) goes in front of the text as prompt tuning's prompts do (the decoder's contract 2: always attended,
never scored, cached from prefill on). The prompt is m long where prompt tuning needs n > m, which is the
paper's saving of time; K is where the longer prompt's knowledge is kept, in r (n + D) numbers.

With K = 0 and every Up_s = 0, E = P: EPT is prompt tuning with the short prompt (tested).

Choices (the paper's own equations could not be read for this file; its abstract gives the parts above):
the fusion is one attention of the short prompt over the low-rank rows with P as the queries, scaled by √D,
added to P; each subspace is a rank-r down and up projection added to F; the gate is a softmax over spaces,
for each prompt vector. The start: P is m sampled vocabulary rows (prompt tuning's "vocab" start), K the best
rank-r approximation of n others (as LoPT starts), Down_s small random, Up_s and W_gate zero, so the spaces
add nothing until they train and the gate starts even.

On disk (minipeft's own file; peft has no EPT, formats/ept.py): adapter_config.json {"peft_type": "EPT",
"num_virtual_tokens": m, "num_knowledge_rows": n, "r": r, "num_spaces": S} and the tensors named as here.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import Prepends, attach
from .lopt import low_rank_start
from .prompt_tuning import initial_prompts


class WordEmbeddingsWithFusedPrompts(Prepends):
    """Wraps the frozen token embedding and prepends EPT's m prompt vectors E to every sequence."""
    trainable_names = ("short_prompt", "knowledge_A", "knowledge_B", "space_down", "space_up", "space_gate")
    wrapped = "word_embeddings"

    def __init__(self, word_embeddings: nn.Embedding, P, A, B, spaces: int, generator: torch.Generator):
        super().__init__()
        self.word_embeddings = word_embeddings
        D, r = B.shape[1], B.shape[0]
        self.short_prompt = nn.Parameter(P.detach().clone().float())  # P: (m, D)
        self.knowledge_A = nn.Parameter(A.detach().clone().float())  # A: (n, r)
        self.knowledge_B = nn.Parameter(B.detach().clone().float())  # B: (r, D)
        down = torch.randn(spaces, D, r, generator=generator) / D ** 0.5 if not B.is_meta else torch.empty(spaces, D, r)
        self.space_down = nn.Parameter(down.to(B.device))  # Down_s: (S, D, r)
        self.space_up = nn.Parameter(torch.zeros(spaces, r, D, device=B.device))  # Up_s: (S, r, D)
        self.space_gate = nn.Parameter(torch.zeros(D, spaces, device=B.device))  # W_gate: (D, S)

    @property
    def weight(self):  # the vocabulary matrix, for lookups that must not prepend (cached decoding)
        return self.word_embeddings.weight

    def prompts(self) -> torch.Tensor:
        P, D = self.short_prompt, self.short_prompt.shape[1]
        K = self.knowledge_A @ self.knowledge_B  # (n, D): the longer prompt, of rank r
        F = P + torch.softmax(P @ K.T / D ** 0.5, dim=-1) @ K  # prompt fusion: (m, D)
        g = torch.softmax(F @ self.space_gate, dim=-1)  # the gating network: (m, S)
        projected = torch.einsum("md,sdr,sre->sme", F, self.space_down, self.space_up)  # F Down_s Up_s: (S, m, D)
        return F + torch.einsum("ms,smd->md", g, projected)  # E: (m, D)

    def adapt_output(self, input_ids, tokens):
        """E in front of the tokens' embeddings (B, T, D): (B, m + T, D)."""
        return torch.cat([self.prompts().to(tokens.dtype).expand(len(tokens), -1, -1), tokens], dim=1)


@dataclass
class EPTSettings:
    """What add_ept was asked for: what its adapter file is written from (formats/ept.py)."""
    num_prompts: int
    knowledge_rows: int
    r: int
    spaces: int


def add_ept(model, num_prompts=8, knowledge_rows=16, r=4, spaces=3, seed=0, name="default"):
    """Freeze the model and put EPT's `num_prompts` vectors in front of every input. Returns the wrapper.

    Args:
        knowledge_rows: n, the rows of the longer low-rank prompt K = A B that the short one attends to.
        r: the rank of K, and of each subspace's projection.
        spaces: S, the subspaces the gate mixes.
        seed: the vocabulary rows sampled for the start, and the projections' start.
    """
    for key, value in {"num_prompts": num_prompts, "knowledge_rows": knowledge_rows, "spaces": spaces}.items():
        if not isinstance(value, int) or value <= 0:
            raise BadInput(f"{key}: expected a positive integer, got {value!r}")
    if not isinstance(r, int) or not 0 < r <= min(knowledge_rows, model.config.hidden_size):
        raise BadInput(f"r: expected a rank from 1 to knowledge_rows ({knowledge_rows}), got {r}")
    embedding, generator = model.model.embed_tokens, torch.Generator().manual_seed(seed)
    rows = initial_prompts(embedding, num_prompts + knowledge_rows, "vocab", None, None, generator)
    A, B = (t.to(embedding.weight.device) for t in low_rank_start(rows[num_prompts:], r))
    P = rows[:num_prompts].to(embedding.weight.device)
    made = attach(model, name, EPTSettings(num_prompts, knowledge_rows, r, spaces), ["model.embed_tokens"],
                  lambda _, inner: WordEmbeddingsWithFusedPrompts(inner, P, A, B, spaces, generator))
    return made["model.embed_tokens"]
