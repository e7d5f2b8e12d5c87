"""BitFit against two references: peft's BEFT (same bias, key beft_bias, norms through modules_to_save), and
transformers' Llama with attention_bias / mlp_bias, into which the learned biases are written."""

import torch
from torch.testing import assert_close

from minipeft import add_bitfit, load_adapter, load_model, save_adapter
from minipeft.methods.freezing import adapter_parameters
from tests.helpers import write_hf_checkpoint


def randomize(parameters, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


def test_peft_beft_file_gives_its_logits_and_gradients(tmp_path):
    from peft import BeftConfig, get_peft_model

    reference = write_hf_checkpoint(tmp_path / "base")
    config = BeftConfig(task_type="CAUSAL_LM", target_modules=["v_proj", "down_proj"],
                        modules_to_save=["input_layernorm", "model.norm"])
    theirs = get_peft_model(reference, config)
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    trained = adapter_parameters(ours)
    assert len(trained) == 2 * 2 + 2 + 1  # v and down of 2 layers; 2 input norms and the final one
    ids = torch.randint(0, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    their_parameters = dict(theirs.named_parameters())
    for name, parameter in trained.items():
        their_name = (f"base_model.model.{name}.default" if name.endswith("beft_bias")
                      else f"base_model.model.{name.removesuffix('.weight')}.modules_to_save.default.weight")
        assert_close(parameter.grad, their_parameters[their_name].grad, rtol=0, atol=1e-5, msg=name)


def test_learned_biases_written_into_a_biased_llama_give_its_logits(tmp_path):
    from transformers import LlamaForCausalLM

    reference = write_hf_checkpoint(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    assert add_bitfit(ours, norms=True) == 2 * 7 + 2 * 2 + 1  # all seven linears and three norms
    randomize(adapter_parameters(ours).values())
    config = reference.config
    config.attention_bias = config.mlp_bias = True
    biased = LlamaForCausalLM(config).eval()
    state = dict(reference.state_dict())
    for name, parameter in adapter_parameters(ours).items():
        state[name.replace("beft_bias", "bias")] = parameter.detach().flatten()  # gains keep their names
    biased.load_state_dict(state, strict=True)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids), biased(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_our_file_loads_in_peft(tmp_path):
    from peft import PeftModel

    reference = write_hf_checkpoint(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    add_bitfit(ours, norms=True)
    randomize(adapter_parameters(ours).values())
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_a_trained_norm_gain_runs_the_norm_once(tmp_path, monkeypatch):
    """rms_norm(x) * g with the trained g, and the frozen norm (whose output would be thrown away) not run."""
    from minipeft.llama.model import RMSNorm

    write_hf_checkpoint(tmp_path)
    model = load_model(tmp_path)
    add_bitfit(model, ["v"], norms=True)
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.mul_(1.5)
    x = torch.randn(2, 3, norm.weight.shape[0])
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.base_norm.eps) * norm.weight
    calls = []
    original = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: calls.append(self) or original(self, x))
    with torch.no_grad():
        assert_close(norm(x), expected, rtol=0, atol=1e-6)
    assert len(calls) == 1  # the norm's code once, with the trained gain in place of the frozen one
