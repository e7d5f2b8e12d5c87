"""Prompt tuning against peft's PROMPT_TUNING model on the same checkpoint and the same prompt vectors."""

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import add_prompt_tuning, generate, load_adapter, load_model, save_adapter
from tests.helpers import train_steps, write_hf_checkpoint


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base", tied=True)
    return load_model(tmp_path / "base"), reference, tmp_path


def peft_prompt_model(reference, prompts):
    from peft import PromptTuningConfig, get_peft_model

    theirs = get_peft_model(reference, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(prompts)))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prompts)
    return theirs


def test_logits_and_loss_equal_peft(pair):
    ours, reference, _ = pair
    wrapper = add_prompt_tuning(ours, num_prompts=6, init="random")
    theirs = peft_prompt_model(reference, wrapper.learned_prompts.detach())
    ids = torch.randint(3, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding in the second row
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask)  # (B, P + T, vocab): prompt positions included
        their_out = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        ours_loss = ours.loss(ids, labels, attention_mask=mask)
    real = torch.cat([torch.ones(2, 6, dtype=torch.bool), mask.bool()], dim=1)
    diff = (ours_logits[real] - their_out.logits[real]).abs().max().item()
    print(f"prompt tuning vs peft: logits diff {diff:.2e}, loss diff {abs(ours_loss - their_out.loss):.2e}")
    assert_close(ours_logits[real], their_out.logits[real], rtol=0, atol=1e-5)
    assert_close(ours_loss, their_out.loss, rtol=0, atol=1e-5)


def test_generation_with_prompt_uses_cache_correctly(pair):
    """Cached decoding with learned prompts equals recomputing the whole sequence at every step."""
    ours, _, _ = pair
    add_prompt_tuning(ours, num_prompts=4, init="vocab")
    prompt = [5, 17, 99, 3]
    cached = generate(ours, [prompt, [8, 200]], max_new_tokens=8, eos_id=-1)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(ours(torch.tensor([ids]))[0, -1].argmax().item())
    assert cached[0] == ids[len(prompt):]


def test_generation_equals_peft_generate(pair):
    ours, reference, _ = pair
    wrapper = add_prompt_tuning(ours, num_prompts=4, init="random")
    theirs = peft_prompt_model(reference, wrapper.learned_prompts.detach())
    reference.generation_config.eos_token_id = None
    prompt = torch.tensor([[5, 17, 99, 3, 42]])
    their_ids = theirs.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
    assert generate(ours, [prompt[0].tolist()], max_new_tokens=8, eos_id=-1)[0] == their_ids[0, -8:].tolist()


def test_only_prompts_train_and_base_is_unchanged(pair):
    ours, _, _ = pair
    fingerprint = minipeft.base_fingerprint(ours)
    wrapper = add_prompt_tuning(ours, num_prompts=5, init="vocab")
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["model.embed_tokens.learned_prompts"]
    optimizer = torch.optim.Adam([wrapper.learned_prompts], lr=0.05)
    ids = torch.randint(3, 256, (1, 12))
    losses = train_steps(ours, optimizer, ids, 10)
    assert losses[-1] < losses[0]
    assert minipeft.base_fingerprint(ours) == fingerprint
    assert minipeft.count_parameters(ours)["trainable_params"] == 5 * 64


def test_text_init_uses_token_embeddings(pair):
    ours, _, _ = pair

    class Digits:  # a stand-in tokenizer: each character's code point is its id
        def encode(self, text, add_bos=False):
            return [ord(c) for c in text]

    wrapper = add_prompt_tuning(ours, num_prompts=5, init="text", init_text="ab", tokenizer=Digits())
    rows = ours.model.embed_tokens.weight[[97, 98, 97, 98, 97]]
    assert torch.equal(wrapper.learned_prompts, rows)


def test_adapter_round_trips_with_peft(pair):
    from peft import PeftModel

    ours, reference, tmp_path = pair
    add_prompt_tuning(ours, num_prompts=6, init="random")
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(reference, tmp_path / "ours")
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    again = load_model(tmp_path / "base")
    assert load_adapter(again, tmp_path / "theirs")["peft_type"] == "PROMPT_TUNING"
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_llama_7b_prompt_counts_on_meta():
    model = minipeft.build_model(minipeft.LlamaConfig())
    add_prompt_tuning(model, num_prompts=16)
    assert minipeft.count_parameters(model)["trainable_params"] == 65_536
