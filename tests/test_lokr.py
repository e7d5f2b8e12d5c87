"""LoKr against peft's LoKr on transformers' Llama: logits, gradients, the file both ways (whole and low-rank factors,
decompose_both, decompose_factor, patterns), merge, every config key; and the Kronecker product written out."""

import json

import pytest
import torch
from torch.testing import assert_close

from minipeft import add_lokr, load_adapter, load_model, save_adapter, unmerge
from minipeft.formats.peft import LOKR_KEYS
from minipeft.methods.lokr import LoKrLayer
from tests.helpers import assert_merges_as_peft_merges, trained_looking, write_hf_checkpoint
from tests.test_peft_configs import assert_each_set_key_refused, walk


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoKrLayer)}


def test_block_i_j_of_the_update_is_w1_i_j_times_w2():
    """ΔW = (alpha / r) W1 ⊗ W2 entry by entry: ΔW[i b + k, j d + l] = s W1[i, j] W2[k, l]; 48 = 6 x 8 out, 32 = 4 x 8
    in; r = 2 < 8 / 2 makes W2 low-rank, W1 stays whole; untouched, the adapter changes nothing."""
    base = torch.nn.Linear(32, 48)
    layer = LoKrLayer(base, r=2, alpha=3)
    assert layer.trainable_names == ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
    assert layer.lokr_w1.shape == (6, 4) and layer.lokr_w2_a.shape == (8, 2) and layer.lokr_w2_b.shape == (2, 8)
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), base(x))  # W1 = 0
    with torch.no_grad():
        for name in layer.trainable_names:
            getattr(layer, name).normal_()
    w1, w2 = layer.lokr_w1.detach(), (layer.lokr_w2_a @ layer.lokr_w2_b).detach()
    delta = torch.empty(48, 32)
    for i in range(6):
        for j in range(4):
            for k in range(8):
                for m in range(8):
                    delta[i * 8 + k, j * 8 + m] = 1.5 * w1[i, j] * w2[k, m]
    assert_close(layer(x), base(x) + x @ delta.T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings", [
    dict(r=2, alpha=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=2, alpha=3, target_modules=["q_proj", "up_proj"], decompose_both=True, decompose_factor=4,
         rank_pattern={"up_proj": 1}, alpha_pattern={"layers.1.self_attn.q_proj": 5}),
    dict(r=16, alpha=8, target_modules=["k_proj", "o_proj"]),  # r >= max / 2: both factors whole
], ids=["low_rank_w2", "decompose_both", "whole"])
def test_peft_file_gives_its_logits_and_gradients(tmp_path, settings):
    from peft import LoKrConfig, get_peft_model

    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    torch.manual_seed(0)
    theirs = get_peft_model(reference, LoKrConfig(task_type="CAUSAL_LM", init_weights=False, **settings))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    found = layers(ours)
    assert len(found) == 2 * len(settings["target_modules"])
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    for name, layer in found.items():
        for tensor in layer.trainable_names:
            their_grad = theirs.get_parameter(f"base_model.model.{name}.{tensor}.default").grad
            assert_close(getattr(layer, tensor).grad, their_grad, rtol=1e-4, atol=1e-6, msg=f"{name}.{tensor}")


def test_our_file_loads_in_peft_and_merges_as_peft_merges(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    ours = trained_looking(load_model(tmp_path / "base"), lambda m: (
        add_lokr(m, ["q", "gate"], r=2, alpha=4, decompose_both=True), add_lokr(m, ["o"], r=1, alpha=2,
                                                                                decompose_both=True)))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and config["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 1
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    unmerged = assert_merges_as_peft_merges(ours, theirs, ids, "lokr_")
    with torch.no_grad():
        unmerge(ours)
        assert_close(ours(ids), unmerged, rtol=0, atol=1e-5)


def test_every_lokr_config_key_is_accounted_for_and_refused_when_set(tmp_path):
    from peft import LoKrConfig

    walk(LoKrConfig, LOKR_KEYS)
    write_hf_checkpoint(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_lokr(model, ["q"], r=2)
    save_adapter(model, tmp_path / "adapter")
    assert_each_set_key_refused(tmp_path / "adapter", tmp_path / "base", LOKR_KEYS)
