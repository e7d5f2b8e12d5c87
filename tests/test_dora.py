"""DoRA (LoRA with use_dora) against peft's DoRA on transformers' Llama: logits, gradients of A, B and the
magnitude, the file both ways, merge; on a 4-bit base the magnitude starts at the dequantized rows' norms."""

import bitsandbytes as bnb
import pytest
import torch
from torch.testing import assert_close

from minipeft import add_dora, load_adapter, load_model, save_adapter, unmerge
from minipeft.methods.lora import LoRALayer
from tests.helpers import assert_merges_as_peft_merges, write_hf_checkpoint

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def randomize_lora_and_magnitude(parameters, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in parameters:
            if "lora_B" in name or "magnitude" in name:
                size = p.abs().mean() if "magnitude" in name else 1
                p.add_(0.05 * torch.randn(p.shape, generator=generator) * size)


def test_peft_dora_file_gives_its_logits_and_gradients(tmp_path):
    from peft import LoraConfig, get_peft_model

    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    theirs = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    randomize_lora_and_magnitude(theirs.named_parameters())
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALayer)}
    assert len(layers) == 8
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        for ours_tensor, their_name in ((layer.lora_A.weight, "lora_A.default.weight"),
                                        (layer.lora_B.weight, "lora_B.default.weight"),
                                        (layer.lora_magnitude_vector.weight, "lora_magnitude_vector.default.weight")):
            their_grad = theirs.get_parameter(f"{prefix}.{their_name}").grad
            assert their_grad.abs().sum() > 0
            assert_close(ours_tensor.grad, their_grad, rtol=0, atol=1e-5, msg=f"{name} {their_name}")


def test_our_file_loads_in_peft_and_merges_as_peft_merges(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    add_dora(ours, TARGETS, r=4, alpha=8)
    randomize_lora_and_magnitude(ours.named_parameters())
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    before = {n: t.clone() for n, t in ours.state_dict().items()}
    assert_merges_as_peft_merges(ours, theirs, ids, "lora_")
    with torch.no_grad():
        unmerge(ours)
        for name, tensor in ours.state_dict().items():
            assert_close(tensor, before[name], rtol=0, atol=1e-6, msg=name)


def test_qdora_magnitude_starts_at_the_dequantized_row_norms(tmp_path):
    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path, quantize="nf4")
    add_dora(model, ["q_proj"], r=4)
    layer = model.model.layers[0].self_attn.q_proj
    weight = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    assert_close(layer.lora_magnitude_vector.weight, torch.linalg.norm(weight.float(), dim=1), rtol=0, atol=1e-6)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():  # untouched, the adapter changes nothing
        adapted = model(ids)
        layer.enabled = False
        assert_close(adapted, model(ids), rtol=0, atol=1e-5)


def test_qdora_forward_is_the_papers_formula_on_the_dequantized_weight_without_dequantizing_it(tmp_path, monkeypatch):
    """y = m / ||W + s B A||_row ⊙ (W x + s B A x), W the 4-bit weight as bitsandbytes dequantizes it; the forward
    gets the norm from ||W||^2, kept at the start, and W A^T (the 4-bit layer on A's rows), never W itself."""
    import minipeft.methods.dora as dora

    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path, quantize="nf4")
    add_dora(model, ["q_proj"], r=4, alpha=8)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        layer.lora_magnitude_vector.weight.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector.weight))
    W = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    A, B, m, s = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector.weight, 8 / 4
    x = torch.randn(2, 5, W.shape[1])
    expected = (m / torch.linalg.norm(W + s * B @ A, dim=1)) * (x @ W.T + s * x @ A.T @ B.T)
    monkeypatch.setattr(dora, "dequantize", lambda *a: pytest.fail("the forward dequantized W"))
    with torch.no_grad():
        assert_close(layer(x), expected, rtol=0, atol=2e-5)
