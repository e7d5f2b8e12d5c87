"""IAPT: instruction-aware prompt tuning. Every layer makes a few soft tokens (the paper: 4) from the instruction.

Zhu et al. 2024, "IAPT: Instruction-Aware Prompt Tuning for Large Language Models" (ACL 2024, arXiv 2405.18203).

    before block l:   x^l = [ P positions | the text's hidden states H^l (T, D) ]
                                             │ the instruction: its first n real tokens
                                             ▼
        Z     = Down(H^l / rms(H^l))                      (n, r)   RMS-normalised, then D ─► r
        w_j   = softmax_t(q_j . z_t / sqrt(r))            (n,)     self-attention pooling, a query a soft token
        p_j   = sum_t w_jt z_t                            (P, r)
        s_j   = sum_t w_jt h_t + Up(sigma_l(p_j))         (P, D)   the pooled states, plus the bottleneck's output
        x^l[P positions] = s                                       they hold layer l's soft tokens

    sigma_l(z) = (a0 + a1 z + ... + a5 z^5) / (1 + |b1 z + ... + b4 z^4|), each layer's own, started as GELU

Prompt tuning learns fixed vectors, prefix tuning fixed keys and values; IAPT's soft tokens summarise the
instruction, made in every layer from its hidden states (once in generation, then cached). embed_tokens prepends the
P positions (contract 2 of llama/model.py), layer_prompts fills them before every block (4).

Read (the abstract and summaries, not the method section: no equation number is cited), and followed: a generator
before every layer reads the instruction's hidden states there; a bottleneck of a down projection, self-attention
pooling to a fixed number of soft tokens, an activation and an up projection; each layer learns its own activation
as a rational function. Not followed: one summary says some generator parameters are shared across layers; which
could not be read, so every layer has its own generator here. Chosen where the paper leaves it open or could not be
read: the pooling runs on the Down-projected states, one learned query a soft token (queries start at 0: mean
pooling); the states are RMS-normalised first, so that every layer's scale is alike; the instruction is the first n
real tokens of a row (`instruction_tokens`), and the loss scores none of them, since the soft tokens have read them;
the generator has a skip connection, as adapters do, and Up starts at 0 (LoRA's B): each soft token starts as the
mean of the instruction's states in its layer, at the scale of real states (soft tokens of 0 sit where RMSNorm's
gradient is 1 / sqrt(eps)). Trains L (2 D r + P r + 10) numbers: 32 x (2 x 4096 x 16 + 4 x 16 + 10) = 4,196,672 on
Llama-7B with r = 16.
"""

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInput
from .contract import LayerPromptsWrapper, Prepends, attach


@cache  # LAPACK's least squares may differ in the last bit from call to call: one start a process
def gelu_as_rational(low=-4.0, high=4.0, points=2001):
    """a0..a5 and b1..b4 with P(z) / (1 + Q(z)) close to GELU on [low, high]: least squares on the linear
    P(z) - GELU(z) Q(z) = GELU(z) (Q(z) >= 0 there, so the |Q| of the safe form changes nothing)."""
    z = torch.linspace(low, high, points, dtype=torch.float64)
    f = F.gelu(z)
    powers = torch.stack([z ** k for k in range(6)], dim=1)  # (N, 6)
    system = torch.cat([powers, -f[:, None] * powers[:, 1:5]], dim=1)  # (N, 10)
    solution = torch.linalg.lstsq(system, f[:, None]).solution.flatten().float()
    return solution[:6], solution[6:]


class Rational(nn.Module):
    """sigma(z) = (a0 + a1 z + ... + a5 z^5) / (1 + |b1 z + ... + b4 z^4|), elementwise: a learned activation."""

    def __init__(self, numerator: torch.Tensor, denominator: torch.Tensor):
        super().__init__()
        self.numerator = nn.Parameter(numerator.clone())  # a: (6,)
        self.denominator = nn.Parameter(denominator.clone())  # b: (4,)

    def forward(self, z):
        powers = z[..., None] ** torch.arange(6, device=z.device)  # (..., 6): 1, z, ..., z^5
        return (powers @ self.numerator) / (1 + (powers[..., 1:5] @ self.denominator).abs())


class PromptGenerator(nn.Module):
    """One layer's generator: the instruction's hidden states in, P soft tokens out."""

    def __init__(self, hidden_size, r, num_prompts, numerator, denominator):
        super().__init__()
        self.down = nn.Linear(hidden_size, r, bias=False)  # kaiming-uniform, as nn.Linear starts
        self.queries = nn.Parameter(torch.zeros(num_prompts, r))  # q_j: (P, r)
        self.activation = Rational(numerator, denominator)
        self.up = nn.Linear(r, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, H, reads):
        """H (B, T, D) fp32, reads (B, T) bool: the instruction's tokens -> s (B, P, D)."""
        Z = self.down(H * torch.rsqrt(H.pow(2).mean(-1, keepdim=True) + 1e-6))  # (B, T, r)
        scores = torch.einsum("pr,btr->bpt", self.queries, Z) / Z.shape[-1] ** 0.5  # (B, P, T)
        weights = scores.masked_fill(~reads[:, None], torch.finfo(scores.dtype).min).softmax(-1)
        return weights @ H + self.up(self.activation(weights @ Z))  # s: (B, P, D)


class InstructionPositions(Prepends):
    """Slot 2: P positions in front of every text, zeros until layer_prompts fills them before block 0."""
    wrapped = "word_embeddings"

    def __init__(self, word_embeddings: nn.Module, num_prompts: int):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.num_prompts = num_prompts

    @property
    def weight(self):  # the vocabulary matrix, for lookups that must not prepend (cached decoding)
        return self.word_embeddings.weight

    def adapt_output(self, input_ids, tokens):
        return torch.cat([tokens.new_zeros(len(tokens), self.num_prompts, tokens.shape[-1]), tokens], dim=1)


class LayerPrompts(LayerPromptsWrapper):
    """Slot 4: before block i, generator i's soft tokens in this adapter's P positions."""

    def __init__(self, generators: nn.ModuleList, num_prompts: int, instruction_tokens: int, inner=None):
        super().__init__()
        self.generators, self.num_prompts, self.instruction_tokens = generators, num_prompts, instruction_tokens
        self.trainable_names = tuple(name for name, _ in self.named_parameters())
        self.inner = inner

    def soft_tokens(self, i, text, reads):
        return self.generators[i](text.float(), reads)  # H^l (B, T, D), the instruction (B, T) -> s (B, P, D)

    def instruction(self, real_text):
        """(B, T) bool: the first n real tokens of each row, what the generators read."""
        return real_text & (real_text.long().cumsum(-1) <= self.instruction_tokens)


@dataclass
class IAPTSettings:
    """What add_iapt was asked for: what its adapter file is written from (formats/iapt.py)."""
    num_prompts: int
    r: int
    instruction_tokens: int


def add_iapt(model, num_prompts=4, r=16, instruction_tokens=16, seed=0, name="default") -> LayerPrompts:
    """Freeze the model; give every layer a generator of `num_prompts` soft tokens, of bottleneck width `r`,
    reading the first `instruction_tokens` real tokens of each row. Returns the layer_prompts module."""
    if not all(isinstance(value, int) and value > 0 for value in (num_prompts, r, instruction_tokens)):
        raise BadInput(f"add_iapt: num_prompts, r and instruction_tokens should be positive integers, got "
                       f"{num_prompts!r}, {r!r} and {instruction_tokens!r}")
    embedding = model.model.embed_tokens
    if any(isinstance(m, Prepends) and m.adapter_name == name for m in embedding.modules()):
        raise BadInput(f"add_iapt: adapter {name!r} already puts positions in front of the text; give IAPT its "
                       f"own adapter name (name=...)")
    a, b, D, L = *gelu_as_rational(), model.config.hidden_size, model.config.num_hidden_layers
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws Down's start from the global generator, put back after
        torch.manual_seed(seed)
        generators = nn.ModuleList(PromptGenerator(D, r, num_prompts, a, b) for _ in range(L))
    generators = generators.to(embedding.weight.device)
    made = attach(model, name, IAPTSettings(num_prompts, r, instruction_tokens),
                  ["model.embed_tokens", "model.layer_prompts"],
                  lambda slot, inner: InstructionPositions(inner, num_prompts) if slot == "model.embed_tokens"
                  else LayerPrompts(generators, num_prompts, instruction_tokens, inner))
    return made["model.layer_prompts"]
