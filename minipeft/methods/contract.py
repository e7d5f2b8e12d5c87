"""The contract every method's module keeps, as code: what it trains, what it wraps, whether it is on, and,
for a method that changes a weight, how it folds into that weight.

    class LoRALayer(Wrapper, Mergeable):
        trainable_names = ("lora_A.weight", "lora_B.weight")    the tensors it trains (the adapter file's)
        wrapped = "base_layer"                                  the attribute holding the module it wraps
        def adapt_output(self, x, y): return y + s B A x        the method, as a formula
        def fold(self, sign): W <- W + sign s B A               merge (+1) and unmerge (-1)

A Wrapper sits where the module it wraps was. Its forward is the method's formula around the wrapped module:

    adapt_output(x, inner(adapt_input(x)))

adapt_input(x) is what the wrapped module sees instead of x (IA3 on down_proj: l ⊙ x), adapt_output(x, y)
what comes out instead of its output y (LoRA: y + s B A x); each passes its input through unless the method
says otherwise. In a mixed batch the wrapped module runs once over the whole batch and the formula only over
the rows of this wrapper's adapter (named_adapters.py): adapt_input and adapt_output never see rows or other
adapters. (Two wrappers have a forward of their own, which reads `rows`: a classification head, which
changes what every row's output is and so refuses a mixed batch, task_head.py; and BitFit's trained norm gain,
which does not run the frozen norm where no row needs it, bitfit.py.) Every wrapper also has
    enabled        False passes the bare base through (minipeft.disabled)
    adapter_name   the named adapter it belongs to ("default")
    rows           which rows of the batch it serves: None for all (set by named_adapters.route)
and a Mergeable one `merged`: while merged, the wrapped module already computes the formula, and
training the method's tensors, which would change nothing, is refused.

An add_X function finds its slots (linears_named: the linears that `targets` names; innermost: the frozen
module under any adapters already there; pattern_value: peft's per-layer settings; disabled: the bare base)
and hands its wrappers to attach(), below.
"""

import torch
import torch.nn as nn

from ..errors import BadInput
from ..llama.quant import dequantize, is_4bit, requantize_
from .freezing import freeze_base
from .merging import disabled
from .named_adapters import filled_on_own_rows, in_mixed_batch, past_on_own_rows, prepended_on_own_rows, row_mask
from .placing import (PER_LAYER, SHORT_NAMES, check_free, check_name, in_slot, innermost, joined_settings,
                      linears_named, pattern_value, place, record_settings, target_matches)

__all__ = ["Wrapper", "Mergeable", "FoldsIntoWeight", "Prepends", "PastWrapper", "LayerPromptsWrapper",  # inherited
           "TextOffsetsWrapper",
           "matmul_input",  # what its own matmuls take
           "attach", "linears_named", "target_matches", "SHORT_NAMES", "innermost", "pattern_value", "disabled",
           "PER_LAYER"]  # its add_X


class Wrapper(nn.Module):
    trainable_names: tuple = ()
    kept_names: tuple = ()  # state it changes but does not train (ALoRA's gates): a training checkpoint keeps it
    wrapped: str = "base_layer"
    merged = False  # only a Mergeable wrapper is ever merged

    @classmethod
    def prepare_export(cls, model, config: dict) -> dict:
        """Before a merged model is written as a Hugging Face checkpoint: give the base what this method folds
        into, and say so in its config.json (`config`). Most methods need nothing."""
        return config

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.adapter_name = "default"
        self.rows = None

    def adapt_input(self, x):
        """What the wrapped module sees instead of x: x itself, unless the method says otherwise."""
        return x

    def adapt_output(self, x, y):
        """What comes out instead of the wrapped module's output y: y itself, unless the method says otherwise."""
        return y

    def forward(self, x):
        inner = getattr(self, self.wrapped)
        if self.merged:  # the wrapped module already computes the formula
            self.refuse_training_while_merged()
            return inner(x)
        if not self.enabled or self.rows == ():  # the bare base, or a batch with no row of this adapter
            return inner(x)
        if self.rows is None:  # every row is this adapter's: the method's formula
            return self.adapt_output(x, inner(self.adapt_input(x)))
        return in_mixed_batch(self, x, inner)  # some rows are this adapter's (named_adapters.py)

    def refuse_training_while_merged(self):
        trains = [name for name in self.trainable_names if self.get_parameter(name).requires_grad]
        if self.training and torch.is_grad_enabled() and trains:
            raise BadInput(f"{type(self).__name__}: this adapter is merged into its base weight, so training "
                           f"{trains[0]} would change nothing; unmerge() before training")


class Mergeable:
    """A method that changes a weight folds into it: merge() is fold(+1), unmerge() fold(-1), each at most once.
    fold returns the worst rounding error (0 unless the base is 4-bit and must be quantized again)."""

    def fold(self, sign: int) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> float:
        if self.merged:
            return 0.0
        error = self.fold(+1)
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> float:
        if not self.merged:
            return 0.0
        error = self.fold(-1)
        self.merged = False
        return error


class FoldsIntoWeight(Mergeable):
    """A Mergeable method whose change is a matrix of the wrapped linear's shape, delta_weight() (out, in) (LoRA,
    LoHa): fold reads W (decoding a 4-bit one), takes folded(W, sign), and writes it back (a 4-bit one rounded to
    its grid again, so W comes back from unmerge only approximately: the worst rounding error is returned)."""

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def folded(self, weight, sign: int) -> torch.Tensor:
        """W + delta, or W - delta to take it back out."""
        return weight + sign * self.delta_weight().float()

    def fold(self, sign: int) -> float:
        weight = dequantize(self.base_layer).float() if is_4bit(self.base_layer) else self.base_layer.weight.float()
        weight = self.folded(weight, sign)
        if is_4bit(self.base_layer):
            return requantize_(self.base_layer, weight)
        self.base_layer.weight.copy_(weight.to(self.base_layer.weight.dtype))
        return 0.0


class Prepends(Wrapper):
    """A wrapper whose output is longer than its input: positions in front of the text (prompt tuning).
    adapt_output(x, y) returns y with them in front; in a mixed batch they are real only in this
    adapter's rows (named_adapters.py)."""

    def forward(self, x):
        return prepended_on_own_rows(self, getattr(self, self.wrapped)(x), lambda y: self.adapt_output(x, y))


class PastWrapper(Wrapper):
    """Slot 3 of the decoder (llama/model.py): called with the batch size, it returns every layer's learned
    keys and values, from keys_and_values(batch_size); `inner` is another adapter's, when several share the
    base, and a mixed batch gives each row its own (named_adapters.py)."""
    wrapped = "inner"

    def stacked_on(self, inner):
        """This learned past over `inner`, another adapter's (or None), as attach() places it."""
        self.inner = inner
        return self

    def forward(self, batch_size):
        inner = self.inner(batch_size) if self.inner is not None else None
        device = next(self.parameters()).device
        return past_on_own_rows(self, inner, batch_size, device, self.keys_and_values)


class LayerPromptsWrapper(Wrapper):
    """Slot 4 of the decoder (llama/model.py): before block i, its adapter's P positions (the last P in front of
    the text) get soft_tokens(i, text (B, T, D), the tokens it reads (B, T)) (B, P, D); instruction(real text)
    says which tokens it reads, and the loss scores none of them. `inner` is another adapter's, when several
    share the base; a mixed batch fills only this adapter's rows (named_adapters.py)."""
    wrapped = "inner"
    num_prompts: int

    def forward(self, i, x, real, prepended):
        x = self.inner(i, x, real, prepended) if self.inner is not None else x
        return filled_on_own_rows(self, x, real, prepended, lambda text, reads: self.soft_tokens(i, text, reads))

    def reads(self, real_text):
        """(B, T) bool: the text tokens this adapter reads, in its rows (and those the inner adapter reads)."""
        inner = self.inner.reads(real_text) if self.inner is not None else torch.zeros_like(real_text)
        return inner | (row_mask(self, len(real_text), real_text.device)[:, None] & self.instruction(real_text))


class TextOffsetsWrapper(Wrapper):
    """Slot 5 of the decoder (llama/model.py): called with the text's positions (B, T), it returns what is added to
    the text's embeddings (B, T, D): offsets(positions), in the rows of its adapter, plus `inner`'s, another
    adapter's, when several share the base."""
    wrapped = "inner"

    def stacked_on(self, inner):
        """These offsets over `inner`, another adapter's (or None), as attach() places them."""
        self.inner = inner
        return self

    def forward(self, positions):
        inner = self.inner(positions) if self.inner is not None else 0
        serves = row_mask(self, len(positions), positions.device)  # (B,): the rows with this adapter
        return inner + self.offsets(positions) * serves[:, None, None] if serves.any() else inner


def matmul_input(x, weight):
    """x as a method's own matmul by `weight` takes it: under autocast as it comes, since autocast casts both
    sides to its dtype anyway (a cast to fp32 first would be undone); otherwise in the weight's dtype (a bf16
    base's activations meet fp32 LoRA matrices)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)


def attach(model, name: str, settings, slots, make_wrapper) -> dict:
    """Put make_wrapper(slot, the module there) in each slot, as part of adapter `name` (on a slot that another
    adapter holds, the new wrapper wraps the old one). Keep `settings`, what add_X was asked for, in
    model.adapter_settings[name][its class]: the adapter file is written from it (formats/). Then freeze
    every tensor but the wrappers' trainable_names. Returns {slot: wrapper}. Refused, before anything
    changes, where a slot already holds this method in adapter `name`."""
    check_name(name)
    made = {slot: make_wrapper(slot, in_slot(model, slot)) for slot in slots}
    for slot, wrapper in made.items():
        check_free(model, slot, name, wrapper)
    settings = joined_settings(model, name, settings)  # with an earlier call's on this adapter, if any
    for slot, wrapper in made.items():
        place(model, slot, wrapper, name)
    record_settings(model, name, settings)
    freeze_base(model)
    return made
