"""ALoRA: LoRA whose ranks are moved, while it trains, from the modules that do not need them to those that do.

Liu, Lyn, Zhu, Tian and Graham 2024, "ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language
Models" (NAACL 2024, arXiv 2403.16187).

    x ─┬─► base_layer (frozen W) ────────────────────────────────────────┐
       │                                                                (+) ─► y = W x + s B G A x
       └─► dropout ─► A (in ─► R) ─► G = diag(g) ─► B (R ─► out) ─► x s ─┘

    g in {0, 1}^R: a gate on each of the R rank slots. r of them start open (g_i = 1) and the rest closed.

1. AB-LoRA, importance by ablation: rank i of a module matters by how much the held-out loss rises when it
   alone is closed,  score_i = L(g with g_i = 0) - L(g).  A score below 0 is a harmful rank.
2. Reallocation, every few steps: close the `prune` lowest-scoring ranks of all modules (A row, B column
   zeroed) and open as many slots in the modules whose open ranks score highest on average, one a module in
   turn: a fresh A row as LoRA starts it and a zero B column, which change nothing until trained. The budget,
   the number of open ranks, stays what it was.

With nothing reallocated (R = r, every gate open), ALoRA is LoRA (tested). Trains R (in + out) numbers per
wrapped layer, r (in + out) of them in use at the start; a closed slot gets no gradient (G = 0).

Choices where the paper leaves them open: s = alpha / r for the starting r, fixed, so moving a rank never
rescales the others; the score is the rise in the loss on held-out batches the caller gives; a module may lose
every rank; the R slots a module can grow into (`capacity`, 2 r by default) exist from the start.

On disk: once trained, an ALoRA adapter is a LoRA adapter with a rank per module, so its file is peft's LoRA
file (formats/alora.py): the open ranks only, rank_pattern r_i, alpha_pattern s r_i. peft loads it.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import attach, linears_named, matmul_input
from .lora import LoRALayer


class ALoRALayer(LoRALayer):
    """A LoRALayer of R rank slots with a gate on each: y = W x + s B diag(g) A x."""
    kept_names = ("lora_gate",)  # not trained, but part of the adapter's state (run_state.py saves it)

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, capacity: int = None):
        capacity = capacity or r
        super().__init__(base_layer, capacity, alpha, dropout)  # A: (R, in), B: (out, R)
        self.scaling = alpha / r  # s: the starting rank's, whatever the number open later
        gate = torch.zeros(capacity, device=self.lora_A.weight.device)
        gate[:r] = 1.0
        self.register_buffer("lora_gate", gate)  # g: (R,), 1 for an open rank, 0 for a closed one

    def adapt_output(self, x, y):
        """y + s B G A x."""
        down = self.lora_A(self.dropout(matmul_input(x, self.lora_A.weight)))  # A x: (..., R)
        update = self.lora_B(down * self.lora_gate.to(down.dtype))  # B G A x: (..., out)
        return y + (self.scaling * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B G A: the (out, in) update this adapter adds to W (merge folds it in as LoRA's)."""
        return self.scaling * ((self.lora_B.weight * self.lora_gate) @ self.lora_A.weight)

    def open_ranks(self) -> list[int]:
        return self.lora_gate.nonzero().flatten().tolist()

    @torch.no_grad()
    def close(self, i: int):
        self.lora_gate[i], self.lora_A.weight[i], self.lora_B.weight[:, i] = 0.0, 0.0, 0.0

    @torch.no_grad()
    def open(self, i: int, generator: torch.Generator):
        """A fresh rank in slot i: A's row as LoRA starts it, B's column zero."""
        bound = 1 / math.sqrt(self.lora_A.in_features)  # kaiming_uniform_ with a = sqrt(5), as nn.Linear
        row = torch.rand(self.lora_A.in_features, generator=generator) * 2 * bound - bound
        self.lora_A.weight[i] = row.to(self.lora_A.weight)
        self.lora_B.weight[:, i] = 0.0
        self.lora_gate[i] = 1.0


@dataclass
class ALoRASettings:
    """What add_alora was asked for: its file is a LoRA file with a rank per module (formats/alora.py)."""
    r: int
    alpha: float
    dropout: float
    capacity: int
    targets: list = field(default_factory=list)


def add_alora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, capacity=None,
              name="default") -> int:
    """Wrap every linear that `targets` names in an ALoRALayer with r open ranks out of `capacity` slots
    (default 2 r). Returns how many. Call reallocate() while training to move ranks."""
    if not isinstance(r, int) or r <= 0:
        raise BadInput(f"r: expected a positive integer rank, got {r!r}")
    capacity = 2 * r if capacity is None else capacity
    if not isinstance(capacity, int) or capacity < r:
        raise BadInput(f"capacity: expected an integer of at least r ({r}), got {capacity!r}")
    if not 0 <= dropout < 1:
        raise BadInput(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    layers, asked = linears_named(model, targets, every_name_must_match=True)
    attach(model, name, ALoRASettings(r, alpha, dropout, capacity, asked), layers,
           lambda _, base: ALoRALayer(base, r, alpha, dropout, capacity))
    return len(layers)


def alora_layers(model, name="default") -> dict[str, ALoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ALoRALayer) and m.adapter_name == name}


@torch.no_grad()
def rank_scores(model, heldout_loss, name="default") -> dict[tuple[str, int], float]:
    """AB-LoRA: {(layer, slot): L(with that rank closed) - L(all open)}, over every open rank.
    `heldout_loss()` returns the loss (a float) of the model as it is, on the caller's held-out batches."""
    layers = alora_layers(model, name)
    everything = heldout_loss()
    scores = {}
    for layer_name, layer in layers.items():
        for i in layer.open_ranks():
            layer.lora_gate[i] = 0.0
            scores[(layer_name, i)] = heldout_loss() - everything
            layer.lora_gate[i] = 1.0
    return scores


@torch.no_grad()
def reallocate(model, heldout_loss, prune: int, seed: int = 0, name="default") -> dict:
    """One round of ALoRA: score every open rank (rank_scores), close the `prune` lowest, and open as many
    slots in the modules whose open ranks score highest on average, one a module in turn. Returns what it did:
    {"closed": [(layer, slot, score)], "opened": [(layer, slot)], "ranks": {layer: open ranks}}."""
    was_training = model.training
    model.eval()  # no dropout while scoring
    scores = rank_scores(model, heldout_loss, name)
    model.train(was_training)
    layers = alora_layers(model, name)
    closed = sorted(scores, key=scores.get)[:prune]
    for layer_name, i in closed:
        layers[layer_name].close(i)
    mean = {n: torch.tensor([s for (m, _), s in scores.items() if m == n]).mean() for n, _ in scores}
    losing = {layer_name for layer_name, _ in closed}
    growing = sorted((n for n in mean if n not in losing), key=lambda n: -mean[n])  # most important first
    generator, opened = torch.Generator().manual_seed(seed), []
    while len(opened) < len(closed) and any(0 in layers[n].lora_gate for n in growing):  # one a module in turn
        for layer_name in [n for n in growing if 0 in layers[n].lora_gate][:len(closed) - len(opened)]:
            slot = (layers[layer_name].lora_gate == 0).nonzero()[0].item()
            layers[layer_name].open(slot, generator)
            opened.append((layer_name, slot))
    return {"closed": [(n, i, scores[(n, i)]) for n, i in closed], "opened": opened,
            "ranks": {n: len(layer.open_ranks()) for n, layer in layers.items()}}

