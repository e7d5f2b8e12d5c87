"""Bottleneck adapters, proven by hand (peft has none, and adapter-hub's `adapters` pins transformers 4):
the formula written out on transformers' Llama through hooks, identity at init, the parameter count."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minipeft import BadInput, add_bottleneck_adapters, count_parameters, load_adapter, load_model, save_adapter
from minipeft.methods.bottleneck import BottleneckAdapter
from tests.helpers import write_hf_checkpoint


def adapters(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


@pytest.mark.parametrize("placement, wrapped", [("houlsby", ("o_proj", "down_proj")), ("pfeiffer", ("down_proj",))])
def test_equals_the_formula_hooked_into_transformers_llama(tmp_path, placement, wrapped):
    reference = write_hf_checkpoint(tmp_path)
    ours = load_model(tmp_path)
    add_bottleneck_adapters(ours, bottleneck_size=8, placement=placement, non_linearity="gelu")
    assert sorted({name.rsplit(".", 1)[-1] for name in adapters(ours)}) == sorted(wrapped)
    with torch.no_grad():
        for adapter in adapters(ours).values():
            for p in adapter.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)

    def formula(adapter):  # h + W_up gelu(W_down h + b_down) + b_up, after the wrapped layer
        down, up = adapter.adapter_down, adapter.adapter_up
        return lambda module, inputs, h: h + F.linear(F.gelu(F.linear(h, down.weight, down.bias)), up.weight, up.bias)

    for name, adapter in adapters(ours).items():
        reference.get_submodule(name).register_forward_hook(formula(adapter))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids), reference(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_untouched_adapters_change_nothing_and_the_count_is_houlsbys(tmp_path):
    write_hf_checkpoint(tmp_path)
    bare, model = load_model(tmp_path), load_model(tmp_path)
    add_bottleneck_adapters(model, bottleneck_size=8)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(model(ids), bare(ids), rtol=0, atol=0)
    layers, d, m = 2, 64, 8
    assert count_parameters(model)["trainable_params"] == 2 * layers * (2 * d * m + d + m)
    pfeiffer = load_model(tmp_path)
    add_bottleneck_adapters(pfeiffer, bottleneck_size=8, placement="pfeiffer")
    assert count_parameters(pfeiffer)["trainable_params"] == layers * (2 * d * m + d + m)


def test_file_round_trip_and_peft_refuses_it(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_bottleneck_adapters(model, bottleneck_size=4, placement="pfeiffer", non_linearity="silu")
    with torch.no_grad():
        for adapter in adapters(model).values():
            adapter.adapter_up.weight.normal_(0, 0.2)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_model(tmp_path / "base")
    load_adapter(loaded, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(Exception, match="BOTTLENECK"):  # peft knows no such method, and says so
        PeftModel.from_pretrained(reference, tmp_path / "adapter")
    with pytest.raises(BadInput, match="placement: expected one of"):
        add_bottleneck_adapters(load_model(tmp_path / "base"), placement="parallel")
