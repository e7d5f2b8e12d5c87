"""Hand-written gradient checkpointing gives the same gradients as keeping every activation."""

import torch
from torch.testing import assert_close

import minipeft
from minipeft import add_lora, add_prompt_tuning, enable_checkpointing, load_model
from tests.helpers import write_hf_checkpoint


def gradients(weights_dir, wrap, checkpointing, quantize=None):
    torch.manual_seed(0)  # the same adapters and dropout masks in both runs, if the recompute replays them
    model = load_model(weights_dir, quantize=quantize).train()
    wrap(model)
    enable_checkpointing(model, checkpointing)
    ids = torch.randint(0, 256, (2, 10))
    loss = model.loss(ids, ids)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(weights_dir, wrap, quantize=None):
    plain_loss, plain = gradients(weights_dir, wrap, False, quantize)
    ckpt_loss, ckpt = gradients(weights_dir, wrap, True, quantize)
    assert plain.keys() == ckpt.keys() and plain
    assert plain_loss == ckpt_loss
    for name in plain:
        assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6)


def randomized_lora(model, **kwargs):
    add_lora(model, ["q", "k", "v", "o", "gate", "up", "down"], r=4, **kwargs)
    with torch.no_grad():
        for layer in minipeft.methods.lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)


def test_lora_only_on_frozen_embedding(tmp_path):
    """No input of any block requires grad: the case where other stacks raise
    "element 0 of tensors does not require grad"."""
    write_hf_checkpoint(tmp_path)
    assert_same(tmp_path, randomized_lora)


def test_lora_with_dropout_replays_the_masks(tmp_path):
    write_hf_checkpoint(tmp_path)
    assert_same(tmp_path, lambda m: randomized_lora(m, dropout=0.3))


def test_lora_on_4bit_base(tmp_path):
    write_hf_checkpoint(tmp_path)
    assert_same(tmp_path, randomized_lora, quantize="nf4")


def test_prompt_tuning(tmp_path):
    write_hf_checkpoint(tmp_path)
    assert_same(tmp_path, lambda m: add_prompt_tuning(m, num_prompts=4))


def test_prompts_and_lora_together(tmp_path):
    write_hf_checkpoint(tmp_path)
    assert_same(tmp_path, lambda m: (add_prompt_tuning(m, num_prompts=4), randomized_lora(m)))


def test_checkpointing_keeps_less_for_backward(tmp_path):
    """Saved-for-backward memory drops to about one (B, T, D) tensor per block."""
    write_hf_checkpoint(tmp_path)

    def saved_bytes(checkpointing):
        model = load_model(tmp_path)
        randomized_lora(model)
        enable_checkpointing(model, checkpointing)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.loss(torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64)))
        return total

    plain, checkpointed = saved_bytes(False), saved_bytes(True)
    print(f"saved for backward: plain {plain / 2**20:.1f} MiB, checkpointed {checkpointed / 2**20:.1f} MiB")
    assert checkpointed < plain / 3
