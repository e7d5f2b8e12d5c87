"""torch.compile as an opt-in (`--compile` in the scripts): each decoder block compiled, for the passes that do
not grow a KV cache (training, its recompute under checkpointing, held-out losses). Generation, whose cache grows
by a position a step, stays eager: its shapes change every token.

    x ─► [ compiled block ] x num_hidden_layers ─► norm ─► loss     one graph for all blocks (the same code;
                                                                     their weights are the graph's inputs)

The eager code stays the truth: compiled runs are tested to agree with it (tests/test_compile.py). Measured on a
2-core Xeon with AMX, a QLoRA step at 4 x 256 (LoRA on six linears, checkpointing): 2.23 -> 1.73 s in bf16,
4.53 -> 3.91 s in fp32, after about 20 s of compiling on the first step (bench/RESULTS.md).
"""

import torch


def compile_blocks(model, enabled=True):
    """Compile each decoder block of `model` (after its PEFT methods are on: adding one later compiles again)."""
    model.model.compiled = [torch.compile(layer) for layer in model.model.layers] if enabled else None
    return model
