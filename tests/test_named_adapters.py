"""Named adapters on one base, and mixed batches: each row runs with its own adapter (or none) and gets what
it would get alone, in forward, in training and in generation; LoRA's mixed batches equal peft's
`adapter_names=`, and the multi-adapter files go both ways through peft."""

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import BadInput, load_adapter, load_model, save_adapter, set_adapter
from minipeft.methods.freezing import adapter_parameters
from tests.helpers import write_hf_checkpoint

ADD = {
    "lora": lambda m, name: minipeft.add_lora(m, ["q", "v", "down"], r=4, name=name),
    "dora": lambda m, name: minipeft.add_dora(m, ["q", "k", "up"], r=4, name=name),
    "loha": lambda m, name: minipeft.add_loha(m, ["q", "v", "down"], r=2, name=name),
    "vera": lambda m, name: minipeft.add_vera(m, ["q", "up"], r=4, key=len(name), name=name),
    "lokr": lambda m, name: minipeft.add_lokr(m, ["k", "down"], r=2, name=name),
    "ln_tuning": lambda m, name: minipeft.add_ln_tuning(m, ["input_layernorm"] if name == "fox" else ["norm"],
                                                        name=name),
    "ia3": lambda m, name: minipeft.add_ia3(m, name=name),
    "bitfit": lambda m, name: minipeft.add_bitfit(m, norms=True, name=name),
    "bottleneck": lambda m, name: minipeft.add_bottleneck_adapters(m, bottleneck_size=8, name=name),
    "prefix": lambda m, name: minipeft.add_prefix_tuning(m, num_prompts=3 if name == "fox" else 5, name=name),
    "prompt": lambda m, name: minipeft.add_prompt_tuning(m, num_prompts=4 if name == "fox" else 2, name=name),
    "p_tuning": lambda m, name: minipeft.add_p_tuning(m, num_prompts=4 if name == "fox" else 2, hidden=8, name=name),
    "lopt": lambda m, name: minipeft.add_lopt(m, num_prompts=4 if name == "fox" else 3, r=2, name=name),
    "ept": lambda m, name: minipeft.add_ept(m, num_prompts=4 if name == "fox" else 2, max_length=12, r=2,
                                            spaces=2, name=name),
    "alora": lambda m, name: minipeft.add_alora(m, ["q", "v", "up"], r=2, capacity=3, name=name),
    "iapt": lambda m, name: minipeft.add_iapt(m, num_prompts=3 if name == "fox" else 2, r=4,
                                              instruction_tokens=3 if name == "fox" else 2, name=name),
}
ROWS = ["fox", "code", None, "code"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    write_hf_checkpoint(path, attention_bias=True)
    return path


def two_adapters(base, first, second=None, seed=0):
    """A model with adapters "fox" (method `first`) and "code" (method `second`), both trained-looking."""
    model = load_model(base)
    for name, method in (("fox", first), ("code", second or first)):
        torch.manual_seed(seed)
        ADD[method](model, name)
        seed += 1
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def alone(base, directory, name):
    """A fresh model with only adapter `name`, from the saved files (None: the bare base)."""
    model = load_model(base)
    if name is not None:
        load_adapter(model, directory if name == "default" else directory / name)
    return model


def batch():
    """Four left-padded rows of different lengths."""
    lengths = [7, 4, 6, 7]
    ids = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(4, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, 7 - n:] = 1
    return ids, mask, lengths


@pytest.mark.parametrize("first, second", [(m, m) for m in ADD] + [("prompt", "lora"), ("prefix", "ia3"),
                                                                    ("ln_tuning", "bitfit"), ("p_tuning", "lora"),
                                                                    ("bottleneck", "prompt"), ("lopt", "prompt"),
                                                                    ("iapt", "prompt"), ("prompt", "iapt")])
def test_each_row_gets_what_it_gets_alone(base, tmp_path, first, second):
    model = two_adapters(base, first, second)
    save_adapter(model, tmp_path)
    ids, mask, lengths = batch()
    set_adapter(model, ROWS)
    with torch.no_grad():
        mixed = model(ids, mask)  # (4, prepended + 7, vocab)
        for row, (name, n) in enumerate(zip(ROWS, lengths)):
            single = alone(base, tmp_path, name)
            expected = single(ids[row:row + 1, 7 - n:])[0, -n:]
            assert_close(mixed[row, -n:], expected, rtol=0, atol=1e-5, msg=f"row {row} ({name})")
    prompts = [ids[row, 7 - n:].tolist() for row, n in enumerate(lengths)]
    generated = minipeft.generate(model, prompts, max_new_tokens=5, eos_id=-1)
    for row, name in enumerate(ROWS):
        assert generated[row] == minipeft.generate(alone(base, tmp_path, name), [prompts[row]], 5, eos_id=-1)[0]


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "vera", "prefix", "prompt", "iapt"])
def test_training_gradients_are_the_per_row_gradients_summed(base, tmp_path, method):
    """Right-padded, as train/batches.py pads (a left pad's last position would be scored on the first token)."""
    ids, mask, lengths = batch()
    ids = torch.stack([r.roll(n) for r, n in zip(ids, lengths)])
    mask = torch.stack([r.roll(n) for r, n in zip(mask, lengths)])
    labels = ids.masked_fill(mask == 0, -100)
    model = two_adapters(base, method)
    fingerprint = minipeft.base_fingerprint(model)
    set_adapter(model, ROWS)
    model.loss(ids, labels, mask, reduction="sum").backward()
    mixed = {name: p.grad.clone() for name, p in adapter_parameters(model).items()}
    for name, p in adapter_parameters(model).items():
        p.grad = None
    for row, name in enumerate(ROWS):
        if name is None:  # the bare base's row trains nothing
            continue
        set_adapter(model, name)
        n = lengths[row]
        model.loss(ids[row:row + 1, :n], labels[row:row + 1, :n], reduction="sum").backward()
    for name, p in adapter_parameters(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(mixed[name], p.grad, rtol=0, atol=1e-5, msg=name)
    assert minipeft.base_fingerprint(model) == fingerprint


@pytest.mark.parametrize("first, second", [("iapt", "lora"), ("prompt", "iapt")])
def test_the_loss_skips_only_the_tokens_that_each_rows_own_adapter_reads(base, tmp_path, first, second):
    """IAPT's loss scores none of the instruction its generators read, in its own rows: the other adapters' rows
    (and the bare base's) keep every token's loss, as each row's loss alone says."""
    ids, mask, lengths = batch()
    ids = torch.stack([r.roll(n) for r, n in zip(ids, lengths)])
    mask = torch.stack([r.roll(n) for r, n in zip(mask, lengths)])
    labels = ids.masked_fill(mask == 0, -100)
    model = two_adapters(base, first, second)
    save_adapter(model, tmp_path)
    set_adapter(model, ROWS)
    with torch.no_grad():
        mixed = model.loss(ids, labels, mask, reduction="sum")
        expected = sum(alone(base, tmp_path, name).loss(ids[row:row + 1, :n], labels[row:row + 1, :n],
                                                        reduction="sum")
                       for row, (name, n) in enumerate(zip(ROWS, lengths)))
    assert_close(mixed, expected, rtol=0, atol=1e-4)


def test_only_the_adapters_in_use_train(base):
    model = two_adapters(base, "lora")
    trainable = lambda: {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in adapter_parameters(model).items() if p.requires_grad} and trainable() == {"lora_A", "lora_B"}
    set_adapter(model, "code")
    in_use = {n for n, p in adapter_parameters(model).items() if p.requires_grad}
    assert in_use and all(model.get_submodule(n.rsplit(".", 2)[0]).adapter_name == "code" for n in in_use)
    set_adapter(model, None)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(BadInput, match="no adapter named 'tea'"):
        set_adapter(model, ["fox", "tea"])


def test_the_base_runs_once_and_each_adapter_over_its_rows(base):
    model = two_adapters(base, "lora")
    q_proj = model.model.layers[0].self_attn.q_proj  # code's LoRA around fox's LoRA around the frozen linear
    seen = []
    for label, module in (("base", q_proj.base_layer.base_layer), ("fox", q_proj.base_layer.lora_A),
                          ("code", q_proj.lora_A)):
        module.register_forward_hook(lambda m, inputs, out, label=label: seen.append((label, inputs[0].shape[0])))
    set_adapter(model, ROWS)
    ids, mask, _ = batch()
    with torch.no_grad():
        model(ids, mask)
    assert seen == [("base", 4), ("fox", 1), ("code", 2)]


def test_an_adapter_added_after_every_other_was_deleted_is_active(base):
    """As the first one added is: it changes the output and trains. A base set to run bare (set_adapter(None))
    with other adapters on stays bare."""
    model = load_model(base)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        bare = model(ids)
    minipeft.add_prompt_tuning(model, num_prompts=2, name="first")
    minipeft.delete_adapter(model, "first")
    minipeft.add_prompt_tuning(model, num_prompts=2, name="second")
    assert model.active_adapter == "second"
    assert all(p.requires_grad for p in adapter_parameters(model).values())
    with torch.no_grad():
        assert model(ids).shape[1] == bare.shape[1] + 2
    set_adapter(model, None)
    minipeft.add_lora(model, ["q"], r=2, name="third")
    assert model.active_adapter is None


def test_lora_mixed_batch_equals_peft_adapter_names(base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = two_adapters(base, "lora")
    minipeft.delete_adapter(model, "fox")
    minipeft.add_lora(model, ["q", "v", "down"], r=4)  # a "default" adapter, as peft's first one is
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.add_(0.1)
    save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path)
    theirs.load_adapter(tmp_path / "code", adapter_name="code")
    ids, mask, _ = batch()
    rows = ["default", "code", None, "code"]
    set_adapter(model, rows)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask,
                          adapter_names=[r or "__base__" for r in rows]).logits
        ours = model(ids, mask)
    real = mask.bool()
    assert_close(ours[real], expected[real], rtol=0, atol=1e-5)


def test_peft_multi_adapter_files_load_here(base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    theirs = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.add_adapter("code", LoraConfig(r=2, target_modules=["v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "code" / "adapter_config.json").is_file()
    ours = load_model(base)
    load_adapter(ours, tmp_path)
    load_adapter(ours, tmp_path / "code", name="code")
    assert minipeft.adapter_names(ours) == ["default", "code"]
    ids = torch.randint(0, 256, (2, 6))
    for name in ("default", "code"):
        theirs.set_adapter(name)
        set_adapter(ours, name)
        with torch.no_grad():
            assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5, msg=name)


def test_deleting_every_adapter_gives_back_the_bare_base(base):
    model, bare = two_adapters(base, "prompt", "bottleneck"), load_model(base)
    minipeft.add_lora(model, ["q"], name="third")
    for name in ("code", "fox", "third"):
        minipeft.delete_adapter(model, name)
    assert model.state_dict().keys() == bare.state_dict().keys() and minipeft.adapter_names(model) == []
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert_close(model(ids), bare(ids), rtol=0, atol=0)
