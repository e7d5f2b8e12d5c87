"""LN tuning against peft's LN tuning on transformers' Llama: logits, gradients, the file both ways, merge, every
config key; and the formula: each RMSNorm computes x / sqrt(mean(x²) + eps) * g with its trained g."""

import json

import pytest
import torch
from torch.testing import assert_close

from minipeft import BadInput, add_ln_tuning, load_adapter, load_model, merge, save_adapter, unmerge
from minipeft.formats.peft import LN_TUNING_KEYS
from minipeft.methods.bitfit import NormWithLearnedGain
from tests.helpers import trained_looking, write_hf_checkpoint
from tests.test_peft_configs import assert_each_set_key_refused, walk


def gains(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NormWithLearnedGain)}


def test_each_norm_computes_rms_norm_with_its_trained_gain(tmp_path):
    write_hf_checkpoint(tmp_path)
    model = trained_looking(load_model(tmp_path), lambda m: add_ln_tuning(m, ["post_attention_layernorm"]))
    norm = model.model.layers[1].post_attention_layernorm
    assert set(gains(model)) == {"model.layers.0.post_attention_layernorm", "model.layers.1.post_attention_layernorm"}
    x = torch.randn(2, 5, 64)
    g, eps = norm.weight.detach(), norm.base_norm.eps
    assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g, rtol=0, atol=1e-6)
    assert not torch.equal(g, norm.base_norm.weight)  # the frozen gain is not the one used
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 64


def test_peft_file_gives_its_logits_and_gradients(tmp_path):
    from peft import LNTuningConfig, get_peft_model

    reference = write_hf_checkpoint(tmp_path / "base")
    theirs = get_peft_model(reference, LNTuningConfig(task_type="CAUSAL_LM"))  # Llama: every norm
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    assert len(gains(ours)) == 5  # two a block, and the final norm
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    for name, norm in gains(ours).items():
        their_grad = theirs.get_parameter(f"base_model.model.{name}.ln_tuning_layers.default.weight").grad
        assert_close(norm.weight.grad, their_grad, rtol=0, atol=1e-5, msg=name)


def test_our_file_loads_in_peft_and_merges_as_peft_merges(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base")
    ours = trained_looking(load_model(tmp_path / "base"), lambda m: add_ln_tuning(m, r".*layers\.1\..*norm"))
    frozen = ours.model.layers[1].input_layernorm.base_norm.weight.clone()
    save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"]
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        unmerged = ours(ids)
        assert_close(unmerged, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
        merge(ours)
        assert_close(ours(ids), unmerged, rtol=0, atol=1e-5)
        merged_theirs = theirs.merge_and_unload().state_dict()
        for name, tensor in ours.state_dict().items():
            if name.endswith("norm.weight") and ".layers.1." in name:  # the trained copy; base_norm holds it now
                continue
            assert_close(tensor, merged_theirs[name.replace(".base_norm", "")], rtol=0, atol=0, msg=name)
        unmerge(ours)
        assert_close(ours(ids), unmerged, rtol=0, atol=1e-5)
    assert torch.equal(ours.model.layers[1].input_layernorm.base_norm.weight, frozen)


def test_every_ln_tuning_config_key_is_accounted_for_and_refused_when_set(tmp_path):
    from peft import LNTuningConfig

    walk(LNTuningConfig, LN_TUNING_KEYS)
    write_hf_checkpoint(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_ln_tuning(model)
    save_adapter(model, tmp_path / "adapter")
    assert_each_set_key_refused(tmp_path / "adapter", tmp_path / "base", LN_TUNING_KEYS)
    with pytest.raises(BadInput, match=r"targets: \['q_proj'\] matches no norm"):
        add_ln_tuning(load_model(tmp_path / "base"), ["q_proj"])
