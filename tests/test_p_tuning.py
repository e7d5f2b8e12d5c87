"""P-tuning against peft's P-tuning on transformers' Llama: the prompts its encoder makes (MLP and LSTM), the
logits and the gradients of every encoder tensor, the file both ways, every config key; and the MLP encoder's
formula written out."""

import json

import pytest
import torch
from torch.testing import assert_close

from minipeft import add_p_tuning, load_adapter, load_model, save_adapter
from minipeft.formats.peft import P_TUNING_KEYS
from minipeft.methods.prompt_tuning import WordEmbeddingsWithLearnedPrompts
from tests.helpers import write_hf_checkpoint
from tests.test_peft_configs import assert_each_set_key_refused, walk


def their_p_tuning(reference, **settings):
    from peft import PromptEncoderConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(reference, PromptEncoderConfig(task_type="CAUSAL_LM", **settings))


def copy_their_encoder(ours, theirs):
    """Our encoder given peft's tensors, name for name (peft's: embedding, lstm_head, mlp_head)."""
    wrapper = ours.model.embed_tokens
    their_state = theirs.prompt_encoder["default"].state_dict()
    wrapper.encoder.load_state_dict({k: v for k, v in their_state.items()}, strict=True)
    return wrapper


def test_the_mlp_encoder_makes_each_prompt_from_its_own_input(tmp_path):
    """h_i = W3 relu(W2 relu(W1 e_i + b1) + b2) + b3, prompt by prompt; the prompts go in front of the text."""
    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path)
    wrapper = add_p_tuning(model, num_prompts=3, hidden=8)
    (w1, b1), (w2, b2), (w3, b3) = ((m.weight, m.bias) for m in wrapper.encoder.mlp_head if hasattr(m, "weight"))
    relu = lambda v: v.clamp(min=0)
    for i, e in enumerate(wrapper.encoder.embedding.weight):
        assert_close(wrapper.prompts()[i], w3 @ relu(w2 @ relu(w1 @ e + b1) + b2) + b3, rtol=0, atol=1e-6)
    ids = torch.randint(0, 256, (2, 5))
    assert_close(wrapper(ids)[:, :3], wrapper.prompts().expand(2, -1, -1), rtol=0, atol=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * 64 + (64 * 8 + 8) + (
        8 * 8 + 8) + (8 * 64 + 64)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_logits_and_every_encoder_gradient_equal_peft(tmp_path, encoder):
    reference = write_hf_checkpoint(tmp_path / "base")
    theirs = their_p_tuning(reference, num_virtual_tokens=4, encoder_hidden_size=16,
                            encoder_reparameterization_type=encoder)
    ours = load_model(tmp_path / "base")
    add_p_tuning(ours, num_prompts=4, encoder=encoder, hidden=16)
    wrapper = copy_their_encoder(ours, theirs)
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    their_params = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, p in wrapper.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, their_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_file_holds_the_prompts_and_goes_both_ways_through_peft(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base")
    theirs = their_p_tuning(reference, num_virtual_tokens=4, encoder_hidden_size=16,
                            encoder_reparameterization_type="LSTM")
    theirs.save_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "theirs")  # their encoder's output, as prompts to use
    assert isinstance(ours.model.embed_tokens, WordEmbeddingsWithLearnedPrompts)
    with torch.no_grad():
        assert_close(ours(ids), expected, rtol=0, atol=1e-5)
    save_adapter(ours, tmp_path / "again")  # still a P-tuning file, its settings kept
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["encoder_reparameterization_type"] \
        == "LSTM"
    trained = load_model(tmp_path / "base")
    add_p_tuning(trained, num_prompts=4, encoder="LSTM", hidden=16)
    copy_their_encoder(trained, theirs)
    save_adapter(trained, tmp_path / "ours")
    again = PeftModel.from_pretrained(write_hf_checkpoint(tmp_path / "base2"), tmp_path / "ours")
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_every_p_tuning_config_key_is_accounted_for_and_refused_when_set(tmp_path):
    from peft import PromptEncoderConfig

    walk(PromptEncoderConfig, P_TUNING_KEYS)
    write_hf_checkpoint(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_p_tuning(model, num_prompts=2, hidden=8)
    save_adapter(model, tmp_path / "adapter")
    assert_each_set_key_refused(tmp_path / "adapter", tmp_path / "base", P_TUNING_KEYS, said="(is|should)",
                                more=[("encoder_reparameterization_type", "GRU"), ("token_dim", 32)])
