"""LoRA against the course's golden values and against peft's LoRA on the same checkpoint."""

import pytest
import torch
from torch.testing import assert_close
import torch.nn.functional as F

import minipeft
from minipeft import LoRALayer, add_lora, base_fingerprint, load_adapter, load_model, merge, save_adapter, unmerge
from tests.helpers import train_steps, write_hf_checkpoint

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora(model, seed=0):
    """Trained-looking adapters: B is zero at init, which would hide every bug in the side path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in minipeft.methods.lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


def test_course_golden_values():
    base = torch.nn.Linear(128, 128)
    with torch.no_grad():
        base.weight.copy_(torch.eye(128))
        base.bias.copy_(torch.linspace(1, -1, 128))
    layer = LoRALayer(base, r=8, alpha=8)  # alpha / r = 1: no scaling
    x = torch.ones(1, 128) / 128
    assert torch.equal(layer(x), base(x))  # B = 0: an untouched adapter is a no-op
    A = torch.linspace(0.1, -0.5, 1024).reshape(128, 8)  # the course stores A as (in, r), B as (r, out)
    B = torch.linspace(0.5, -0.1, 1024).reshape(8, 128)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A.T)  # nn.Linear layout: the same numbers transposed
        layer.lora_B.weight.copy_(B.T)
    loss = F.mse_loss(layer(x).squeeze(), torch.linspace(-1, 1, 128))
    loss.backward()
    assert loss.item() == pytest.approx(1.3711389, abs=1e-6)
    assert layer.lora_A.weight.grad.sum().item() == pytest.approx(-0.60158, abs=1e-4)
    assert layer.lora_B.weight.grad.sum().item() == pytest.approx(0.9931, abs=1e-4)


@pytest.fixture()
def pair(tmp_path):
    """Our model and transformers' on the same random checkpoint."""
    reference = write_hf_checkpoint(tmp_path / "base")
    return load_model(tmp_path / "base"), reference, tmp_path


def test_forward_and_gradients_equal_peft(pair):
    from peft import PeftModel

    ours, reference, tmp_path = pair
    assert add_lora(ours, ALL_TARGETS, r=4, alpha=8) == 14
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True)
    ids = torch.randint(0, 256, (2, 11))
    loss = ours.loss(ids, ids)
    their_loss = theirs(input_ids=ids, labels=ids).loss
    loss.backward()
    their_loss.backward()
    assert_close(loss, their_loss, rtol=0, atol=1e-5)
    their_params = dict(theirs.named_parameters())
    worst = 0.0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            module, kind = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]  # ...q_proj, lora_A
            theirs_grad = their_params[f"base_model.model.{module}.{kind}.default.weight"].grad
            worst = max(worst, (p.grad - theirs_grad).abs().max().item())
            assert_close(p.grad, theirs_grad, rtol=0, atol=1e-5)
    print(f"LoRA vs peft: loss diff {abs(loss.item() - their_loss.item()):.2e}, worst grad diff {worst:.2e}")


def test_peft_adapter_loads_in_minipeft(pair):
    from peft import LoraConfig, get_peft_model

    ours, reference, tmp_path = pair
    theirs = get_peft_model(reference, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    config = load_adapter(ours, tmp_path / "peft_adapter")
    assert config["peft_type"] == "LORA" and len(minipeft.methods.lora.lora_layers(ours)) == 6
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_round_trip_through_files(pair):
    ours, _, tmp_path = pair
    add_lora(ours, ["q", "k", "v"], r=8, alpha=16)
    add_lora(ours, ["gate", "up", "down"], r=4, alpha=4)  # its own rank and alpha: peft's rank_pattern
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    again = load_model(tmp_path / "base")
    load_adapter(again, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))


def test_merge_unmerge_full_precision(pair):
    ours, _, _ = pair
    add_lora(ours, ALL_TARGETS, r=8)
    randomize_lora(ours)
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        unmerged = ours(ids)
        assert merge(ours) == 0.0
        merged = ours(ids)
        unmerge(ours)
        again = ours(ids)
    assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert_close(again, unmerged, rtol=0, atol=1e-5)
    after = ours.state_dict()
    for name, weight in before.items():
        assert_close(after[name], weight, rtol=0, atol=1e-6)


def test_lora_on_4bit_base(pair):
    """QLoRA: B = 0 is exactly the 4-bit base; merging re-quantizes, and the error is measured and bounded."""
    _, _, tmp_path = pair
    model = load_model(tmp_path / "base", quantize="nf4")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        base_logits = model(ids)
        add_lora(model, ALL_TARGETS, r=8)
        assert torch.equal(model(ids), base_logits)
        randomize_lora(model)
        unmerged = model(ids)
        rounding = merge(model)
        merged = model(ids)
    print(f"4-bit merge: weight rounding error {rounding:.4f}, logits diff {(merged - unmerged).abs().max():.4f}")
    assert 0 < rounding < 0.05  # at most about half an NF4 step of the largest block scale
    assert_close(merged, unmerged, rtol=0, atol=0.5)


def test_base_bit_identical_after_training(pair):
    ours, _, _ = pair
    fingerprint = base_fingerprint(ours)
    add_lora(ours, ALL_TARGETS, r=8)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 12))
    losses = train_steps(ours, optimizer, ids, 5)
    assert losses[-1] < losses[0]
    assert base_fingerprint(ours) == fingerprint
    assert minipeft.count_parameters(ours)["trainable_params"] == sum(
        8 * (m.base_layer.in_features + m.base_layer.out_features)
        for m in minipeft.methods.lora.lora_layers(ours).values())


def test_llama_7b_lora_counts_on_meta():
    model = minipeft.build_model(minipeft.LlamaConfig())
    assert add_lora(model, ["q_proj", "k_proj", "v_proj"], r=8) == 96
    report = minipeft.count_parameters(model)
    assert report["trainable_params"] == 6_291_456
    assert report["total_params"] == 6_738_415_616 + 6_291_456


def test_merge_refuses_a_tied_lm_head(tmp_path):
    write_hf_checkpoint(tmp_path, tied=True)
    model = load_model(tmp_path)
    add_lora(model, ["lm_head"], r=4)
    randomize_lora(model)
    embedding = model.model.embed_tokens.weight.clone()
    with pytest.raises(minipeft.BadInput, match="tie_word_embeddings"):
        merge(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_generation_with_lora_on_lm_head(pair):
    """An untouched adapter on every target, lm_head included, generates exactly the base model's tokens."""
    ours, _, _ = pair
    prompts = [[5, 17, 99], [8, 200, 4, 4]]
    base = minipeft.generate(ours, prompts, max_new_tokens=6, eos_id=-1)
    add_lora(ours, [*ALL_TARGETS, "lm_head"], r=4)
    assert minipeft.generate(ours, prompts, max_new_tokens=6, eos_id=-1) == base
