"""Llama, written by hand: the decoder that every PEFT method in minipeft wraps.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models".

    token ids ─► embed_tokens ─► [ Block ] x num_hidden_layers ─► norm ─► lm_head ─► logits
                                     │
                                     ├─ x = x + attention(rms_norm(x))   rotary positions, grouped-query heads
                                     └─ x = x + mlp(rms_norm(x))         SwiGLU

Module names follow the Hugging Face checkpoint layout, so `model.state_dict()` keys are the file's
keys (`model.layers.0.self_attn.q_proj.weight`, ...).

The contract with PEFT methods. A method changes the model only by putting modules of its own into some
of four slots, and the decoder only calls what it finds there; it never asks which method is on.

1. A linear or a norm: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`, `lm_head`,
   `input_layernorm`, `post_attention_layernorm` or `norm` may be replaced by any module that maps
   (..., in) to (..., out). (LoRA, DoRA, IA3, BitFit, bottleneck adapters.)
2. `model.embed_tokens` may be replaced by a module that, for a new sequence, returns (B, P + T, D):
   P learned positions in front of the T tokens. The decoder then
   - treats the P positions as real tokens: always attended, whatever `attention_mask` says of the text;
   - numbers the text's rotary positions from P;
   - never scores them: `Llama.loss` puts label -100 in front of the labels for them;
   - keeps them in the KV cache from prefill on: a continuing step looks up only its new ids, in
     `embed_tokens.weight`, so the wrapper exposes the vocabulary matrix under that name. (Prompt tuning.)
   In a batch whose rows use different adapters, it returns ((B, P + T, D), real (B, P) bool): the
   prepended positions a row does not have are masked out, and its text is numbered as if alone.
3. `model.learned_past` may hold a module that, called with the batch size, returns the keys and values
   of P positions for every layer: two lists of (B, num_key_value_heads, P, head_dim) tensors (or None
   while it is switched off). Every new sequence then starts from a KV cache pre-filled with them
   (`KVCache.fill`). The decoder attends to them as to any cached position: never rotated (they are keys
   as given), always attended, and the text numbered from P. In a mixed batch it returns a third item,
   real (B, P) bool, as in 2. In training they are a fixed past that gets gradients, under gradient
   checkpointing too. (Learned keys and values in every layer: prefix tuning.)
4. `model.layer_prompts` may hold a module that gives the P positions of slot 2 new hidden states at every
   layer. For a new sequence, before block i, the decoder calls `layer_prompts(i, x, real, P)` with the hidden
   states x (B, P + T, D), which positions are real (B, P + T) and P, and goes on with the x it returns. A
   continuing step does not call it: those positions are in the KV cache. The module may read the text, but
   only the tokens its `reads(real text)` (B, T) bool names, and `Llama.loss` scores none of them: a position
   that has read a token would give it away. Packed rows are refused. (Per-layer prompts made from the
   instruction: IAPT.)
5. `model.text_offsets` may hold a module that, called with each text token's position among its row's real
   text tokens (B, T) long (from 0, counting on across cached steps; in a packed row, from its document's
   start), returns (B, T, D) added to the text's embeddings, in every step, new or continuing. The prepended
   positions of slot 2 are not text and get nothing, nor does `inputs_embeds`. (DePT's and EPT's low-rank
   update of the input embeddings.)

Beyond those slots a method may only add parameters to a module it put there.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInput
from .config import LlamaConfig
from .gradient_checkpointing import checkpoint
from .kv_cache import KVCache
from .loss import next_token_loss
from .masks import causal_padding_mask, document_mask
from .rotary import apply_rotary, inverse_frequencies, rotary_cos_sin


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, KV, S, hd), S = past + T
        # Grouped-query attention: each key/value head serves num_heads / num_kv_heads query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, blocks and the final norm: token ids in, hidden states out."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.learned_past = None  # contract 3: a module returning per-layer keys and values, or None
        self.layer_prompts = None  # contract 4: a module filling slot 2's positions at every layer, or None
        self.text_offsets = None  # contract 5: a module adding a vector to each text position's embedding, or None
        self.compute_dtype = None  # set when embed_tokens is stored narrower (quant.WidenedEmbedding)
        self.gradient_checkpointing = False  # set by minipeft.enable_checkpointing
        self.compiled = None  # minipeft.compile_blocks: each block compiled, for passes whose cache does not grow

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, with_mask=False,
                documents=None):
        """Hidden states (B, T', D). `cache` (generation) is continued and grows; without one, a learned
        past, if any, is a fixed cache that keeps nothing. T' = T plus any positions embed_tokens prepends.
        `with_mask` also returns which of the T' positions are real (B, T'): not padding, not masked out.
        `documents` (B, T) ints >= 0 say which document of a packed row each token belongs to: a token then
        attends only within its document, numbered from the document's start, as if the document were alone."""
        new_sequence = cache is None or cache.length == 0
        x, real = self.embed(input_ids, inputs_embeds, new_sequence, attention_mask)  # (B, T', D), (B, T')
        if inputs_embeds is None:  # given embeddings are taken as they are
            x = self.offset_text(x, real[:, x.shape[1] - input_ids.shape[1]:], cache, new_sequence, documents)  # 5
        if new_sequence and self.learned_past is not None:
            cache = self.fill_learned_past(cache, len(x), x.dtype)  # contract 3
        mask, positions = self.attention_mask(real, cache, documents)  # (B, 1, T', S) or None, (B, T')
        inv_freq = inverse_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, x.device)
        cos, sin = rotary_cos_sin(positions, inv_freq, x.dtype)
        fill = self.layer_prompts_of(new_sequence, real, input_ids, inputs_embeds, documents)  # contract 4
        x = self.blocks(x, cos, sin, mask, cache, fill)
        return (self.norm(x), real) if with_mask else self.norm(x)  # (B, T', D)

    def embed(self, input_ids, inputs_embeds, new_sequence, attention_mask):
        """The tokens' vectors (B, T', D), and which positions are real (B, T'): the text's from
        `attention_mask`; positions that embed_tokens prepends (contract 2) are real unless it says otherwise."""
        if inputs_embeds is not None:
            x = inputs_embeds  # (B, T, D)
        elif new_sequence:
            x = self.embed_tokens(input_ids)  # (B, P + T, D): contract 2
        else:  # continuing a cached sequence: any prepended positions are in the cache already
            x = F.embedding(input_ids, self.embed_tokens.weight)  # (B, T, D)
            x = x.to(self.compute_dtype) if self.compute_dtype else x
        x, prepended_real = x if isinstance(x, tuple) else (x, None)  # (B, P) in a mixed batch
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if prepended_real is not None:
            real[:, :prepended_real.shape[1]] = prepended_real
        if attention_mask is not None:  # covers the new tokens
            real[:, x.shape[1] - attention_mask.shape[1]:] = attention_mask.bool()
        return x, real

    def offset_text(self, x, real_text, cache, new_sequence, documents):
        """x with text_offsets(the text's positions) added to its last T positions, the text (contract 5). A
        growing cache counts each row's real text tokens, so a continuing step's positions go on from there."""
        B, T = real_text.shape
        growing = cache is not None and cache.grow
        if self.text_offsets is None and not growing:  # training without the slot: nothing to count or add
            return x
        seen = cache.text_seen if not new_sequence and cache.text_seen is not None else real_text.new_zeros(B).long()
        positions = (seen[:, None] + real_text.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): padding not counted
        if growing:
            cache.text_seen = seen + real_text.long().sum(-1)
        if self.text_offsets is None:
            return x
        if documents is not None:  # each document from 0: its index minus its first token's
            index = torch.arange(T, device=x.device).expand(B, -1)
            starts = torch.ones_like(documents, dtype=torch.bool)
            starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
            positions = index - torch.where(starts, index, 0).cummax(-1).values  # (B, T)
        offsets = self.text_offsets(positions)  # (B, T, D), or 0 where no adapter serves a row
        if not torch.is_tensor(offsets):
            return x
        return torch.cat([x[:, :x.shape[1] - T], x[:, x.shape[1] - T:] + offsets.to(x.dtype)], dim=1)

    def layer_prompts_of(self, new_sequence, real, input_ids, inputs_embeds, documents):
        """What fills the prepended positions before each block (contract 4): fill(i, x) -> x, or None."""
        if not new_sequence or self.layer_prompts is None:
            return None
        if documents is not None:
            raise BadInput("documents: packed rows hold several texts, and layer prompts (IAPT) summarise one a "
                           "row; give one sample a row")
        prepended = real.shape[1] - (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        return lambda i, x: self.layer_prompts(i, x, real, prepended)

    def fill_learned_past(self, cache, batch_size, dtype):
        """A new sequence starts from the learned past's keys and values (contract 3): the cache it
        continues, or a fixed one that keeps nothing."""
        learned = self.learned_past(batch_size)
        if learned is None:  # switched off
            return cache
        cache = cache if cache is not None else KVCache(len(self.layers), grow=False)
        return cache.fill(*learned, dtype=dtype)

    def attention_mask(self, real, cache, documents):
        """Which keys each query sees, (B, 1, T, S) bool or None for plain causal, and the queries' rotary
        positions (B, T): padding is not counted, and in a packed row each document starts from 0."""
        past, T = (cache.length if cache is not None else 0), real.shape[1]
        key_mask = real if past == 0 else torch.cat([cache.mask, real], dim=1)  # (B, S)
        if cache is not None and cache.grow:
            cache.mask = key_mask
        if documents is None:
            positions = (key_mask.long().cumsum(-1)[:, -T:] - 1).clamp(min=0)  # (B, T): padding does not count
            padded = not bool(key_mask.all())
            return (causal_padding_mask(key_mask, T) if padded or (past > 0 and T > 1) else None), positions
        # the past and any prepended positions are shared by every document (-1)
        query_documents = F.pad(documents, (T - documents.shape[1], 0), value=-1)  # (B, T)
        return document_mask(key_mask, F.pad(query_documents, (past, 0), value=-1), query_documents)

    def blocks(self, x, cos, sin, mask, cache, fill=None):
        """The decoder blocks in turn; in training with checkpointing each is recomputed in backward. `fill`
        gives the prepended positions each layer's own hidden states (contract 4), outside the recompute."""
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and (cache is None or not cache.grow)
        for i, layer in enumerate(self.layers):
            layer = self.compiled[i] if self.compiled and (cache is None or not cache.grow) else layer
            x = fill(i, x) if fill is not None else x
            if recompute:  # a fixed past is read by the block, so it is handed to the recompute as an input
                past_tensors = (cache.keys[i], cache.values[i]) if cache is not None else ()
                x = checkpoint(layer, x, cos, sin, mask, cache, also_differentiate=past_tensors)
            else:
                x = layer(x, cos, sin, mask, cache)
        return x


class LMHead(nn.Linear):
    """nn.Linear; one row (generation at batch 1) by torch.mv, which reads a bf16 weight on CPU about twice as fast as
    torch's (1, D) x (D, vocab) matmul does, the same sums (bench/RESULTS.md)."""

    def forward(self, x):
        return torch.mv(self.weight, x[0])[None] if x.shape[:-1] == (1,) and self.bias is None else super().forward(x)


class Llama(nn.Module):
    """The causal language model: LlamaModel plus lm_head (tied to the embedding or not)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, last_only=False,
                documents=None):
        """Logits (B, T, vocab), or (B, 1, vocab) at the last position only when `last_only`."""
        hidden = self.model(input_ids, attention_mask, cache, inputs_embeds, documents=documents)  # (B, T, D)
        # the last position as (B, D): torch multiplies a (B, 1, D) view of it, strided, by copying lm_head's weight
        return self.lm_head(hidden[:, -1])[:, None] if last_only else self.lm_head(hidden)

    def loss(self, input_ids=None, labels=None, attention_mask=None, inputs_embeds=None, reduction="mean",
             documents=None):
        """Next-token cross-entropy over positions whose label is not -100: their mean, or their sum
        (`reduction="sum"`, for accumulating micro-batches in which every token weighs the same). Which
        positions are scored, in packed rows and behind learned prompts, and how the logits are never all
        built: loss.py."""
        return next_token_loss(self, input_ids, labels, attention_mask, inputs_embeds, reduction, documents)
