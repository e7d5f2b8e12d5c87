"""torch.compile as an opt-in (`--compile` in the scripts): each decoder block compiled, for the passes that do
not grow a KV cache (training, its recompute under checkpointing, held-out losses). Generation, whose cache grows
by a position a step, stays eager: its shapes change every token.

    x ─► [ compiled block ] x num_hidden_layers ─► norm ─► loss     one graph for all blocks (the same code;
                                                                     their weights are the graph's inputs)

The eager code stays the truth: compiled runs are tested to agree with it (tests/test_compile.py). Measured on a
2-core Xeon with AMX, a QLoRA step at 4 x 256 (LoRA on six linears, checkpointing): 2.23 -> 1.73 s in bf16,
4.53 -> 3.91 s in fp32, after about 20 s of compiling on the first step (bench/RESULTS.md).
"""

import os
import shutil

import torch

from ..errors import BadInput


def compile_blocks(model, enabled=True):
    """Compile each decoder block of `model` (after its PEFT methods are on: adding one later compiles again)."""
    if enabled and model.model.norm.weight.device.type == "cpu" and not cpp_compiler():
        raise BadInput("--compile: torch.compile builds C++ on CPU, and no compiler was found ($CXX, g++, clang++ "
                       "or c++); install one, or run without --compile")
    model.model.compiled = [torch.compile(layer) for layer in model.model.layers] if enabled else None
    return model


def cpp_compiler():
    """The C++ compiler torch.compile would find on CPU, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    return next((found for found in map(shutil.which, names) if found), None)
