"""Every Llama-family config.json loads as transformers reads it, or is refused by name."""

import json

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import LlamaConfig, BadInput, build_model, load_model
from minipeft.llama import config as config_module
from tests.helpers import write_hf_checkpoint

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
VARIANTS = {
    "rope_theta_500k": dict(rope_theta=500000.0),
    "linear_scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3_scaling": dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "explicit_head_dim": dict(head_dim=32),  # 64 / 4 heads would be 16
    "biases": dict(attention_bias=True, mlp_bias=True),
    "gqa_4_to_1": dict(num_key_value_heads=1),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers(tmp_path, variant):
    """Checkpoints written by transformers 5 (rope_parameters layout); 100 positions, beyond llama3's 16."""
    reference = write_hf_checkpoint(tmp_path, **VARIANTS[variant])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in saved and "rope_parameters" in saved  # the layout the old reader missed
    model = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 100))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    print(f"{variant}: max abs diff {(ours - theirs).abs().max().item():.2e}")
    assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_transformers_4_layout_with_top_level_rope_keys(tmp_path):
    """rope_theta and rope_scaling at the top level, as transformers 4 wrote them (and transformers 5 reads)."""
    from transformers import LlamaForCausalLM

    write_hf_checkpoint(tmp_path, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    config = json.loads((tmp_path / "config.json").read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    config["rope_scaling"] = parameters
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = LlamaForCausalLM.from_pretrained(tmp_path).float().eval()
    assert reference.config.rope_parameters["rope_theta"] == 500000.0
    ids = torch.randint(0, 256, (1, 60))
    with torch.no_grad():
        assert_close(load_model(tmp_path)(ids), reference(ids).logits, rtol=0, atol=1e-5)


def test_biases_under_4bit_equal_bitsandbytes_dequantization(tmp_path):
    write_hf_checkpoint(tmp_path, attention_bias=True, mlp_bias=True)
    quantized, decoded = load_model(tmp_path, quantize="nf4"), load_model(tmp_path)
    import bitsandbytes as bnb

    for name, layer in quantized.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            assert layer.bias is not None and layer.bias.abs().sum() > 0
            decoded.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(layer.weight.data,
                                                                                     layer.weight.quant_state)
            assert torch.equal(decoded.get_submodule(name).bias, layer.bias)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert_close(quantized(ids), decoded(ids), rtol=0, atol=1e-5)


def test_greedy_generation_equals_transformers_for_llama3_scaling(tmp_path):
    reference = write_hf_checkpoint(tmp_path, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    model = load_model(tmp_path)
    prompts = [[5, 17, 99, 3, 250, 11, 42, 7, 8, 9, 10, 12], [31, 41, 59]]  # beyond 16 positions as it goes
    ours = minipeft.generate(model, prompts, max_new_tokens=30, eos_id=-1)
    for prompt, generated in zip(prompts, ours):
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        assert generated == theirs[0, len(prompt):].tolist()


def test_generation_stops_at_any_of_a_list_of_eos_ids(tmp_path):
    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path)
    free = minipeft.generate(model, [[5, 6, 7]], max_new_tokens=12, eos_id=-1)[0]
    assert len(set(free)) >= 3
    model.config.eos_token_id = [free[5], free[2]]  # a list, as Llama 3 instruct gives it
    assert minipeft.generate(model, [[5, 6, 7]], max_new_tokens=12)[0] == free[:free.index(free[2])]


PUBLISHED = {  # numbers from each model's published config.json
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, rope_theta=10000.0),
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001),
}
COUNTS = {"Llama-2-7B": 6_738_415_616, "Llama-3.2-1B": 1_235_814_400, "Llama-3.1-8B": 8_030_261_248}


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_equal_transformers_on_meta(name):
    from transformers import LlamaConfig as TheirConfig
    from transformers import LlamaForCausalLM

    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **PUBLISHED[name]}
    ours = build_model(LlamaConfig.from_dict(raw))
    with torch.device("meta"):
        theirs = LlamaForCausalLM(TheirConfig(**PUBLISHED[name]))
    count = lambda model: sum(p.numel() for p in model.parameters())
    assert count(ours) == count(theirs) == COUNTS[name]


@pytest.mark.parametrize("key, value, named", [
    ("hidden_act", "gelu", "'hidden_act' is 'gelu'"),
    ("attention_dropout", 0.1, "'attention_dropout' is 0.1"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type 'yarn'"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope_type 'dynamic'"),
    ("rope_scaling", {"type": "longrope", "factor": 2.0}, "rope_type 'longrope'"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4}, "rope_type 'linear' needs ['factor']"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "'partial_rotary_factor' = 0.5"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "attention_factor": 0.7, "rope_theta": 1e4},
     "'attention_factor' = 0.7"),
])
def test_configs_it_cannot_honour_are_refused_by_name(tmp_path, key, value, named):
    write_hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(BadInput, match="config.json") as error:
        load_model(tmp_path)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_every_transformers_config_key_is_read_or_harmless_or_refused():
    """When a future transformers adds a Llama config key, this fails instead of a run going quietly wrong."""
    from transformers import LlamaConfig as TheirConfig

    read = {f.name for f in config_module.fields(LlamaConfig)} | set(config_module.READ_ELSEWHERE)
    accounted = read | set(config_module.NOT_MATH) | set(config_module.ONLY_DEFAULT)
    keys = set(TheirConfig().to_dict())
    assert keys - accounted == set()
    for key, default in config_module.ONLY_DEFAULT.items():  # each refused value really is refused
        if key in keys:
            assert TheirConfig().to_dict()[key] == default, key


def test_unknown_keys_are_named_in_a_warning(tmp_path):
    write_hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
    with pytest.warns(UserWarning, match="sliding_window"):
        load_model(tmp_path)
