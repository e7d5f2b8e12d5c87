"""minipeft.compile_blocks (`--compile`): compiled blocks give the eager code's loss and gradients (LoRA on the
4-bit base under checkpointing; prefix tuning, whose learned past is read through the fixed KV cache), and
generation, which stays eager, the same tokens. A counter shows the compiler really ran."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.testing import assert_close

import minipeft
from minipeft.methods.freezing import adapter_parameters
from tests.helpers import write_hf_checkpoint

METHODS = {
    "qlora": (lambda m: minipeft.add_lora(m, ["q_proj", "v_proj", "down_proj"], r=4), "nf4"),
    "prefix": (lambda m: minipeft.add_prefix_tuning(m, num_prompts=3), None),
}


def loss_and_gradients(model, ids, mask):
    loss = model.loss(ids, ids.masked_fill(~mask, -100), attention_mask=mask)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in adapter_parameters(model).items()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("method", METHODS)
def test_compiled_blocks_agree_with_eager(tmp_path, method):
    add, quantize = METHODS[method]
    write_hf_checkpoint(tmp_path)
    model = minipeft.load_model(tmp_path, quantize=quantize)
    torch.manual_seed(0)
    add(model)
    with torch.no_grad():  # LoRA's B starts at zero: move it, so that every gradient is non-trivial
        for p in adapter_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    minipeft.enable_checkpointing(model)
    ids = torch.randint(3, 256, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 8:] = False  # a padded row: the mask goes through the compiled graph too
    eager_loss, eager_grads = loss_and_gradients(model, ids, mask)
    eager_tokens = minipeft.generate(model, [[5, 6, 7], [9]], max_new_tokens=6)

    graphs = counters["stats"]["unique_graphs"]
    minipeft.compile_blocks(model)
    for _ in range(2):  # the first call compiles; the second runs what was compiled
        compiled_loss, compiled_grads = loss_and_gradients(model, ids, mask)
        assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == eager_grads.keys()
        for name in eager_grads:
            assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiler did run
    assert minipeft.generate(model, [[5, 6, 7], [9]], max_new_tokens=6) == eager_tokens
    minipeft.compile_blocks(model, enabled=False)
    assert model.model.compiled is None


def test_without_a_cpp_compiler_compile_is_refused_in_one_line(tmp_path, monkeypatch):
    write_hf_checkpoint(tmp_path)
    model = minipeft.load_model(tmp_path)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(minipeft.BadInput, match=r"^--compile: torch.compile builds C\+\+ on CPU, and no compiler"):
        minipeft.compile_blocks(model)
    assert model.model.compiled is None
    minipeft.compile_blocks(model, enabled=False)  # nothing to build: nothing to say
