"""ALoRA: LoRA whose ranks are moved, while it trains, from the modules that do not need them to those that do.

Liu, Lyn, Zhu, Tian and Graham 2024, "ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language
Models" (NAACL 2024, arXiv 2403.16187).

    x ─┬─► base_layer (frozen W) ────────────────────────────────────────┐
       │                                                                (+) ─► y = W x + s B G A x
       └─► dropout ─► A (in ─► R) ─► G = diag(g) ─► B (R ─► out) ─► x s ─┘

The paper, each part with the code that computes it (the paper's alpha_i are the gates g_i):
  the layer   h = W x + B G A x, G diagonal, a gate a rank, 1 at the start           ALoRALayer.adapt_output
  Eq. (6)     IS(r) = S(M) - S(M\r) + S(M_r): S a validation score (here minus the loss), M the model,
              M\r without rank r, M_r with only rank r kept                          importance_scores
  pruning     a pruned rank's gate set to 0; its budget given to modules not pruned    move_ranks
  schedule    train first; then a bounded number of rounds, each pruning one rank per
              module type, with training between them        train/method_choice.py is_round

Read, and chosen: only the abstract, Figure 1's caption and Eq. 6 (as the project's notes quote it) could be
read here; no other equation number, round or step count of the paper is cited. Chosen: s = alpha / r of the
starting r, fixed; a module type is a linear's name (q_proj, ...); the freed ranks go one a module in turn to
the modules that lost none, by the mean IS of their open ranks; a new rank starts as LoRA's (B column 0);
growth is not capped unless `capacity` says so. Nothing reallocated, ALoRA is LoRA (tested). On disk: peft's
LoRA file with a rank per module (formats/alora.py).
"""

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
        gate = (torch.arange(capacity, device=self.lora_A.weight.device) < r).float()  # the first r open
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
        """A fresh rank in slot i: A's row as LoRA (nn.Linear) starts it, uniform in +-1/sqrt(in); B's column zero."""
        row = (2 * torch.rand(self.lora_A.in_features, generator=generator) - 1) / self.lora_A.in_features ** 0.5
        self.lora_A.weight[i], self.lora_B.weight[:, i], self.lora_gate[i] = row.to(self.lora_A.weight), 0.0, 1.0


@dataclass
class ALoRASettings:
    """What add_alora was asked for: its file is a LoRA file with a rank per module (formats/alora.py)."""
    r: int
    alpha: float
    dropout: float
    targets: list = field(default_factory=list)


def add_alora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, rounds=5, capacity=None,
              name="default") -> int:
    """Wrap every linear that `targets` names in an ALoRALayer with r open ranks; reallocate() moves them, in
    at most `rounds` rounds. `capacity`: rank slots a layer, None for no cap (r + rounds x module types)."""
    if not isinstance(r, int) or r <= 0 or not isinstance(rounds, int) or rounds < 0:
        raise BadInput(f"r and rounds: expected an integer rank >= 1 and rounds >= 0, got {r!r} and {rounds!r}")
    if not 0 <= dropout < 1:
        raise BadInput(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    layers, asked = linears_named(model, targets, every_name_must_match=True)
    types = len({layer.rsplit(".", 1)[-1] for layer in layers})  # q_proj, v_proj, ...: the ranks a round moves
    capacity = r + rounds * types if capacity is None else capacity
    if not isinstance(capacity, int) or capacity < r:
        raise BadInput(f"capacity: expected an integer of at least r ({r}), got {capacity!r}")
    attach(model, name, ALoRASettings(r, alpha, dropout, asked), layers,
           lambda _, base: ALoRALayer(base, r, alpha, dropout, capacity))
    return len(layers)


def alora_layers(model, name="default") -> dict[str, ALoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ALoRALayer) and m.adapter_name == name}


@torch.no_grad()
def importance_scores(model, heldout_loss, name="default") -> dict[tuple[str, int], float]:
    """AB-LoRA, Eq. (6): {(layer, slot): IS(r) = S(M) - S(M\\r) + S(M_r)} over every open rank r, with
    S = -heldout_loss(), the loss (a float) of the model as its gates are now, on the caller's held-out batches."""
    layers = alora_layers(model, name)
    gates = {n: layer.lora_gate.clone() for n, layer in layers.items()}

    def S(gates_of):  # the score with each layer's gates set to gates_of(layer name)
        for n, layer in layers.items():
            layer.lora_gate.copy_(gates_of(n))
        return -heldout_loss()
    S_M, scores = S(gates.get), {}  # S(M): every open rank
    for layer_name, i in [(n, i) for n, layer in layers.items() for i in layer.open_ranks()]:
        only = torch.zeros_like(gates[layer_name]).index_fill(0, torch.tensor(i), 1.0)  # rank r's gate alone
        S_without = S(lambda n: gates[n] - only if n == layer_name else gates[n])  # S(M\r): r closed
        S_alone = S(lambda n: only if n == layer_name else 0 * gates[n])  # S(M_r): r the only one open
        scores[(layer_name, i)] = S_M - S_without + S_alone  # Eq. (6)
    S(gates.get)  # every gate as it was
    return scores


@torch.no_grad()
def reallocate(model, heldout_loss, seed: int = 0, name="default") -> dict:
    """One round of ALoRA: score every open rank (Eq. 6), then move_ranks. Returns what it did: {"closed":
    [(layer, slot, score)], "opened": [(layer, slot)], "ranks": {layer: open ranks}}."""
    was_training, scores = model.training, importance_scores(model.eval(), heldout_loss, name)  # no dropout
    model.train(was_training)
    closed, opened = move_ranks(alora_layers(model, name), scores, torch.Generator().manual_seed(seed))
    return {"closed": [(n, i, scores[(n, i)]) for n, i in closed], "opened": opened,
            "ranks": {n: len(layer.open_ranks()) for n, layer in alora_layers(model, name).items()}}


@torch.no_grad()
def move_ranks(layers: dict, scores: dict, generator: torch.Generator):
    """Close each module type's (q_proj, ...) open rank of lowest score; open as many slots in the modules that
    lost none, by the mean score of their open ranks, one a module in turn. Returns (closed, opened) slots."""
    by_type = {n.rsplit(".", 1)[-1]: (n, i) for n, i in sorted(scores, key=scores.get, reverse=True)}
    closed = sorted(by_type.values(), key=scores.get)  # each module type's rank of lowest score (written last)
    for layer_name, i in closed:
        layers[layer_name].close(i)
    mean = {n: sum(s for (m, _), s in scores.items() if m == n) / sum(m == n for m, _ in scores) for n, _ in scores}
    growing = sorted((n for n in mean if n not in dict(closed)), key=lambda n: -mean[n])  # most important first
    opened = []
    while len(opened) < len(closed) and any(0 in layers[n].lora_gate for n in growing):  # one a module in turn
        for layer_name in [n for n in growing if 0 in layers[n].lora_gate][:len(closed) - len(opened)]:
            slot = (layers[layer_name].lora_gate == 0).nonzero()[0].item()
            layers[layer_name].open(slot, generator)
            opened.append((layer_name, slot))
    return closed, opened
