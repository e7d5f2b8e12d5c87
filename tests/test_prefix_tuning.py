"""Prefix tuning against peft's PREFIX_TUNING on transformers' Llama (grouped-query heads): logits, gradients,
the reparameterisation MLP, generation, and the adapter file both ways."""

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import add_prefix_tuning, load_adapter, load_model, save_adapter
from tests.helpers import write_hf_checkpoint


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base", kv_heads=2)
    return load_model(tmp_path / "base"), reference, tmp_path


def peft_prefix(reference, projection_hidden=None):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=bool(projection_hidden),
                                encoder_hidden_size=projection_hidden)
    torch.manual_seed(1)
    theirs = get_peft_model(reference, config)
    with torch.no_grad():  # trained-looking values everywhere (a zero bias would hide a missing one)
        for p in theirs.prompt_encoder.default.parameters():
            p.normal_(0, 0.3)
    return theirs


def test_file_from_peft_gives_its_logits_and_gradients(pair):
    ours, reference, tmp_path = pair
    theirs = peft_prefix(reference)
    theirs.save_pretrained(tmp_path / "adapter")
    load_adapter(ours, tmp_path / "adapter")
    past = ours.model.learned_past
    assert past.embedding.weight.shape == (3, 2 * 2 * 2 * 16)  # P x (layers x 2 x KV heads x head_dim)
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    their_grad = theirs.prompt_encoder.default.embedding.weight.grad
    assert their_grad.abs().sum() > 0
    assert_close(past.embedding.weight.grad, their_grad, rtol=0, atol=1e-5)


def test_projection_mlp_equals_peft_and_its_output_is_what_is_saved(pair):
    ours, reference, tmp_path = pair
    theirs = peft_prefix(reference, projection_hidden=10)
    past = add_prefix_tuning(ours, num_prompts=3, projection_hidden=10, init="random")
    past.load_state_dict(theirs.prompt_encoder.default.state_dict())  # embedding, transform.0, transform.2
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    for name, parameter in theirs.prompt_encoder.default.named_parameters():
        assert_close(past.get_parameter(name).grad, parameter.grad, rtol=0, atol=1e-5, msg=name)
    # peft saves the MLP's output; loading it (here and in peft) gives the same model
    theirs.save_pretrained(tmp_path / "theirs")
    save_adapter(ours, tmp_path / "ours")
    for directory in ("theirs", "ours"):
        loaded = load_model(tmp_path / "base")
        load_adapter(loaded, tmp_path / directory)
        with torch.no_grad():
            assert_close(loaded(ids), ours(ids), rtol=0, atol=1e-5)


def test_our_file_loads_in_peft(pair):
    from peft import PeftModel

    ours, reference, tmp_path = pair
    past = add_prefix_tuning(ours, num_prompts=5, init="random", seed=3)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (3, 8))
    with torch.no_grad():
        assert past.embedding.weight.abs().sum() > 0
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_cached_generation_equals_peft_greedy_and_a_padded_batch_its_rows(pair):
    """peft's own generate() drops the prefix under transformers 5 ("Both `past_key_values` and `cache` are
    set ... ignoring"), so the reference is greedy decoding through peft's forward, all positions each step."""
    ours, reference, tmp_path = pair
    theirs = peft_prefix(reference)
    theirs.save_pretrained(tmp_path / "adapter")
    load_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(3, 256, (2, 6))
    sequence = ids
    with torch.no_grad():
        for _ in range(8):
            next_ids = theirs(input_ids=sequence).logits[:, -1].argmax(-1)
            sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
    assert minipeft.generate(ours, ids.tolist(), max_new_tokens=8, eos_id=-1) == sequence[:, 6:].tolist()
    prompts = [ids[0].tolist(), ids[1, :3].tolist()]  # left-padded together: each as if alone
    together = minipeft.generate(ours, prompts, max_new_tokens=8, eos_id=-1)
    assert together == [minipeft.generate(ours, [p], max_new_tokens=8, eos_id=-1)[0] for p in prompts]


def test_vocab_init_is_the_models_own_keys_and_values(pair):
    """init="vocab": the prefix starts as the keys and values the model makes for real tokens."""
    ours, _, _ = pair
    past = add_prefix_tuning(ours, num_prompts=4, init="vocab", seed=0)
    ids = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(0))
    cache = minipeft.KVCache(ours.config.num_hidden_layers)
    with minipeft.disabled(ours), torch.no_grad():
        ours.model(ids[None], cache=cache)
    keys, values = past(1)
    assert past.embedding.weight.abs().sum() > 0
    for layer in range(ours.config.num_hidden_layers):
        assert_close(keys[layer], cache.keys[layer], rtol=0, atol=0)
        assert_close(values[layer], cache.values[layer], rtol=0, atol=0)


@pytest.mark.parametrize("add", [lambda m: add_prefix_tuning(m, 3, seed=0),
                                 lambda m: minipeft.add_iapt(m, num_prompts=2, r=4, instruction_tokens=2, seed=0)],
                         ids=["prefix", "iapt"])
def test_a_seeded_start_leaves_the_global_generator_as_it_was(tmp_path, add):
    """The start is the seed's, and the caller's random numbers go on as if nothing had drawn from them."""
    write_hf_checkpoint(tmp_path)
    draws, starts = [], []
    for caller_seed in (1, 2):
        model = load_model(tmp_path)
        torch.manual_seed(caller_seed)
        expected = torch.rand(3, generator=torch.Generator().manual_seed(caller_seed))
        add(model)
        draws.append((torch.rand(3), expected))
        starts.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    assert all(torch.equal(drawn, expected) for drawn, expected in draws)  # as if add() had drawn nothing
    assert torch.equal(starts[0], starts[1])  # the same seed, the same start
