"""VeRA: one pair of frozen random matrices shared by every adapted layer; each layer trains two vectors.

Kopiczko, Blankevoort and Asano 2024, "VeRA: Vector-based Random Matrix Adaptation" (ICLR 2024):

    h = W0 x + Λb B Λd A x          A (r, in), B (out, r): random, frozen, one pair for all layers
                                    Λd = diag(d), d (r,); Λb = diag(b), b (out,): trained, each layer its own

    x ─┬─► base_layer (frozen W0, full precision or 4-bit) ──────────────────────┐
       └─► A (shared) ─► ⊙ d ─► B (shared) ─► ⊙ b ──────────────────────────── (+) ─► h

b starts at zero, so an untouched adapter changes nothing, and d at d_initial (0.1), as in the paper and peft.
A and B are kaiming-uniform, drawn from a generator seeded with projection_prng_key (so a file need not hold
them: save_projection), one pair as large as the largest adapted layer, A (r, largest in) and B (largest out, r);
each layer reads its top-left part, A[:, :in] and B[:out, :], as peft does. The pair is held once, the layers'
parts are views of it. A layer trains out + r numbers, the paper's |Θ| = L_tuned (d_model + r): at r=256 on q and
v of Llama-7B's 32 layers, 32 x 2 x (4096 + 256) = 278,528, against LoRA's 4,194,304 at r=8. merge() folds
Λb B Λd A into W0 (contract.FoldsIntoWeight).

On disk (peft's layout): adapter_config.json {"peft_type": "VERA", "r", "target_modules", "projection_prng_key",
"save_projection", "d_initial", ...}; per adapted layer base_model.model.<layer name>.vera_lambda_b (out,) and
.vera_lambda_d (r,); with save_projection, base_model.vera_A (r, largest in) and base_model.vera_B (largest out, r).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import FoldsIntoWeight, Wrapper, attach, innermost, linears_named, matmul_input


class VeRALayer(Wrapper, FoldsIntoWeight):
    trainable_names = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor, d_initial: float):
        super().__init__()
        self.base_layer = base_layer
        linear = innermost(base_layer)  # the frozen linear (under other adapters, when several share it)
        out, into, r = linear.out_features, linear.in_features, A.shape[0]
        self.register_buffer("vera_A", A[:, :into], persistent=False)  # (r, in): a view of the shared A
        self.register_buffer("vera_B", B[:out, :], persistent=False)  # (out, r): a view of the shared B
        self.shared_pair = (A, B)  # the whole pair, for the adapter file (a plain attribute: not the module's state)
        self.vera_lambda_b = nn.Parameter(torch.zeros(out, device=A.device))  # b = 0: no change at the start
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=A.device))

    def adapt_output(self, x, y):
        """h = W0 x + Λb B Λd A x, from the wrapped layer's output y = W0 x."""
        x = matmul_input(x, self.vera_A)
        update = self.vera_lambda_b * ((self.vera_lambda_d * (x @ self.vera_A.T)) @ self.vera_B.T)  # (..., out)
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Λb B Λd A: the (out, in) update folded into W0 by merge()."""
        return (self.vera_lambda_b[:, None] * self.vera_B) @ (self.vera_lambda_d[:, None] * self.vera_A)


def kaiming_uniform(shape, generator) -> torch.Tensor:
    """U(-bound, bound), bound = sqrt(3) sqrt(2) / sqrt(fan_in): kaiming-uniform (gain sqrt 2) from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, largest_in: int, largest_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair, A (r, largest in) then B (largest out, r), from a CPU generator seeded with `key`."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return kaiming_uniform((r, largest_in), generator), kaiming_uniform((largest_out, r), generator)


@dataclass
class VeRASettings:
    """What add_vera was asked for: what its adapter file is written from (formats/peft.py)."""
    r: int
    targets: list = field(default_factory=list)
    key: int = 0
    d_initial: float = 0.1
    save_projection: bool = True


def add_vera(model, targets=("q_proj", "v_proj"), r=256, key=0, d_initial=0.1, save_projection=True,
             name="default") -> int:
    """Wrap every linear that `targets` names in a VeRALayer, all reading one shared random pair. Returns how many.

    Args:
        targets: module names or name suffixes ("q" for short), or one regex, as in peft (its Llama default: q, v).
        r: the shared matrices' rank (peft's default 256: VeRA trains r, not r x (in + out), a layer).
        key: the seed of the shared pair (peft's projection_prng_key).
        d_initial: d's start.
        save_projection: whether the adapter file holds the pair, or only its seed.
        name: the adapter these layers belong to: one add_vera call names all of its layers.
    """
    if not isinstance(r, int) or r <= 0:
        raise BadInput(f"r: expected a positive integer rank, got {r!r}")
    if VeRASettings in getattr(model, "adapter_settings", {}).get(name, {}):
        raise BadInput(f"add_vera: adapter {name!r} has VeRA already; one call names all of its layers, since they "
                       f"share one pair of matrices")
    slots, asked = linears_named(model, targets)
    linears = [innermost(model.get_submodule(slot)) for slot in slots]
    A, B = projections(r, max(m.in_features for m in linears), max(m.out_features for m in linears), key)
    device = linears[0].weight.device
    A, B = A.to(device), B.to(device)
    attach(model, name, VeRASettings(r, asked, key, d_initial, save_projection), slots,
           lambda slot, base: VeRALayer(base, A, B, d_initial))
    return len(slots)

