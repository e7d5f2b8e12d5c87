"""EPT: a short soft prompt, a low-rank update of the text's embeddings, the prompt fused with that low-rank
knowledge, then projected into several subspaces whose results a gate mixes.

Lan, Yang, Liu, Guo, Jiang, Zhao and Wang 2024, "Efficient Prompt Tuning by Multi-Space Projection and Prompt
Fusion" (AAAI 2025, arXiv 2405.11464). Its decomposition is DePT's: Shi and Lipani 2023, "DePT: Decomposed Prompt
Tuning for Parameter-Efficient Fine-tuning" (arXiv 2309.05173).

    text ─► frozen embedding E (T, D) ─────────────────────► (+) ─► E' (T, D)    row t gets row t of A B
    A (s, r) @ B (r, D) = A B (s, D), a row a text position ──┘
                           │ keys and values
    P (m, D) ──┬───────────▼────────────────────────┐
               └─► softmax(P (A B)^T / sqrt(D)) A B ─► (+) ─► F ──┬────────────────────► (+) ─► P' (m, D)
                                                                   ├─► F Down_k Up_k ─► x g_k ──┘   k = 1 .. S
                                                                   └─► g = softmax(F W_gate) (m, S)
    the frozen model reads [P' ; E']

    decomposition   E'_t = E_t + (A B)_t for each text position t < s (DePT)       LowRankTextUpdate.offsets
    prompt fusion   F = P + softmax(P (A B)^T / sqrt(D)) A B                       WordEmbeddingsWithFusedPrompts
    multi-space     P' = F + sum_k g_k ⊙ (F Down_k Up_k)                           .prompts
    gating network  g = softmax(F W_gate)

The short prompt (m positions where prompt tuning needs more) is the paper's saving of time; the soft prompt's
remaining knowledge is kept in A and B, which update the text's embeddings as DePT does and, fused in, enrich
the short prompt.

What was read, and what is chosen. The paper's method section could not be read here (the search tool reaches
only the opening of its pages), so its equation numbers are not cited; the parts above are from its abstract
(a soft prompt decomposed into a shorter prompt and two low-rank matrices; the low-rank matrices and the short
prompt as knowledge that enriches the short prompt; projection into several subspaces mixed by a gating
network) and DePT's update of the input embeddings by A B, position by position. Chosen here, each open to the
paper's text: the fusion is one attention with P as the queries and the rows of A B as keys and values, scaled
by sqrt(D), added to P; each subspace is a rank-r down and up projection added to F; the gate is a softmax over
spaces for each prompt vector; positions t >= s (DePT's maximum length) get no update; the start is P from
vocabulary rows, A as nn.Linear starts a weight, B, every Up_k and W_gate zero (so EPT starts as prompt tuning
with P, and the gate even), Down_k small random.

With B = 0 and every Up_k = 0, EPT is prompt tuning with the short prompt (tested). Trains m D + s r + r D
+ S (2 D r) + D S numbers. On disk: minipeft's own file (formats/ept.py).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import Prepends, TextOffsetsWrapper, attach
from .prompt_tuning import initial_prompts


class LowRankTextUpdate(TextOffsetsWrapper):
    """Slot 5: the decomposition, E'_t = E_t + (A B)_t for each text position t < s."""
    trainable_names = ("knowledge_A", "knowledge_B")

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.knowledge_A = nn.Parameter(A)  # A: (s, r)
        self.knowledge_B = nn.Parameter(B)  # B: (r, D)
        self.inner = None

    def product(self) -> torch.Tensor:
        return self.knowledge_A @ self.knowledge_B  # A B: (s, D)

    def offsets(self, positions):
        """(A B)_t for each position t (B, T), zero from s on: (B, T, D)."""
        s = len(self.knowledge_A)
        return self.product()[positions.clamp(max=s - 1)] * (positions < s)[..., None]


class WordEmbeddingsWithFusedPrompts(Prepends):
    """Slot 2: wraps the frozen token embedding and prepends EPT's m prompt vectors P' to every sequence."""
    trainable_names = ("short_prompt", "space_down", "space_up", "space_gate")
    wrapped = "word_embeddings"

    def __init__(self, word_embeddings: nn.Module, P, update: LowRankTextUpdate, spaces: int, generator):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.knowledge = update.product  # A B, which slot 5's module trains: not a second copy of A and B
        (m, D), r, device = P.shape, update.knowledge_B.shape[0], P.device
        self.short_prompt = nn.Parameter(P.detach().clone().float())  # P: (m, D)
        down = torch.randn(spaces, D, r, generator=generator) / D ** 0.5 if not P.is_meta else torch.empty(spaces, D, r)
        self.space_down = nn.Parameter(down.to(device))  # Down_k: (S, D, r)
        self.space_up = nn.Parameter(torch.zeros(spaces, r, D, device=device))  # Up_k: (S, r, D)
        self.space_gate = nn.Parameter(torch.zeros(D, spaces, device=device))  # W_gate: (D, S)

    @property
    def weight(self):  # the vocabulary matrix, for lookups that must not prepend (cached decoding)
        return self.word_embeddings.weight

    def prompts(self) -> torch.Tensor:
        P, D, K = self.short_prompt, self.short_prompt.shape[1], self.knowledge()  # K = A B: (s, D)
        F = P + torch.softmax(P @ K.T / D ** 0.5, dim=-1) @ K  # prompt fusion: (m, D)
        g = torch.softmax(F @ self.space_gate, dim=-1)  # the gating network: (m, S)
        projected = torch.einsum("md,kdr,kre->kme", F, self.space_down, self.space_up)  # F Down_k Up_k: (S, m, D)
        return F + torch.einsum("mk,kmd->md", g, projected)  # P': (m, D)

    def adapt_output(self, input_ids, tokens):
        """P' in front of the tokens' embeddings (B, T, D): (B, m + T, D)."""
        return torch.cat([self.prompts().to(tokens.dtype).expand(len(tokens), -1, -1), tokens], dim=1)


@dataclass
class EPTSettings:
    """What add_ept was asked for: what its adapter file is written from (formats/ept.py)."""
    num_prompts: int
    max_length: int
    r: int
    spaces: int


def add_ept(model, num_prompts=8, max_length=256, r=4, spaces=3, seed=0, name="default"):
    """Freeze the model, put EPT's `num_prompts` vectors in front of every input and its low-rank update on the
    text's embeddings. Returns the prompt wrapper.

    Args:
        max_length: s, the text positions A B covers (DePT's maximum length); later positions get no update.
        r: the rank of A B, and of each subspace's projection.
        spaces: S, the subspaces the gate mixes.
        seed: the vocabulary rows sampled for P, and the start of A and Down_k.
    """
    for key, value in {"num_prompts": num_prompts, "spaces": spaces}.items():
        if not isinstance(value, int) or value <= 0:
            raise BadInput(f"{key}: expected a positive integer, got {value!r}")
    if not isinstance(max_length, int) or max_length <= 0:
        raise BadInput(f"max_length: expected a positive integer number of text positions, got {max_length!r}")
    if not isinstance(r, int) or not 0 < r <= min(max_length, model.config.hidden_size):
        raise BadInput(f"r: expected a rank from 1 to max_length ({max_length}), got {r}")
    embedding, generator = model.model.embed_tokens, torch.Generator().manual_seed(seed)
    device, D = embedding.weight.device, model.config.hidden_size
    P = initial_prompts(embedding, num_prompts, "vocab", None, None, generator).to(device)
    A = nn.init.kaiming_uniform_(torch.empty(max_length, r), a=5 ** 0.5, generator=generator)  # as nn.Linear
    update = LowRankTextUpdate(A.to(device), torch.zeros(r, D, device=device))
    made = attach(model, name, EPTSettings(num_prompts, max_length, r, spaces),
                  ["model.text_offsets", "model.embed_tokens"],
                  lambda slot, inner: update.stacked_on(inner) if slot == "model.text_offsets"
                  else WordEmbeddingsWithFusedPrompts(inner, P, update, spaces, generator))
    return made["model.embed_tokens"]
