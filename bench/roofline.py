"""How much arithmetic one QLoRA training step must do, so that a step time becomes achieved GFLOP/s.

Counted as torch's own FlopCounterMode counts (tests/test_roofline.py checks the two agree), for a step
with gradient checkpointing and a frozen base, every position labelled:

    per token and layer, the base's linears (n weights):   forward 2n + recompute 2n + input gradient 2n = 6n
                         LoRA on a target in -> out:        forward 2r(in+out) x 2 + backward 4r(in+out)
    per layer, attention (B rows of T tokens, H heads):    forward 4BHT^2 hd x 2 + backward 10BHT^2 hd
    per scored token (B(T-1)), lm_head (frozen, V x D):     logits 2VD + hidden gradient 2VD

The frozen base never needs weight gradients: that is where a PEFT step saves a third of the work. Nor
do the first layer's targets need an input gradient: the embedding below them is frozen. Attention
is counted as full T x T matmuls, as the counter does (a causal kernel may skip half).
"""


def qlora_step_flops(config, batch: int, seq: int, r: int = 8, targets=("q_proj", "k_proj", "v_proj")) -> dict:
    D, I, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
              "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}
    tokens, layers = batch * seq, config.num_hidden_layers
    first_layer_targets = [t for t in targets if t in ("q_proj", "k_proj", "v_proj")]  # fed by the embedding
    linears = (6 * sum(i * o for i, o in shapes.values()) * layers
               - 2 * sum(i * o for i, o in (shapes[t] for t in ("q_proj", "k_proj", "v_proj")))) * tokens
    lora = (8 * r * sum(sum(shapes[t]) for t in targets) * layers
            - 2 * r * sum(shapes[t][0] for t in first_layer_targets)) * tokens
    attention = 18 * batch * config.num_attention_heads * seq * seq * hd * layers
    lm_head = 4 * config.vocab_size * D * batch * (seq - 1)
    return {"linears": linears, "lora": lora, "attention": attention, "lm_head": lm_head,
            "total": linears + lora + attention + lm_head}
