"""The real pretrained default model (SmolLM2-135M-Instruct, converted from its GGUF) against transformers
loading the same converted directory."""

import pytest
import torch
from torch.testing import assert_close

import minipeft

PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
           "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
           "Locally nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair.")


@pytest.fixture(scope="module")
def ours(default_weights):
    return minipeft.load(default_weights)


@pytest.fixture(scope="module")
def reference(default_weights):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_weights, dtype=torch.float32).eval()


def test_config_is_smollm2(ours):
    model, tokenizer = ours
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.rope_theta, c.tie_word_embeddings) == (9, 3, 100000, True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.vocab_size == 49152 and len(tokenizer.merge_rank) == 48900


def test_greedy_capital_of_france(ours):
    model, tokenizer = ours
    out = minipeft.generate(model, [tokenizer.encode("The capital of France is")], max_new_tokens=4)
    assert tokenizer.decode(out[0]).startswith(" Paris")


def test_logits_equal_transformers(ours, reference):
    model, tokenizer = ours
    ids = torch.tensor([tokenizer.encode(PASSAGE)])
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    print(f"default model logits max abs diff vs transformers: {(ours - theirs).abs().max().item():.2e}")
    assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_passage_nll_matches_transformers(ours, reference):
    """A wrong q/k un-permute still writes plausible text, but its NLL is far worse (3.85 vs 2.07)."""
    model, tokenizer = ours
    ids = torch.tensor([tokenizer.encode(PASSAGE)])
    with torch.no_grad():
        nll = model.loss(ids, ids).item()
        reference_nll = reference(ids, labels=ids).loss.item()
    print(f"mean NLL: minipeft {nll:.4f}, transformers {reference_nll:.4f}")
    assert_close(nll, reference_nll, rtol=0, atol=1e-4)
    assert nll < 2.5


def test_4bit_default_model_still_knows_paris(default_weights):
    model, tokenizer = minipeft.load(default_weights, quantize="nf4")
    out = minipeft.generate(model, [tokenizer.encode("The capital of France is")], max_new_tokens=4)
    assert tokenizer.decode(out[0]).startswith(" Paris")
