"""peft's methods on the real default checkpoint (30 layers, grouped-query heads, tied embeddings), each against
peft on transformers' Llama loading the same directory: logits and the gradient of every tensor the method trains.
The tiny-model tests of each method (tests/test_<method>.py) prove the rest: files, merge, config keys."""

import pytest
import torch
from torch.testing import assert_close

from minipeft import add_p_tuning, load_adapter, load_model
from minipeft.methods.freezing import adapter_parameters

LINEARS = ["q_proj", "v_proj", "o_proj", "up_proj"]
METHODS = {  # name: (peft config, our name of each trained tensor -> peft's)
    "loha": (lambda peft: peft.LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=LINEARS,
                                          init_weights=False),
             lambda ours: f"base_model.model.{ours}.default"),
    "lokr": (lambda peft: peft.LoKrConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=LINEARS,
                                          decompose_both=True, init_weights=False),
             lambda ours: f"base_model.model.{ours}.default"),
    "vera": (lambda peft: peft.VeraConfig(task_type="CAUSAL_LM", r=16, target_modules=LINEARS, projection_prng_key=5),
             lambda ours: f"base_model.model.{ours}.default"),
    "ln_tuning": (lambda peft: peft.LNTuningConfig(task_type="CAUSAL_LM"),
                  lambda ours: "base_model.model." + ours.replace(".weight", ".ln_tuning_layers.default.weight")),
    "p_tuning": (lambda peft: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                       encoder_hidden_size=32, encoder_reparameterization_type="LSTM"),
                 lambda ours: ours.replace("model.embed_tokens.encoder.", "prompt_encoder.default.")),
}


@pytest.mark.parametrize("method", METHODS)
def test_logits_and_every_trained_gradient_equal_peft(tmp_path, default_weights, method):
    import peft
    from transformers import AutoModelForCausalLM

    config, their_name = METHODS[method]
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(default_weights, dtype=torch.float32)
    theirs = peft.get_peft_model(reference, config(peft))
    with torch.no_grad():  # trained-looking: zero starts (LoHa's A2, VeRA's b) would hide bugs
        for p in (p for p in theirs.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn_like(p))
    ours = load_model(default_weights)
    if method == "p_tuning":  # the file holds the prompts only; the encoder is copied, tensor for tensor
        add_p_tuning(ours, num_prompts=5, encoder="LSTM", hidden=32)
        ours.model.embed_tokens.encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    else:
        theirs.save_pretrained(tmp_path / "adapter")
        load_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(1))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=2e-4)
    their_params = dict(theirs.named_parameters())
    trained = adapter_parameters(ours)
    assert trained and len(trained) == sum(p.requires_grad for p in theirs.parameters())
    for name, p in trained.items():
        assert_close(p.grad, their_params[their_name(name)].grad, rtol=1e-3, atol=1e-5, msg=name)
