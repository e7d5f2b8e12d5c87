"""VeRA against peft's VeRA on transformers' Llama: the shared pair drawn from the same seed, logits, gradients,
the file both ways (with and without the pair), merge, every config key; and the formula written out."""

import json

import pytest
import torch
from torch.testing import assert_close

from minipeft import BadInput, add_vera, load_adapter, load_model, save_adapter, unmerge
from minipeft.formats.peft import VERA_KEYS
from minipeft.methods.vera import VeRALayer
from tests.helpers import assert_merges_as_peft_merges, trained_looking, write_hf_checkpoint
from tests.test_peft_configs import assert_each_set_key_refused, walk

TARGETS = ["q_proj", "v_proj", "down_proj"]  # (64, 64), (32, 64), (64, 128): the pair is A (r, 128), B (64, r)


def their_vera(reference, **settings):
    from peft import VeraConfig, get_peft_model

    theirs = get_peft_model(reference, VeraConfig(task_type="CAUSAL_LM", **settings))
    with torch.no_grad():  # trained-looking: b is zero at the start
        for name, p in theirs.named_parameters():
            if "vera_lambda" in name:
                p.add_(0.3 * torch.randn_like(p))
    return theirs


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, VeRALayer)}


def test_each_layer_computes_lambda_b_b_lambda_d_a_from_one_shared_pair(tmp_path):
    write_hf_checkpoint(tmp_path)
    model = trained_looking(load_model(tmp_path), lambda m: add_vera(m, TARGETS, r=4))
    found = layers(model)
    down, v = found["model.layers.1.mlp.down_proj"], found["model.layers.0.self_attn.v_proj"]
    A, B = down.shared_pair
    assert A.shape == (4, 128) and B.shape == (64, 4)
    assert v.vera_A.data_ptr() == A.data_ptr() and v.vera_B.shape == (32, 4)  # a view: the pair is held once
    x = torch.randn(3, 64)
    b, d = v.vera_lambda_b.detach(), v.vera_lambda_d.detach()
    delta = torch.diag(b) @ B[:32] @ torch.diag(d) @ A[:, :64]  # Λb B Λd A: (32, 64)
    assert_close(v(x), v.base_layer(x) + x @ delta.T, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * ((64 + 4) + (32 + 4) + (64 + 4))


def test_peft_file_gives_its_logits_and_gradients(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    theirs = their_vera(reference, r=4, target_modules=TARGETS, projection_prng_key=7)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    found = layers(ours)
    assert len(found) == 6
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    for name, layer in found.items():
        for tensor in VeRALayer.trainable_names:
            their_grad = theirs.get_parameter(f"base_model.model.{name}.{tensor}.default").grad
            assert_close(getattr(layer, tensor).grad, their_grad, rtol=1e-4, atol=1e-6, msg=f"{name}.{tensor}")


@pytest.mark.parametrize("save_projection", [True, False])
def test_our_file_loads_in_peft_and_merges_as_peft_merges(tmp_path, save_projection):
    """Without the pair in the file, peft draws it again from the seed: ours is drawn as peft draws it."""
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    ours = trained_looking(load_model(tmp_path / "base"),
                           lambda m: add_vera(m, TARGETS, r=4, key=3, save_projection=save_projection))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is save_projection
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    unmerged = assert_merges_as_peft_merges(ours, theirs, ids, "vera_")
    with torch.no_grad():
        unmerge(ours)
        assert_close(ours(ids), unmerged, rtol=0, atol=1e-5)


def test_every_vera_config_key_is_accounted_for_and_refused_when_set(tmp_path):
    from peft import VeraConfig

    walk(VeraConfig, VERA_KEYS)
    write_hf_checkpoint(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_vera(model, r=2)
    save_adapter(model, tmp_path / "adapter")
    assert_each_set_key_refused(tmp_path / "adapter", tmp_path / "base", VERA_KEYS)
    with pytest.raises(BadInput, match="add_vera: adapter 'default' has VeRA already"):
        add_vera(model, ["o_proj"], r=2)
