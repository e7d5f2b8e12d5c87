"""The decoder's contract with PEFT methods (llama/model.py), held to transformers: a learned past in every
layer, the bare base through `disabled`, and the settings each method records for its file."""

import json

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import minipeft
from minipeft import (BadInput, add_dora, add_ia3, add_lora, add_prompt_tuning, enable_checkpointing, load_adapter,
                      load_model, save_adapter)
from minipeft.methods.named_adapters import wrappers
from tests.helpers import write_hf_checkpoint


class RandomPast(nn.Module):
    """A learned past as contract 3 asks for: P keys and values per layer, (B, KV, P, head_dim) each."""

    def __init__(self, config, P=3):
        super().__init__()
        shape = (config.num_hidden_layers, config.num_key_value_heads, P, config.head_dim)
        self.keys, self.values = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(shape))

    def forward(self, batch_size):
        expand = lambda t: t[:, None].expand(-1, batch_size, -1, -1, -1)  # (L, B, KV, P, hd)
        keys = list(expand(self.keys))
        return keys, keys if self.values is self.keys else list(expand(self.values))


def test_learned_past_equals_transformers_prefilled_cache(tmp_path):
    """The keys and values are attended as given (not rotated), and the text is numbered from P."""
    from transformers import DynamicCache

    reference = write_hf_checkpoint(tmp_path, kv_heads=2)
    ours = load_model(tmp_path)
    torch.manual_seed(1)
    ours.model.learned_past = RandomPast(ours.config)
    ids = torch.randint(0, 256, (2, 7))
    keys, values = ours.model.learned_past(2)
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.detach().clone(), v.detach().clone(), layer)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=torch.ones(2, 3 + 7, dtype=torch.long),
                           past_key_values=cache).logits
        assert_close(ours(ids), theirs, rtol=0, atol=1e-5)
        # cached decoding: prefill fills the cache with the past, then one token at a time
        kv = minipeft.KVCache(ours.config.num_hidden_layers)
        steps = [ours(ids[:, :4], cache=kv)] + [ours(ids[:, t:t + 1], cache=kv) for t in range(4, 7)]
        assert_close(torch.cat(steps, dim=1), theirs, rtol=0, atol=1e-5)
        assert kv.length == 3 + 7


@pytest.mark.parametrize("shared", [False, True], ids=["keys_and_values", "one_tensor_for_both"])
def test_learned_past_gets_the_same_gradients_under_checkpointing(tmp_path, shared):
    """Also when the keys and the values are one tensor: its gradient counts once, not once per use."""
    write_hf_checkpoint(tmp_path)

    def gradients(checkpointing):
        torch.manual_seed(0)
        model = load_model(tmp_path)
        model.model.learned_past = RandomPast(model.config)
        if shared:
            model.model.learned_past.values = model.model.learned_past.keys
        enable_checkpointing(model, checkpointing)
        ids = torch.randint(0, 256, (2, 9))
        model.loss(ids, ids).backward()
        return [p.grad for p in model.model.learned_past.parameters()]

    plain, checkpointed = gradients(False), gradients(True)
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        assert_close(b, a, rtol=0, atol=1e-6)


def test_disabled_runs_the_bare_base_whatever_is_on(tmp_path):
    write_hf_checkpoint(tmp_path)
    bare, model = load_model(tmp_path), load_model(tmp_path)
    add_prompt_tuning(model, num_prompts=4)
    add_lora(model, ["q", "v", "down"], r=4)
    for layer in minipeft.methods.lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight)
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        adapted = model(ids)
        with minipeft.disabled(model):
            assert_close(model(ids), bare(ids), rtol=0, atol=0)
            assert (minipeft.generate(model, ids.tolist(), 4, eos_id=-1)
                    == minipeft.generate(bare, ids.tolist(), 4, eos_id=-1))
        assert_close(model(ids), adapted, rtol=0, atol=0)  # everything back on
    minipeft.merge(model)
    with pytest.raises(BadInput, match="merged into its base weight"):
        minipeft.disabled(model)


def saved_config(model, tmp_path):
    save_adapter(model, tmp_path / "adapter")
    return json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


def test_settings_are_saved_as_asked_not_guessed_from_the_layers(tmp_path):
    """The second add_lora call's r and alpha go to rank/alpha patterns, even where they are the majority."""
    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path)
    add_lora(model, ["q"], r=4, alpha=8, dropout=0.1)
    add_lora(model, ["k", "v", "o", "gate", "up", "down"], r=2, alpha=3, dropout=0.1)
    config = saved_config(model, tmp_path)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["rank_pattern"] == {f"model.layers.{i}.{m}": 2 for i in range(2) for m in
                                      ["self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                       "mlp.up_proj", "mlp.down_proj"]}
    assert set(config["alpha_pattern"]) == set(config["rank_pattern"])
    with pytest.raises(BadInput, match="dropout: 0.2 differs from 0.1, what adapter 'default' was given before"):
        add_lora(model, ["lm_head"], r=4, alpha=8, dropout=0.2)
    with pytest.raises(BadInput, match="use_dora: True differs from False"):
        add_dora(model, ["lm_head"], r=4, alpha=8, dropout=0.1)
    assert not hasattr(model.lm_head, "lora_A")  # refused before anything changed


def test_a_second_call_of_any_method_joins_the_first_in_its_file(tmp_path):
    """IA3 on other layers of the same adapter: both calls' targets are in the file, not the second's alone."""
    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path)
    add_ia3(model, ["k_proj"], feedforward=[])
    add_ia3(model, ["down_proj"])
    config = saved_config(model, tmp_path)
    assert (config["target_modules"], config["feedforward_modules"]) == (["k_proj", "down_proj"], ["down_proj"])
    loaded = load_model(tmp_path)
    load_adapter(loaded, tmp_path / "adapter")
    assert sorted(type(m).__name__ for _, m in wrappers(loaded)) == ["IA3FeedforwardLayer"] * 2 + ["IA3Layer"] * 2


@pytest.mark.parametrize("init, peft_init", [("random", "RANDOM"), ("vocab", "SAMPLE_VOCAB"), ("text", "TEXT")])
def test_prompt_tuning_init_is_saved_as_asked(tmp_path, init, peft_init, default_weights):
    model, tokenizer = minipeft.load(default_weights)
    add_prompt_tuning(model, num_prompts=5, init=init, init_text="Deny the fox." if init == "text" else None,
                      tokenizer=tokenizer)
    config = saved_config(model, tmp_path)
    assert config["prompt_tuning_init"] == peft_init and config["num_virtual_tokens"] == 5
    assert config["prompt_tuning_init_text"] == ("Deny the fox." if init == "text" else None)
    loaded = load_model(default_weights)
    minipeft.load_adapter(loaded, tmp_path / "adapter")
    assert saved_config(loaded, tmp_path / "again") == config  # a round trip keeps the settings


def test_attach_refuses_a_taken_slot_before_changing_anything(tmp_path):
    """A second LoRA on q_proj in the same adapter is refused, and k_proj, asked for in the same call, stays bare:
    attach() checks every slot before it places any wrapper."""
    from minipeft.methods.placing import slot_names
    from minipeft.methods.named_adapters import wrappers

    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path)
    add_lora(model, ["q"])
    before = sorted(slot_names(model))
    with pytest.raises(BadInput, match="model.layers.0.self_attn.q_proj already has a LoRALayer in adapter 'default'"):
        add_lora(model, ["k", "q"])
    assert sorted(slot_names(model)) == before and not any(n.endswith("k_proj") for n, _ in wrappers(model))
    minipeft.add_ia3(model, ["down"], feedforward=[], name="ia3")
    with pytest.raises(BadInput, match="down_proj already has a IA3Layer"):  # its feedforward kind: the same method
        minipeft.add_ia3(model, ["down"], name="ia3")
    assert add_lora(model, ["k", "q"], name="other") == 4  # another adapter stacks on the same slots
