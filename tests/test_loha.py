"""LoHa against peft's LoHa on transformers' Llama: logits, gradients, the file both ways, patterns, merge, the
refusals (the default model: tests/test_peft_methods_on_the_default_model.py); and the formula written out from
FedPara's product."""

import json

import torch
from torch.testing import assert_close

from minipeft import add_loha, load_adapter, load_model, save_adapter, unmerge
from minipeft.formats.peft import LOHA_KEYS
from minipeft.methods.loha import LoHaLayer
from tests.helpers import assert_merges_as_peft_merges, trained_looking, write_hf_checkpoint
from tests.test_peft_configs import assert_each_set_key_refused, walk

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def their_loha(reference, seed=0, **settings):
    """peft's LoHa with every factor random (init_weights=False: A2 is not zero, so nothing hides)."""
    from peft import LoHaConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(reference, LoHaConfig(task_type="CAUSAL_LM", init_weights=False, **settings))


def assert_same_logits_and_gradients(ours, theirs, layers, ids, atol):
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=atol)
    for name, layer in layers.items():
        for factor in FACTORS:
            their_grad = theirs.get_parameter(f"base_model.model.{name}.{factor}.default").grad
            assert_close(getattr(layer, factor).grad, their_grad, rtol=1e-4, atol=atol, msg=f"{name}.{factor}")


def test_the_update_is_the_hadamard_product_of_two_low_rank_matrices():
    """FedPara's W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ), entry by entry, as the update: y = W x + (alpha / r) ΔW x; its rank
    reaches r² where each factor's is r; untouched, the adapter changes nothing."""
    base = torch.nn.Linear(12, 10)
    layer = LoHaLayer(base, r=2, alpha=3)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), base(x))  # A2 = 0
    with torch.no_grad():
        for factor in FACTORS:
            getattr(layer, factor).normal_()
    b1, a1, b2, a2 = (getattr(layer, f).detach() for f in FACTORS)
    delta = torch.empty(10, 12)
    for i in range(10):
        for j in range(12):
            delta[i, j] = sum(b1[i, k] * a1[k, j] for k in range(2)) * sum(b2[i, k] * a2[k, j] for k in range(2))
    assert_close(layer(x), base(x) + x @ (1.5 * delta).T, rtol=0, atol=1e-5)
    assert torch.linalg.matrix_rank(delta).item() == 4 and torch.linalg.matrix_rank(b1 @ a1).item() == 2


def test_peft_file_gives_its_logits_and_gradients(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    theirs = their_loha(reference, r=3, alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 7})
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoHaLayer)}
    assert len(layers) == 6 and layers["model.layers.0.mlp.down_proj"].hada_w1_b.shape == (2, 128)
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 7 / 3
    assert_same_logits_and_gradients(ours, theirs, layers, torch.randint(0, 256, (2, 9)), 1e-5)


def test_our_file_loads_in_peft_and_merges_as_peft_merges(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    ours = load_model(tmp_path / "base")
    trained_looking(ours, lambda m: (add_loha(m, ["q", "k", "up"], r=2, alpha=4), add_loha(m, ["o"], r=3, alpha=1)))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 3
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    unmerged = assert_merges_as_peft_merges(ours, theirs, ids, "hada_")
    with torch.no_grad():
        unmerge(ours)
        assert_close(ours(ids), unmerged, rtol=0, atol=1e-5)


def test_every_loha_config_key_is_accounted_for_and_refused_when_set(tmp_path):
    """peft's dropouts (random, in training only) and layer selection are not built: a file setting one is refused
    by its key, as is a key peft adds later."""
    from peft import LoHaConfig

    walk(LoHaConfig, LOHA_KEYS)
    reference = write_hf_checkpoint(tmp_path / "base")
    their_loha(reference, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
    assert_each_set_key_refused(tmp_path / "adapter", tmp_path / "base", LOHA_KEYS)

