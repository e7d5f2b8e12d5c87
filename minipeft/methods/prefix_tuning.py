"""Prefix tuning: learned keys and values in front of every layer's attention; the whole model stays frozen.

Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation".

    layer i attention:   keys   [ learned K_i (P positions) | k_proj(x) rotated (T positions) ]
                         values [ learned V_i (P positions) | v_proj(x)                       ]
                         softmax(q K^T / sqrt(hd)) V, the text numbered from position P

    prompt_embeddings (P, num_layers x 2 x kv_dim) ──view──► K_0 V_0 K_1 V_1 ... each (KV heads, P, head_dim)
      either trained directly, or made by a small MLP (`prefix_projection`, Li and Liang's reparameterisation):
      embedding (P, kv_dim) ─► Linear ─► tanh ─► Linear ─► (P, num_layers x 2 x kv_dim)

Unlike prompt tuning, which learns only the input to layer 0, every layer gets its own P positions. The
keys are used as given: no rotary embedding on them. Trains P x num_layers x 2 x kv_dim numbers:
20 x 32 x 2 x 4096 = 5,242,880 on Llama-7B (0.08% of 6.7B). The module fills slot 3 of the decoder
(llama/model.py): `model.model.learned_past`, so it works with the KV cache in generation and under
gradient checkpointing (which peft refuses for prefix tuning).

On disk (peft's layout): adapter_config.json {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P,
"token_dim": kv_dim, "num_attention_heads": KV heads, "num_layers", "prefix_projection", ...} and one
tensor, prompt_embeddings (P, num_layers x 2 x kv_dim): with a projection, its output is what is saved.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BadInput
from ..llama.kv_cache import KVCache
from .contract import PastWrapper, attach, disabled


class LearnedPast(PastWrapper):
    """P learned keys and values for every layer: called with the batch size, returns them per layer."""
    wrapped = "inner"

    def __init__(self, num_prompts, num_layers, kv_heads, head_dim, projection_hidden=None):
        super().__init__()
        self.num_prompts = num_prompts
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        flat = num_layers * 2 * kv_heads * head_dim
        self.projection_hidden = projection_hidden
        if projection_hidden:  # Li and Liang's reparameterisation: embedding (P, kv_dim), then an MLP
            self.embedding = nn.Embedding(num_prompts, kv_heads * head_dim)
            self.transform = nn.Sequential(nn.Linear(kv_heads * head_dim, projection_hidden), nn.Tanh(),
                                           nn.Linear(projection_hidden, flat))
        else:
            self.embedding = nn.Embedding(num_prompts, flat)
        self.trainable_names = tuple(name for name, _ in self.named_parameters())  # embedding (and the MLP)
        self.inner = None  # another adapter's learned past, when several share the base

    def prompt_embeddings(self) -> torch.Tensor:
        """(P, num_layers x 2 x kv_dim): every layer's keys and values, flattened as peft flattens them."""
        weight = self.embedding.weight
        return self.transform(weight) if self.projection_hidden else weight

    def keys_and_values(self, batch_size):
        """Each layer's learned keys and values, (B, KV heads, P, head_dim) each: two lists of num_layers."""
        P, L = self.num_prompts, self.num_layers
        past = self.prompt_embeddings().view(P, L * 2, self.kv_heads, self.head_dim)  # (P, 2L, KV, hd)
        past = past.permute(1, 2, 0, 3)  # (2L, KV, P, hd)
        past = past[:, None].expand(-1, batch_size, -1, -1, -1)  # (2L, B, KV, P, hd)
        return list(past[0::2]), list(past[1::2])  # keys of layers 0..L-1, then their values


@torch.no_grad()
def keys_and_values_of_tokens(model, token_ids) -> torch.Tensor:
    """The frozen model's own keys and values for some tokens, flattened like prompt_embeddings (P, 2L kv_dim).
    Li and Liang found that starting from real words' activations trains better than random numbers."""
    cache = KVCache(model.config.num_hidden_layers)
    with disabled(model):  # the bare base's keys and values
        model.model(token_ids[None], cache=cache)
    per_layer = [t[0] for pair in zip(cache.keys, cache.values) for t in pair]  # 2L x (KV, P, hd)
    return torch.stack(per_layer).permute(2, 0, 1, 3).reshape(token_ids.shape[0], -1).float()  # (P, 2L KV hd)


@dataclass
class PrefixTuningSettings:
    """What add_prefix_tuning was asked for: what its adapter file is written from (formats/peft.py)."""
    num_prompts: int
    projection_hidden: int | None
    init: str


def add_prefix_tuning(model, num_prompts=20, projection_hidden=None, init=None, seed=0,
                      name="default") -> LearnedPast:
    """Freeze the model and give every layer `num_prompts` learned keys and values. Returns the module.

    Args:
        projection_hidden: the hidden width of Li and Liang's reparameterisation MLP (peft's
            `prefix_projection` with `encoder_hidden_size`); None trains the keys and values directly.
        init: "vocab" (the keys and values the model itself makes for random vocabulary tokens), "random"
            (normal, as peft does) or "zero" (peft's init_weights="zero": with a projection, its last layer).
            By default "vocab" without a projection and "random" with one (the MLP makes its own start).
        name: the adapter it belongs to.
    """
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise BadInput(f"num_prompts: expected a positive integer, got {num_prompts!r}")
    if init is None:
        init = "random" if projection_hidden else "vocab"
    if init not in ("vocab", "random", "zero") or (init == "vocab" and projection_hidden):
        raise BadInput(f"add_prefix_tuning: init must be 'vocab' (without a projection), 'random' or 'zero', "
                       f"got {init!r}")
    config = model.config
    device = model.model.norm.weight.device
    with torch.random.fork_rng(devices=[]):  # nn.Embedding and nn.Linear draw from the global generator: seeded
        torch.manual_seed(seed)               # here, and put back as it was after
        past = LearnedPast(num_prompts, config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                           projection_hidden).to(device)
    with torch.no_grad():
        last = past.transform[-1] if projection_hidden else past.embedding
        if init == "zero":
            for parameter in last.parameters():
                parameter.zero_()
        elif init == "vocab" and not past.embedding.weight.is_meta:
            ids = torch.randint(0, config.vocab_size, (num_prompts,), generator=torch.Generator().manual_seed(seed))
            past.embedding.weight.copy_(keys_and_values_of_tokens(model, ids.to(device)))
    attach(model, name, PrefixTuningSettings(num_prompts, projection_hidden, init), ["model.learned_past"],
           lambda _, inner: past.stacked_on(inner))  # another adapter's learned past, if any
    return past
