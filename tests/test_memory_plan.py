"""bench/memory_plan.py's arithmetic (docs/scaling.md) against what minipeft measured on an H100 (RESULTS.md)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from memory_plan import SHAPES, step_memory  # noqa: E402

# bench/shape7b.py --shape 7b --device cuda --dtype bf16, LoRA r=8 on q, k, v: torch.cuda.max_memory_allocated
MEASURED_H100_MB = {(1, 512): 4458, (4, 512): 5152}


@pytest.mark.parametrize("batch, seq", MEASURED_H100_MB)
def test_the_7b_plan_agrees_with_the_measured_peak(batch, seq):
    planned = step_memory(SHAPES["7B"], r=8, targets=("q_proj", "k_proj", "v_proj"), batch=batch, seq=seq)["total"]
    measured = MEASURED_H100_MB[(batch, seq)] * 2**20
    print(f"{batch} x {seq}: planned {planned / 2**20:.0f} MB, measured {measured / 2**20:.0f} MB")
    assert abs(planned - measured) < 0.03 * measured


def test_the_4bit_weights_are_the_block_linears_at_half_a_byte_plus_their_scales():
    assert step_memory(SHAPES["7B"])["4-bit weights"] == 6_476_005_376 * (0.5 + 4 / 64)  # test_model's 7B count
    assert step_memory(SHAPES["70B"])["4-bit weights"] / 1e9 == pytest.approx(38.5, abs=0.05)
