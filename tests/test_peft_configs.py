"""peft adapter configs: every key is honoured or refused by name, and names match as peft matches them."""

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close

from minipeft import BadInput, add_lora, load_adapter, load_model, merge, save_adapter
from minipeft.formats.peft import COMMON, LORA_KEYS, PROMPT_TUNING_KEYS
from minipeft.methods import lora, prompt_tuning
from tests.helpers import write_hf_checkpoint


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base")
    return reference, tmp_path


def peft_adapter(reference, tmp_path, **config):
    """An adapter trained-looking (B random) and saved by peft itself; returns its directory and model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    theirs = get_peft_model(reference, LoraConfig(**config))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    return tmp_path / "peft_adapter", theirs


@pytest.mark.parametrize("config", [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 4}),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], alpha_pattern={"o_proj": 32},
         rank_pattern={"layers.1.self_attn.k_proj": 2}),
    dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.1\..*_proj"),  # a regex: the whole name must match
    dict(r=4, lora_alpha=8, target_modules=["self_attn.q_proj", "mlp.up_proj"]),  # name suffixes with dots
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),  # alpha / sqrt(r)
], ids=["rank_pattern", "alpha_pattern", "regex", "suffixes", "rslora"])
def test_peft_files_load_as_peft_reads_them(pair, config):
    reference, tmp_path = pair
    directory, theirs = peft_adapter(reference, tmp_path, **config)
    ours = load_model(tmp_path / "base")
    load_adapter(ours, directory)
    wrapped = {name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
               if type(m).__name__ == "Linear" and hasattr(m, "lora_A")}
    assert set(lora.lora_layers(ours)) == wrapped
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    save_adapter(ours, tmp_path / "again")  # and back: peft reads what minipeft writes from it
    from peft import PeftModel

    again = PeftModel.from_pretrained(write_hf_checkpoint(tmp_path / "base2"), tmp_path / "again")
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


def unset_to_set(default):
    """A value that changes the math where the default did not."""
    return {False: True, None: [0], "none": "all"}.get(default, "changed")


def walk(peft_config_class, keys):
    names = {f.name for f in dataclasses.fields(peft_config_class)}
    accounted = set(keys.read) | set(COMMON) | set(keys.not_math) | set(keys.only_default)
    assert names - accounted == set(), f"peft has keys minipeft does not account for: {names - accounted}"
    defaults = peft_config_class()
    for key, ours in keys.only_default.items():
        theirs = getattr(defaults, key)
        assert theirs == ours or theirs in (None, {}, []) and ours is None, (key, theirs, ours)


def assert_each_set_key_refused(directory, base, keys, more=(), said="is"):
    """The adapter in `directory` with each of keys.only_default set, then a key peft may add later (and `more`,
    (key, value) pairs): each refused by its key, in a line naming the config file."""
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in [*((k, unset_to_set(v)) for k, v in keys.only_default.items()), ("a_future_key", 3), *more]:
        path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(BadInput, match=f"adapter_config.json: key '{key}' {said}"):
            load_adapter(load_model(base), directory)


def test_every_lora_config_key_is_accounted_for_and_refused_when_set(pair):
    from peft import LoraConfig

    walk(LoraConfig, LORA_KEYS)
    reference, tmp_path = pair
    directory, _ = peft_adapter(reference, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((directory / "adapter_config.json").read_text())
    for key, default in LORA_KEYS.only_default.items():
        (directory / "adapter_config.json").write_text(json.dumps({**config, key: unset_to_set(default)}))
        with pytest.raises(BadInput, match=f"key '{key}' is"):
            load_adapter(load_model(tmp_path / "base"), directory)
    (directory / "adapter_config.json").write_text(json.dumps({**config, "a_future_key": 3}))
    with pytest.raises(BadInput, match="key 'a_future_key' is 3; minipeft does not know this key"):
        load_adapter(load_model(tmp_path / "base"), directory)


def test_an_init_that_changes_the_base_is_refused_and_its_converted_file_equals_peft(pair):
    """PiSSA and OLoRA move part of W into A and B and train against the rest: their own file is right only on
    that changed base, so it is refused by name; converted by peft to plain LoRA, it loads and equals peft."""
    from peft import LoraConfig, get_peft_model

    reference, tmp_path = pair
    ids = torch.randint(0, 256, (2, 9))
    for init in ("pissa", "olora"):
        base = write_hf_checkpoint(tmp_path / f"{init}_base")  # a fresh copy: the init changes its weights
        theirs = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=init))
        theirs.save_pretrained(tmp_path / f"{init}_start")  # A0, B0: the initial state the conversion needs
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn_like(p) * 0.05)  # as if trained
        theirs.save_pretrained(tmp_path / f"{init}_own")
        with pytest.raises(BadInput, match=f"key 'init_lora_weights' is '{init}': this adapter is right only"):
            load_adapter(load_model(tmp_path / "base"), tmp_path / f"{init}_own")
        theirs.save_pretrained(tmp_path / f"{init}_plain",
                               path_initial_model_for_weight_conversion=tmp_path / f"{init}_start")
        ours = load_model(tmp_path / "base")  # the original base, as the converted file expects
        load_adapter(ours, tmp_path / f"{init}_plain")
        with torch.no_grad():
            assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-4)
    for init in ("gaussian", "orthogonal"):  # these keep W: their own file is plain LoRA
        directory, theirs = peft_adapter(write_hf_checkpoint(tmp_path / f"{init}_base"), tmp_path / init, r=4,
                                         lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init)
        ours = load_model(tmp_path / "base")
        load_adapter(ours, directory)
        with torch.no_grad():
            assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_every_prompt_tuning_config_key_is_accounted_for_and_refused_when_set(pair):
    from peft import PromptTuningConfig

    walk(PromptTuningConfig, PROMPT_TUNING_KEYS)
    _, tmp_path = pair
    model = load_model(tmp_path / "base")
    prompt_tuning.add_prompt_tuning(model, num_prompts=3)
    save_adapter(model, tmp_path / "prompts")
    config = json.loads((tmp_path / "prompts" / "adapter_config.json").read_text())
    # modules_to_save: a head (lm_head, score) is honoured (tests/test_task_head.py), so a file that names one must
    # hold its weight; any other module is refused by name
    for key, value, named in (("modules_to_save", ["embed_tokens"], "key 'modules_to_save' is"),
                              ("modules_to_save", ["lm_head"], "missing ['base_model.model.lm_head.weight']"),
                              ("token_dim", 32, "key 'token_dim' should be int in [64, 64]"),
                              ("num_transformer_submodules", 2, "key 'num_transformer_submodules'")):
        (tmp_path / "prompts" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(BadInput, match=named.replace("[", r"\[").replace("]", r"\]")):
            load_adapter(load_model(tmp_path / "base"), tmp_path / "prompts")


def test_a_merged_adapter_cannot_train_and_saves_as_trained(pair):
    _, tmp_path = pair
    model = load_model(tmp_path / "base")
    add_lora(model, ["q", "v"], r=4)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    merge(model)
    ids = torch.randint(0, 256, (2, 7))
    with pytest.raises(BadInput, match="merged into its base weight"):
        model.train().loss(ids, ids)
    with torch.no_grad():
        merged = model.eval()(ids)
    save_adapter(model, tmp_path / "merged")
    fresh = load_model(tmp_path / "base")
    load_adapter(fresh, tmp_path / "merged")
    with torch.no_grad():
        assert_close(fresh(ids), merged, rtol=0, atol=1e-5)
