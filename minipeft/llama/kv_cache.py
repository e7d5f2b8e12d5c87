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
        self.text_seen = None  # (B,) long: the real text tokens cached so far in each row (contract 5)
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

    def keep(self, rows: list[int]) -> "KVCache":
        """The cache of these rows alone (a batch whose other rows have ended), without the leading columns
        that none of them uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).long().argmax())  # positions count real keys only, so padding can go
        kept = KVCache(len(self.keys), self.grow)
        kept.keys = [k[index, :, first:] for k in self.keys]
        kept.values = [v[index, :, first:] for v in self.values]
        kept.mask = mask[:, first:]
        kept.text_seen = self.text_seen[index] if self.text_seen is not None else None
        return kept

    @staticmethod
    def join(caches: list["KVCache"]) -> "KVCache":
        """One cache for the rows of several, each left-padded to the longest: a padded key is never attended
        and does not count toward positions, so every row goes on as it would alone."""
        longest = max(c.length for c in caches)
        pad = lambda t, c: torch.nn.functional.pad(t, (0, 0, longest - c.length, 0))  # (B, KV, S, hd): along S
        joined = KVCache(len(caches[0].keys), caches[0].grow)
        joined.keys = [torch.cat([pad(c.keys[i], c) for c in caches]) for i in range(len(joined.keys))]
        joined.values = [torch.cat([pad(c.values[i], c) for c in caches]) for i in range(len(joined.keys))]
        joined.mask = torch.cat([torch.nn.functional.pad(c.mask, (longest - c.length, 0)) for c in caches])
        if all(c.text_seen is not None for c in caches):
            joined.text_seen = torch.cat([c.text_seen for c in caches])
        return joined
