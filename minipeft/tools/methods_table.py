"""The comparison table of the lecture notes "Parameter-Efficient Fine-tuning", by arithmetic: how many
numbers each method trains, counted by `count_parameters` on models built on the meta device (no weights,
no memory).

    python -m minipeft.tools.methods_table

The notes: "Suppose we have a transformer with 350M parameters and 24 layers": prompt tuning (20 tokens)
15k (0.006%), adapters (dim 64) 6M (2%), LoRA (dim 8) 0.8M (0.22%), BitFit 0.32M (0.09%). Its shape
here is a Llama of hidden size 1024 and 24 layers (341M with a tied 32k vocabulary); Llama-7B beside it.
"""

from ..llama.config import LlamaConfig
from ..llama.loader import build_model
from ..methods.alora import add_alora
from ..methods.bitfit import add_bitfit
from ..methods.bottleneck import add_bottleneck_adapters
from ..methods.dora import add_dora
from ..methods.ept import add_ept
from ..methods.iapt import add_iapt
from ..methods.ia3 import add_ia3
from ..methods.ln_tuning import add_ln_tuning
from ..methods.loha import add_loha
from ..methods.lokr import add_lokr
from ..methods.lopt import add_lopt
from ..methods.lora import add_lora
from ..methods.p_tuning import add_p_tuning
from ..methods.plug_and_play import add_plug_and_play
from ..methods.prefix_tuning import add_prefix_tuning
from ..methods.prompt_tuning import add_prompt_tuning
from ..methods.vera import add_vera
from ..methods.counting import count_parameters

SHAPES = {
    "the lecture's 350M, 24 layers": LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                             num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                             tie_word_embeddings=True),
    "Llama-7B": LlamaConfig(),  # the dataclass defaults are Llama-2-7B
}
# (method, what it covers, how to add it)
ROWS = [
    ("prompt tuning, 20 tokens", "20 vectors in front of the input embeddings",
     lambda m: add_prompt_tuning(m, 20, init="random")),
    ("LoPT, 20 tokens, r = 4", "20 vectors in front of the input embeddings, as the product of 20 x 4 and 4 x D",
     lambda m: add_lopt(m, 20, 4)),
    ("EPT, 10 tokens, s = 256, r = 4, 3 spaces", "10 vectors in front of the input embeddings, fused with a rank-4 "
     "update of the first 256 text positions' embeddings, projected into 3 gated rank-4 subspaces",
     lambda m: add_ept(m, 10, 256, 4, 3)),
    ("P-tuning, 20 tokens, MLP encoder", "20 vectors in front of the input embeddings, made by a 3-layer MLP of "
     "width D (the file keeps only its 20 outputs)", lambda m: add_p_tuning(m, 20)),
    ("Plug and Play prompts, 10 tokens", "10 vectors in front of the input embeddings, trained through a "
     "discriminator", lambda m: add_plug_and_play(m, 10)),
    ("IAPT, 4 tokens, r = 16", "4 positions in every layer, made from the instruction by a rank-16 generator",
     lambda m: add_iapt(m, 4, 16)),
    ("prefix tuning, 20 tokens", "20 keys and values in every layer",
     lambda m: add_prefix_tuning(m, 20, init="zero")),
    ("adapters (Houlsby), dim 64", "after attention and after the MLP of every layer, with biases",
     lambda m: add_bottleneck_adapters(m, 64, "houlsby")),
    ("LoRA, r = 8", "q_proj and v_proj of every layer", lambda m: add_lora(m, ["q_proj", "v_proj"], r=8)),
    ("ALoRA, r = 8, 5 rounds", "q_proj and v_proj of every layer; 8 ranks open a layer on average, moved by AB-LoRA",
     lambda m: add_alora(m, ["q_proj", "v_proj"], r=8, rounds=5)),
    ("DoRA, r = 8", "q_proj and v_proj of every layer, plus a magnitude per output row",
     lambda m: add_dora(m, ["q_proj", "v_proj"], r=8)),
    ("LoHa, r = 8", "q_proj and v_proj of every layer, two rank-8 factors multiplied entry by entry",
     lambda m: add_loha(m, ["q_proj", "v_proj"], r=8)),
    ("LoKr, r = 8", "q_proj and v_proj of every layer: W1 ⊗ W2, W2 of rank 8",
     lambda m: add_lokr(m, ["q_proj", "v_proj"], r=8)),
    ("VeRA, r = 256", "q_proj and v_proj of every layer: two vectors each, one frozen random pair for all",
     lambda m: add_vera(m, ["q_proj", "v_proj"], r=256)),
    ("IA3", "k_proj and v_proj outputs, down_proj inputs, every layer", lambda m: add_ia3(m)),
    ("BitFit", "a bias on all seven linears of every layer, and every norm's gain",
     lambda m: add_bitfit(m, norms=True)),
    ("LN tuning", "every norm's gain", lambda m: add_ln_tuning(m)),
]


def parameter_table() -> list[dict]:
    """One row per method and shape: trainable numbers, their share of the base, the layers they cover."""
    rows = []
    for label, covers, add in ROWS:
        for shape_name, config in SHAPES.items():
            model = build_model(config)
            add(model)
            report = count_parameters(model)
            rows.append({"method": label, "covers": covers, "shape": shape_name,
                         "base_params": report["total_params"] - report["trainable_params"],
                         "trainable_params": report["trainable_params"],
                         "percent_of_base": 100 * report["trainable_params"] / (report["total_params"] -
                                                                                report["trainable_params"])})
    return rows


def markdown(rows) -> str:
    shapes = list(SHAPES)
    bases = {r["shape"]: r["base_params"] for r in rows}
    header = " | ".join(f"{s} ({bases[s] / 1e6:,.0f}M)" for s in shapes)
    lines = [f"| method | {header} | what it trains |", "| --- |" + " ---: |" * len(shapes) + " --- |"]
    for label, covers, _ in ROWS:
        cells = [next(r for r in rows if r["method"] == label and r["shape"] == s) for s in shapes]
        figures = " | ".join(f"{c['trainable_params']:,} ({c['percent_of_base']:.3f}%)" for c in cells)
        lines.append(f"| {label} | {figures} | {covers} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(parameter_table()))
