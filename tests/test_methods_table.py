"""The PEFT lecture notes' table by arithmetic: count_parameters on the meta device equals each method's formula,
written out here from the papers, for the seed's 24-layer shape and for Llama-7B."""

import math

from minipeft.tools.methods_table import SHAPES, parameter_table


def lokr(out, into, r=8) -> int:
    """W1 (a, c) whole and W2 = W2a W2b (b, r)(r, d), for square dimensions: a = b = sqrt(out), c = d = sqrt(in)."""
    a, c = math.isqrt(out), math.isqrt(into)
    assert a * a == out and c * c == into and r < max(a, c) / 2
    return a * c + r * (a + c)


def formulas(c) -> dict:
    L, d, ff, kv = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    return {
        "prompt tuning, 20 tokens": 20 * d,
        "LoPT, 20 tokens, r = 4": 4 * (20 + d),  # U (20, 4) and V (4, d)
        "EPT, 10 tokens, s = 256, r = 4, 3 spaces": 10 * d + 256 * 4 + 4 * d + 3 * (d * 4 + 4 * d) + d * 3,
        "P-tuning, 20 tokens, MLP encoder": 20 * d + 3 * (d * d + d),  # e, then D -> D -> D -> D
        "Plug and Play prompts, 10 tokens": 10 * d,
        "IAPT, 4 tokens, r = 16": L * (d * 16 + 4 * 16 + 10 + 16 * d),  # Down, queries, a and b, Up
        "prefix tuning, 20 tokens": 20 * L * 2 * kv,
        "adapters (Houlsby), dim 64": 2 * L * (2 * d * 64 + d + 64),
        "LoRA, r = 8": L * 8 * ((d + d) + (d + kv)),  # q: d -> d, v: d -> kv
        "ALoRA, r = 8, 5 rounds": L * (8 + 5 * 2) * ((d + d) + (d + kv)),  # r + rounds x (q, v) slots; 8 open
        "DoRA, r = 8": L * (8 * ((d + d) + (d + kv)) + d + kv),
        "LoHa, r = 8": L * 2 * 8 * ((d + d) + (d + kv)),  # B1 A1 and B2 A2 on q and v
        "LoKr, r = 8": L * (lokr(d, d) + lokr(kv, d)),  # q and v
        "VeRA, r = 256": L * ((d + 256) + (kv + 256)),  # b (out,) and d (r,) on q and v
        "IA3": L * (kv + kv + ff),
        "BitFit": L * (d + kv + kv + d + ff + ff + d) + (2 * L + 1) * d,
        "LN tuning": (2 * L + 1) * d,  # two norms a block, and the last
    }


def test_counts_equal_the_formulas_and_the_seeds_figures():
    rows = parameter_table()
    for shape_name, config in SHAPES.items():
        expected = formulas(config)
        counted = {r["method"]: r["trainable_params"] for r in rows if r["shape"] == shape_name}
        assert counted == expected, shape_name
    seed = {r["method"]: r for r in rows if r["shape"].startswith("the lecture")}
    # the lecture notes: adapters 6M (2%), LoRA 0.8M (0.22%), BitFit 0.32M (0.09%), as rounded on its slide
    assert round(seed["adapters (Houlsby), dim 64"]["trainable_params"] / 1e6) == 6
    assert round(seed["LoRA, r = 8"]["trainable_params"] / 1e5) == 8
    assert round(seed["BitFit"]["trainable_params"] / 1e5, 1) == 3.1
    assert round(seed["LoRA, r = 8"]["percent_of_base"], 2) == 0.23
    assert round(seed["BitFit"]["percent_of_base"], 2) == 0.09
    assert round(seed["prompt tuning, 20 tokens"]["percent_of_base"], 3) == 0.006
