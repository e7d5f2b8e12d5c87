"""GPU memory of a QLoRA step on paper: 7B, 13B and 70B at 1 x 2048 tokens, with checkpointing.

    .venv/bin/python bench/memory_plan.py            # the table in docs/scaling.md

The terms, all in bytes, from the shapes alone:
    4-bit weights   every block linear: 0.5 per weight + one fp32 absmax per 64 (NF4, no double quantization)
    16-bit rest     embedding, lm_head and norms in bf16
    LoRA            r x (in + out) per target, fp32, and its fp32 gradient
    AdamW           two fp32 moments per trainable number
    activations     with checkpointing: each block's bf16 input (T x D) kept for backward, plus one block's
                    insides while it is recomputed: its saved tensors (~10 T x D + 4 T x I in bf16, the norms'
                    fp32 copies included), one dequantized bf16 weight (the largest, I x D), and the fused
                    loss's chunk of logits (256 x V fp32, three times)
Not counted: the CUDA context and the allocator's slack (about 0.5-1 GB on a real card).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minipeft import LlamaConfig  # noqa: E402

SHAPES = {  # Llama 2's published shapes
    "7B": LlamaConfig(),
    "13B": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40),
    "70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
}
TRAIN_CODE_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
GPUS_GB = (24, 48, 80)


def linear_shapes(config: LlamaConfig) -> dict:
    """(in, out) of each block linear."""
    D, I, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    return {"q_proj": (D, D), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (D, D),
            "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}


def step_memory(config: LlamaConfig, r=8, targets=TRAIN_CODE_TARGETS, batch=1, seq=2048) -> dict:
    """Bytes of each term, and their total."""
    shapes, L, D, V = linear_shapes(config), config.num_hidden_layers, config.hidden_size, config.vocab_size
    T, I = batch * seq, config.intermediate_size
    quantized = L * sum(i * o for i, o in shapes.values())
    lora = L * r * sum(i + o for name, (i, o) in shapes.items() if name in targets)
    terms = {
        "4-bit weights": quantized * (0.5 + 4 / 64),
        "16-bit rest": 2 * (V * D * (1 if config.tie_word_embeddings else 2) + (2 * L + 1) * D),
        f"LoRA r={r} (+ grads)": lora * 4 * 2,
        "AdamW state": lora * 4 * 2,
        "activations": L * T * D * 2 + T * (10 * D + 4 * I) * 2 + I * D * 2 + 3 * 256 * V * 4,
    }
    terms["total"] = sum(terms.values())
    return terms


def table(rank_pair=(8, 64)) -> str:
    lines = ["| model | 4-bit weights | 16-bit rest | LoRA r=8 / r=64 (+ grads) | AdamW state r=8 / r=64 | "
             "activations | total r=8 / r=64 | fits on GPUs of (GB), r=8 / r=64 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, config in SHAPES.items():
        small, large = (step_memory(config, r) for r in rank_pair)
        gb = lambda x: f"{x / 1e9:.2f}"
        fits = [", ".join(f"{g}" for g in GPUS_GB if t["total"] < g * 1e9 - 1e9) or "none: FSDP"
                for t in (small, large)]
        lora_key = lambda t: next(k for k in t if k.startswith("LoRA"))
        lines.append(f"| {name} | {gb(small['4-bit weights'])} | {gb(small['16-bit rest'])} | "
                     f"{gb(small[lora_key(small)])} / {gb(large[lora_key(large)])} | "
                     f"{gb(small['AdamW state'])} / {gb(large['AdamW state'])} | {gb(small['activations'])} | "
                     f"{gb(small['total'])} / {gb(large['total'])} | {fits[0]} / {fits[1]} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print("GB (1e9 bytes), one GPU, 1 x 2048 tokens, checkpointing on, LoRA on q, k, v, gate, up, down "
          "(train_code.py's targets); a card fits when the total leaves 1 GB for the CUDA context\n")
    print(table())


if __name__ == "__main__":
    main()
