"""The KV cache: the keys and values a new token attends to without computing them again."""

import torch


class KVCache:
    """Keys and values of the positions before the new tokens, per layer, and which of them are real.

    It starts empty (generation), or pre-filled with learned positions (contract 3 of llama/model.py). A cache that
    does not `grow` is a fixed past: each layer joins it to its new keys and values but stores nothing,
    so a recompute in backward sees the same past."""

    def __init__(self, num_layers: int, grow: bool = True):
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.mask = None  # (B, S) bool: False at padding
        self.grow = grow

    def fill(self, keys, values, real=None, dtype=torch.float32) -> "KVCache":
        """Start the cache with P positions per layer: keys[i], values[i] are (B, KV, P, hd); `real` (B, P)
        says which a row has (all, unless a mixed batch)."""
        self.keys, self.values = [k.to(dtype) for k in keys], [v.to(dtype) for v in values]
        B, _, P, _ = keys[0].shape
        self.mask = real if real is not None else torch.ones(B, P, dtype=torch.bool, device=keys[0].device)
        return self

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def update(self, layer_index: int, k, v):
        if self.keys[layer_index] is not None:
            k = torch.cat([self.keys[layer_index], k], dim=2)  # (B, kv_heads, S, head_dim)
            v = torch.cat([self.values[layer_index], v], dim=2)
        if self.grow:
            self.keys[layer_index], self.values[layer_index] = k, v
        return k, v
