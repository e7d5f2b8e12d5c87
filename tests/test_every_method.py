"""What every method must do, each checked the same way: the same gradients under gradient checkpointing, on
the fp32 and the 4-bit base; on 4-bit, the logits of the dequantized weights; cached generation equal to
recomputing everything; a frozen base that stays bit-identical through training; and its file round trip."""

import bitsandbytes as bnb
import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import load_adapter, load_model, save_adapter
from minipeft.methods.freezing import adapter_parameters
from tests.helpers import train_steps, write_hf_checkpoint
from tests.test_checkpoint import assert_same

METHODS = {
    "lora": lambda m: minipeft.add_lora(m, ["q", "v", "down"], r=4),
    "dora": lambda m: minipeft.add_dora(m, ["q", "k", "up"], r=4),
    "loha": lambda m: minipeft.add_loha(m, ["k", "o", "gate"], r=3),
    "vera": lambda m: minipeft.add_vera(m, ["q", "v", "down"], r=4),
    "lokr": lambda m: minipeft.add_lokr(m, ["q", "v", "down"], r=2, decompose_both=True),
    "ln_tuning": lambda m: minipeft.add_ln_tuning(m),
    "ia3": lambda m: minipeft.add_ia3(m),
    "bitfit": lambda m: minipeft.add_bitfit(m, norms=True),
    "bottleneck": lambda m: minipeft.add_bottleneck_adapters(m, bottleneck_size=8),
    "prefix": lambda m: minipeft.add_prefix_tuning(m, num_prompts=3),
    "prefix_projection": lambda m: minipeft.add_prefix_tuning(m, num_prompts=3, projection_hidden=16, init="random"),
    "prompt": lambda m: minipeft.add_prompt_tuning(m, num_prompts=3),
    "p_tuning": lambda m: minipeft.add_p_tuning(m, num_prompts=3, encoder="LSTM", hidden=8),
    "lopt": lambda m: minipeft.add_lopt(m, num_prompts=3, r=2),
    "alora": lambda m: minipeft.add_alora(m, ["q", "v", "down"], r=2, capacity=3),
    "ept": lambda m: minipeft.add_ept(m, num_prompts=3, max_length=12, r=2, spaces=2),
    "iapt": lambda m: minipeft.add_iapt(m, num_prompts=2, r=4, instruction_tokens=2),  # prompts of 3+ tokens
    "lora_and_lm_head": lambda m: (minipeft.add_lora(m, ["q", "v"], r=4), minipeft.add_task_head(m)),
}


def add_trained_looking(model, method, seed=0):
    """The method, with every tensor it trains moved off its starting value (zeros would hide bugs)."""
    torch.manual_seed(seed)
    METHODS[method](model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    write_hf_checkpoint(path, attention_bias=True)
    return path


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_under_checkpointing(base, method, quantize):
    assert_same(base, lambda m: add_trained_looking(m, method), quantize)


@pytest.mark.parametrize("method", METHODS)
def test_on_4bit_equals_the_dequantized_weights(base, method):
    quantized, decoded = load_model(base, quantize="nf4"), load_model(base)
    for name, layer in quantized.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            decoded.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(
                layer.weight.data, layer.weight.quant_state)
    add_trained_looking(quantized, method), add_trained_looking(decoded, method)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(quantized(ids), decoded(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_recomputing(base, method):
    model = add_trained_looking(load_model(base), method).eval()
    ids = torch.randint(0, 256, (1, 7))
    cache = minipeft.KVCache(model.config.num_hidden_layers)
    with torch.no_grad():
        full = model(ids)[:, -3:]  # the last 3 positions, all recomputed
        model(ids[:, :4], cache=cache)
        stepped = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(4, 7)], dim=1)
    assert_close(stepped, full, rtol=0, atol=1e-5)
    prompts = [ids[0].tolist(), ids[0, :3].tolist()]  # left-padded together: each as if alone
    together = minipeft.generate(model, prompts, max_new_tokens=5, eos_id=-1)
    assert together == [minipeft.generate(model, [p], max_new_tokens=5, eos_id=-1)[0] for p in prompts]


@pytest.mark.parametrize("method", METHODS)
def test_training_leaves_the_base_bit_identical_and_the_file_round_trips(base, method, tmp_path):
    model = add_trained_looking(load_model(base, quantize="nf4"), method).train()
    fingerprint = minipeft.base_fingerprint(model)
    trained = adapter_parameters(model)
    start = {name: p.detach().clone() for name, p in trained.items()}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 9))
    losses = train_steps(model, optimizer, ids, 3)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, start[name]) for name, p in trained.items()), "every trained tensor moved"
    assert minipeft.base_fingerprint(model) == fingerprint
    save_adapter(model.eval(), tmp_path / "adapter")
    loaded = load_model(base, quantize="nf4")
    load_adapter(loaded, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(loaded(ids), model(ids), rtol=0, atol=1e-6)
