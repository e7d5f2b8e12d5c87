"""A trained task head, beside any method: the output layer learns too (peft's `modules_to_save`).

The lecture notes: "For the classification task we need to train the head additionally." Two heads:

    last hidden state h (B, T, D) ──► lm_head (frozen, V x D) ──► vocabulary logits      the base
                                  ├─► lm_head copy (trained) ───► vocabulary logits      add_task_head(model)
                                  └─► score (trained, C x D) ───► C class logits          add_task_head(model, C)
                                        read at each sequence's last real token: classify()

The copy starts equal to the frozen lm_head and trains all V x D of it (32,000 x 4,096 = 131M numbers at
Llama-7B: a head is no small adapter). The classification head is new, C x D numbers, started as
transformers starts LlamaForSequenceClassification's `score` (normal, std = initializer_range, 0.02), and
read at the last real token of each sequence, as transformers reads it.

On disk (peft's layout): the method's own adapter_config.json with "modules_to_save": ["lm_head"] or ["score"]
(task_type "SEQ_CLS" for a classifier), and base_model.model.lm_head.weight (V, D) or
base_model.model.score.weight (C, D) beside the method's tensors (formats/__init__.py).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import Wrapper, attach, innermost


class TrainedHead(Wrapper):
    """lm_head, with a trainable copy of its weight in place of the frozen one: logits = W' h."""
    trainable_names, wrapped = ("head.weight",), "lm_head"

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head
        frozen = innermost(lm_head).weight  # (V, D), 16-bit in some checkpoints
        self.head = nn.Linear(frozen.shape[1], frozen.shape[0], bias=False, device=frozen.device)
        with torch.no_grad():
            self.head.weight.copy_(frozen.float())

    def adapt_output(self, h, logits):
        """W' h, the trained head's logits, instead of the frozen head's."""
        return self.head(h.to(self.head.weight.dtype)).to(logits.dtype)


class ClassificationHead(Wrapper):
    """In place of lm_head: C class logits from each position's hidden state, score h (B, T, C)."""
    trainable_names, wrapped = ("score.weight",), "lm_head"

    def __init__(self, lm_head: nn.Module, num_labels: int, std: float = 0.02):
        super().__init__()
        self.lm_head = lm_head  # kept, unused while this head is on: disabled() and other rows use it
        hidden = innermost(lm_head).weight.shape[1]
        self.score = nn.Linear(hidden, num_labels, bias=False, device=innermost(lm_head).weight.device)
        nn.init.normal_(self.score.weight, std=std)

    def forward(self, h):
        if not self.enabled or self.rows == ():
            return self.lm_head(h)
        if self.rows is not None and len(self.rows) != h.shape[0]:
            raise BadInput("a classification head replaces the vocabulary logits of every row: it cannot share a "
                           "batch with rows of other adapters")
        return self.score(h.to(self.score.weight.dtype))  # (B, T, C)


def classify(model, input_ids, attention_mask=None) -> torch.Tensor:
    """(B, C): each sequence's class logits, read at its last real token (right padding, as transformers)."""
    logits = model(input_ids, attention_mask=attention_mask)  # (B, P + T, C): any learned prompts come first
    if attention_mask is None:
        return logits[:, -1]
    last = logits.shape[1] - input_ids.shape[1] + attention_mask.long().sum(dim=1) - 1  # (B,)
    return logits[torch.arange(len(logits)), last]


@dataclass
class TaskHeadSettings:
    """What add_task_head was asked for: what its adapter file is written from (formats/__init__.py)."""
    num_labels: int | None  # None: the lm_head copy


def add_task_head(model, num_labels=None, name="default") -> Wrapper:
    """Train the output layer beside the adapter `name`'s method: a copy of lm_head, or, with `num_labels`, a
    new classification head of that many classes (read it with classify()). Returns the head's wrapper."""
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 2):
        raise BadInput(f"num_labels: expected an integer >= 2 (or None for the lm_head copy), got {num_labels!r}")
    make = TrainedHead if num_labels is None else lambda inner: ClassificationHead(inner, num_labels)
    made = attach(model, name, TaskHeadSettings(num_labels), ["lm_head"], lambda _, inner: make(inner))
    return made["lm_head"]
