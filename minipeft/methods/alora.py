"""ALoRA: LoRA whose ranks are moved, while it trains, from the modules that do not need them to those that do.

Liu, Lyn, Zhu, Tian and Graham 2024, "ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language
Models" (NAACL 2024, arXiv 2403.16187).

    x ─┬─► base_layer (frozen W) ────────────────────────────────────────┐
       │                                                                (+) ─► y = W x + s B G A x
       └─► dropout ─► A (in ─► R) ─► G = diag(g) ─► B (R ─► out) ─► x s ─┘

    g in {0, 1}^R: a gate on each of the R rank slots (the paper's alpha_i). r of them start open (g_i = 1,
    "each alpha_i is set to 1 at initialization"), the rest closed: room to grow into.

The paper, and the line that computes each part:
  the layer       h = W x + B G A x, G diagonal, a gate per rank                      ALoRALayer.adapt_output
  Eq. (6), AB-LoRA, the importance of rank r, from scores S on a validation batch (S = minus its loss):
                  IS(r) = S(M) - S(M\r) + S(M_r)                                      importance_scores
                  M: the model as it is; M\r: rank r closed; M_r: rank r the only one kept
  pruning         a pruned rank's gate goes to 0 ("setting the corresponding gate to zeros")   ALoRALayer.close
  allocation      the pruned budget goes to the modules whose ranks were not pruned          reallocate
  the schedule    train the super-network first; then a bounded number of rounds, each pruning
                  one rank per module type, with training between rounds                    is_round

So IS(r) counts both what the model loses without r (the first two terms) and what r does on its own (the
third); a rank whose removal helps (S(M\r) > S(M)) and that is useless alone scores below the others.

What was read, and the choices this file makes where the paper's text could not be read here: the equations
above come from the paper's abstract, its Figure 1 caption and its Eq. (6) as quoted in this project's
reference notes (the search tool reaches only the opening of the paper's pages, not its method section); the
paper's other equation numbers, and its round count and step counts, could not be read, so none is cited.
- The scale s = alpha / r of the starting r, fixed, so moving a rank never rescales the others.
- S is minus the loss on the held-out batches the caller gives (the scripts: the fox text; 4 held-out files).
- "One rank per module type": each round closes, for each wrapped linear's name (q_proj, v_proj, ...), the
  open rank of lowest IS among all layers' modules of that name.
- The freed ranks go, one a module in turn, to the modules that lost none this round, most important first,
  a module's importance the mean IS of its open ranks; a module may lose every rank.
- Growth has no cap by default: `capacity` slots, r + (every rank the rounds can move), exist from the start,
  so no module is ever refused a rank; `capacity` set lower is a cap, for memory, and says so by its name.
- A new rank starts as LoRA starts one (a fresh A row, a zero B column): it changes nothing until trained.

With nothing reallocated (R = r, every gate open), ALoRA is LoRA (tested). Trains R (in + out) numbers per
wrapped layer, r (in + out) of them in use at the start; a closed slot gets no gradient (G = 0).

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


def add_alora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, rounds=5, capacity=None,
              name="default") -> int:
    """Wrap every linear that `targets` names in an ALoRALayer with r open ranks. Returns how many.
    Call reallocate() while training to move ranks, at most `rounds` times.

    Args:
        rounds: how many reallocation rounds the run will hold; with capacity None it sizes the slots.
        capacity: rank slots a layer. None: no cap, r + rounds x (module types), every rank the rounds can
            move; fewer caps a module's growth there (to save memory).
    """
    if not isinstance(r, int) or r <= 0:
        raise BadInput(f"r: expected a positive integer rank, got {r!r}")
    if not isinstance(rounds, int) or rounds < 0:
        raise BadInput(f"rounds: expected a number of reallocation rounds, 0 or more, got {rounds!r}")
    if not 0 <= dropout < 1:
        raise BadInput(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    layers, asked = linears_named(model, targets, every_name_must_match=True)
    types = {layer.rsplit(".", 1)[-1] for layer in layers}
    capacity = r + rounds * len(types) if capacity is None else capacity
    if not isinstance(capacity, int) or capacity < r:
        raise BadInput(f"capacity: expected an integer of at least r ({r}), got {capacity!r}")
    attach(model, name, ALoRASettings(r, alpha, dropout, capacity, asked), layers,
           lambda _, base: ALoRALayer(base, r, alpha, dropout, capacity))
    return len(layers)


def alora_layers(model, name="default") -> dict[str, ALoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ALoRALayer) and m.adapter_name == name}


@torch.no_grad()
def importance_scores(model, heldout_loss, name="default") -> dict[tuple[str, int], float]:
    """AB-LoRA, Eq. (6): {(layer, slot): IS(r) = S(M) - S(M\\r) + S(M_r)} over every open rank r, with
    S = -heldout_loss(), the loss (a float) of the model as its gates are now, on the caller's held-out batches."""
    layers = alora_layers(model, name)
    gates = {layer_name: layer.lora_gate.clone() for layer_name, layer in layers.items()}
    S_M = -heldout_loss()  # S(M): every open rank
    scores = {}
    for layer_name, layer in layers.items():
        for i in layer.open_ranks():
            layer.lora_gate[i] = 0.0
            S_without = -heldout_loss()  # S(M\r): rank r closed, every other open
            for other in layers.values():
                other.lora_gate.zero_()
            layer.lora_gate[i] = 1.0
            S_alone = -heldout_loss()  # S(M_r): rank r the only one open, in every module
            for other_name, other in layers.items():
                other.lora_gate.copy_(gates[other_name])
            scores[(layer_name, i)] = S_M - S_without + S_alone  # Eq. (6)
    return scores


@torch.no_grad()
def reallocate(model, heldout_loss, seed: int = 0, name="default") -> dict:
    """One round of ALoRA: score every open rank (Eq. 6), close the lowest-scoring rank of each module type
    (q_proj, v_proj, ...), and give as many ranks to the modules that lost none, most important first (the
    mean score of their open ranks), one a module in turn. Returns what it did:
    {"closed": [(layer, slot, score)], "opened": [(layer, slot)], "ranks": {layer: open ranks}}."""
    was_training = model.training
    model.eval()  # no dropout while scoring
    scores = importance_scores(model, heldout_loss, name)
    model.train(was_training)
    closed, opened = move_ranks(alora_layers(model, name), scores, torch.Generator().manual_seed(seed))
    return {"closed": [(n, i, scores[(n, i)]) for n, i in closed], "opened": opened,
            "ranks": {n: len(layer.open_ranks()) for n, layer in alora_layers(model, name).items()}}


@torch.no_grad()
def move_ranks(layers: dict, scores: dict, generator: torch.Generator):
    """Given the scores, the round's move: close, for each module type (the name after the last dot), its
    open rank of lowest score; open as many slots in the modules that lost none, most important first (the
    mean score of their open ranks), one a module in turn. Returns (closed [(layer, slot)], opened [...])."""
    lowest = {}  # module type -> its open rank of lowest score, over every layer
    for layer_name, i in sorted(scores, key=scores.get):
        lowest.setdefault(layer_name.rsplit(".", 1)[-1], (layer_name, i))
    closed = list(lowest.values())
    for layer_name, i in closed:
        layers[layer_name].close(i)
    mean = {n: sum(s for (m, _), s in scores.items() if m == n) / sum(m == n for m, _ in scores) for n, _ in scores}
    losing = {layer_name for layer_name, _ in closed}
    growing = sorted((n for n in mean if n not in losing), key=lambda n: -mean[n])  # most important first
    opened = []
    while len(opened) < len(closed) and any(0 in layers[n].lora_gate for n in growing):  # one a module in turn
        for layer_name in [n for n in growing if 0 in layers[n].lora_gate][:len(closed) - len(opened)]:
            slot = (layers[layer_name].lora_gate == 0).nonzero()[0].item()
            layers[layer_name].open(slot, generator)
            opened.append((layer_name, slot))
    return closed, opened


def is_round(step: int, start: int, every: int, rounds: int) -> bool:
    """The paper's schedule, in optimizer steps: train `start` steps first, then a round after every `every`
    steps, `rounds` of them at most (step start, start + every, ..., start + (rounds - 1) every)."""
    return step >= start and (step - start) % every == 0 and (step - start) // every < rounds
