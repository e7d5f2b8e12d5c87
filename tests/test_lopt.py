"""LoPT (low-rank prompt tuning), which no library implements: its output equals the paper's equation written out
here, U V in front of the token embeddings, run through transformers' own Llama; its gradients equal autograd
through that written-out model and a finite difference; at full rank it is prompt tuning; its start is the
best rank-r approximation of prompt tuning's; its file round-trips."""

import json

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import BadInput, add_lopt, add_prompt_tuning, load_adapter, load_model, save_adapter
from minipeft.methods.counting import count_parameters
from minipeft.tools.methods_table import SHAPES
from minipeft.llama.loader import build_model
from tests.helpers import write_hf_checkpoint


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base")
    return load_model(tmp_path / "base"), reference.float().eval(), tmp_path


def written_out(reference, U, V, ids, labels=None):
    """The paper's LoPT-1, step by step: X = U V (P, D); [X; E(ids)] into the frozen decoder (transformers')."""
    X = U @ V  # (P, D)
    tokens = reference.get_input_embeddings()(ids)  # (B, T, D)
    inputs = torch.cat([X.expand(len(ids), -1, -1), tokens], dim=1)  # (B, P + T, D)
    if labels is not None:
        labels = torch.cat([torch.full((len(ids), len(X)), -100), labels], dim=1)  # prompts are never scored
    return reference(inputs_embeds=inputs, labels=labels)


def trained_looking(wrapper, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (wrapper.prompt_U, wrapper.prompt_V):
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_logits_and_loss_equal_the_equation_written_out(pair):
    ours, reference, _ = pair
    wrapper = add_lopt(ours, num_prompts=5, r=2)
    trained_looking(wrapper)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        expected = written_out(reference, wrapper.prompt_U, wrapper.prompt_V, ids, labels=ids)
        assert_close(ours(ids), expected.logits, rtol=0, atol=1e-5)  # (B, P + T, vocab)
        assert_close(ours.loss(ids, ids), expected.loss, rtol=0, atol=1e-5)


def test_gradients_equal_autograd_through_the_equation_and_a_finite_difference(pair):
    ours, reference, _ = pair
    wrapper = add_lopt(ours, num_prompts=4, r=3)
    trained_looking(wrapper)
    ids = torch.randint(3, 256, (2, 7))
    ours.loss(ids, ids).backward()
    U = wrapper.prompt_U.detach().clone().requires_grad_()
    V = wrapper.prompt_V.detach().clone().requires_grad_()
    written_out(reference, U, V, ids, labels=ids).loss.backward()
    assert_close(wrapper.prompt_U.grad, U.grad, rtol=1e-4, atol=1e-6)
    assert_close(wrapper.prompt_V.grad, V.grad, rtol=1e-4, atol=1e-6)
    direction = torch.randn(U.shape, generator=torch.Generator().manual_seed(1))  # d loss / d U along it
    with torch.no_grad():
        step = 1e-2
        wrapper.prompt_U.add_(step * direction)
        plus = ours.loss(ids, ids).double()
        wrapper.prompt_U.sub_(2 * step * direction)
        minus = ours.loss(ids, ids).double()
    finite = (plus - minus) / (2 * step)
    assert finite.item() == pytest.approx((U.grad.double() * direction).sum().item(), rel=2e-2, abs=1e-5)


def test_at_full_rank_it_is_prompt_tuning(pair, tmp_path):
    ours, _, path = pair
    twin = load_model(path / "base")
    prompts = add_prompt_tuning(twin, num_prompts=4, init="random").learned_prompts
    wrapper = add_lopt(ours, num_prompts=4, r=4)
    with torch.no_grad():  # U = I, V = the prompt matrix: U V is every 4 x D matrix at rank 4
        wrapper.prompt_U.copy_(torch.eye(4))
        wrapper.prompt_V.copy_(prompts)
        ids = torch.randint(3, 256, (2, 9))
        assert torch.equal(ours(ids), twin(ids))
    assert minipeft.generate(ours, [[5, 6, 7]], 6) == minipeft.generate(twin, [[5, 6, 7]], 6)


def test_the_start_is_the_best_low_rank_approximation_of_prompt_tunings(pair):
    ours, _, path = pair
    twin = load_model(path / "base")
    full = add_prompt_tuning(twin, num_prompts=6, init="vocab", seed=3).learned_prompts.detach()
    wrapper = add_lopt(ours, num_prompts=6, r=2, seed=3)
    start = (wrapper.prompt_U @ wrapper.prompt_V).detach()
    singular = torch.linalg.svdvals(full)
    assert torch.linalg.matrix_rank(start) == 2  # Eckart-Young: the error is the dropped singular values
    assert torch.linalg.norm(full - start).item() == pytest.approx(singular[2:].square().sum().sqrt().item(), rel=1e-4)
    assert_close(torch.linalg.norm(wrapper.prompt_U, dim=0), torch.linalg.norm(wrapper.prompt_V, dim=1))  # one scale


def test_file_round_trips_names_its_format_and_refuses_what_it_cannot_honour(pair, tmp_path):
    ours, _, path = pair
    wrapper = add_lopt(ours, num_prompts=5, r=2)
    trained_looking(wrapper)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["r"]) == ("LOPT", 5, 2)
    again = load_model(path / "base")
    load_adapter(again, tmp_path / "adapter")
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    for key, value, needle in (("r", 9, r"'r' should be int in \[1, 5\], got 9"),
                                ("dropout", 0.1, "key 'dropout' is 0.1; minipeft does not know this key")):
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(BadInput, match=needle):
            load_adapter(load_model(path / "base"), tmp_path / "adapter")
    with pytest.raises(BadInput, match="r: expected a rank from 1 to num_prompts"):
        add_lopt(load_model(path / "base"), num_prompts=3, r=4)


def test_counts_at_llama_7b_are_r_times_p_plus_d():
    model = build_model(SHAPES["Llama-7B"])
    add_lopt(model, num_prompts=16, r=4)
    assert count_parameters(model)["trainable_params"] == 4 * (16 + 4096) == 16448
