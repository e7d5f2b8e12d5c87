"""IA3 against peft's IA3 on transformers' Llama: logits, gradients, the file both ways, and merge."""

import pytest
import torch
from torch.testing import assert_close

from minipeft import BadInput, add_ia3, load_adapter, load_model, merge, save_adapter, unmerge
from minipeft.methods.ia3 import IA3Layer
from tests.helpers import assert_merges_as_peft_merges, write_hf_checkpoint


def randomize(parameters, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))


def test_peft_file_gives_its_logits_and_gradients(tmp_path):
    from peft import IA3Config, get_peft_model

    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    theirs = get_peft_model(reference, IA3Config(task_type="CAUSAL_LM"))  # Llama: k, v, down (feedforward)
    randomize([p for n, p in theirs.named_parameters() if "ia3_l" in n])
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Layer)}
    assert len(layers) == 6 and layers["model.layers.0.mlp.down_proj"].ia3_l.shape == (1, 128)
    assert layers["model.layers.0.self_attn.k_proj"].ia3_l.shape == (32, 1)
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    for name, layer in layers.items():
        their_grad = theirs.get_parameter(f"base_model.model.{name}.ia3_l.default").grad
        assert_close(layer.ia3_l.grad, their_grad, rtol=0, atol=1e-5, msg=name)


def test_our_file_loads_in_peft_and_merges_as_peft_merges(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base", attention_bias=True)
    ours = load_model(tmp_path / "base")
    assert add_ia3(ours, ["q", "v", "up", "down"], feedforward=["down"]) == 8
    randomize([m.ia3_l for m in ours.modules() if isinstance(m, IA3Layer)])
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    unmerged = assert_merges_as_peft_merges(ours, theirs, ids, "ia3_l")  # base weights scaled as peft scales them
    with torch.no_grad():
        unmerge(ours)
        assert_close(ours(ids), unmerged, rtol=0, atol=1e-5)


def test_merge_on_a_4bit_base_is_refused(tmp_path):
    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path, quantize="nf4")
    add_ia3(model)
    with pytest.raises(BadInput, match="IA3 on a 4-bit base"):
        merge(model)


def test_feedforward_layers_must_be_targets(tmp_path):
    write_hf_checkpoint(tmp_path)
    with pytest.raises(BadInput, match=r"feedforward: \['up_proj'\] are not among"):
        add_ia3(load_model(tmp_path), ["k", "v"], feedforward=["up"])
