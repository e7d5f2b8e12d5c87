"""EPT, which no library implements: its output equals its three equations (prompt fusion, multi-space projection,
gating) written out here step by step and put in front of the tokens of transformers' own Llama; its gradients
equal autograd through that written-out model and a finite difference; with the low-rank prompt and every
projection zero it is prompt tuning; its start is the vocabulary's; its file round-trips."""

import json

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import BadInput, add_ept, add_prompt_tuning, load_adapter, load_model, save_adapter
from minipeft.methods.counting import count_parameters
from minipeft.methods.table import SHAPES
from minipeft.llama.loader import build_model
from tests.helpers import write_hf_checkpoint

NAMES = ("short_prompt", "knowledge_A", "knowledge_B", "space_down", "space_up", "space_gate")


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base")
    return load_model(tmp_path / "base"), reference.float().eval(), tmp_path


def equations(P, A, B, down, up, gate):
    """EPT's prompt, one equation a line, one subspace at a time."""
    D = P.shape[1]
    K = A @ B  # (n, D)
    weights = torch.exp(P @ K.T / D ** 0.5)
    F = P + (weights / weights.sum(dim=1, keepdim=True)) @ K  # fusion: attention of P over K
    scores = torch.exp(F @ gate)
    g = scores / scores.sum(dim=1, keepdim=True)  # (m, S)
    E = F.clone()
    for s in range(down.shape[0]):
        E = E + g[:, s:s + 1] * (F @ down[s] @ up[s])
    return E


def written_out(reference, tensors, ids, labels=None):
    E = equations(*tensors)
    inputs = torch.cat([E.expand(len(ids), -1, -1), reference.get_input_embeddings()(ids)], dim=1)
    if labels is not None:
        labels = torch.cat([torch.full((len(ids), len(E)), -100), labels], dim=1)
    return reference(inputs_embeds=inputs, labels=labels)


def trained_looking(wrapper, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in NAMES:
            p = wrapper.get_parameter(name)
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_logits_and_loss_equal_the_equations_written_out(pair):
    ours, reference, _ = pair
    wrapper = add_ept(ours, num_prompts=3, knowledge_rows=6, r=2, spaces=3)
    trained_looking(wrapper)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        expected = written_out(reference, [wrapper.get_parameter(n) for n in NAMES], ids, labels=ids)
        assert_close(ours(ids), expected.logits, rtol=0, atol=1e-5)  # (B, m + T, vocab)
        assert_close(ours.loss(ids, ids), expected.loss, rtol=0, atol=1e-5)


def test_gradients_equal_autograd_through_the_equations_and_a_finite_difference(pair):
    ours, reference, _ = pair
    wrapper = add_ept(ours, num_prompts=3, knowledge_rows=5, r=2, spaces=2)
    trained_looking(wrapper)
    ids = torch.randint(3, 256, (2, 7))
    ours.loss(ids, ids).backward()
    copies = [wrapper.get_parameter(n).detach().clone().requires_grad_() for n in NAMES]
    written_out(reference, copies, ids, labels=ids).loss.backward()
    for name, copy in zip(NAMES, copies):
        assert_close(wrapper.get_parameter(name).grad, copy.grad, rtol=1e-4, atol=1e-6), name
        assert copy.grad.abs().sum() > 0, name
    direction = torch.randn(copies[0].shape, generator=torch.Generator().manual_seed(1))  # along P
    with torch.no_grad():
        step = 1e-2
        wrapper.short_prompt.add_(step * direction)
        plus = ours.loss(ids, ids).double()
        wrapper.short_prompt.sub_(2 * step * direction)
        minus = ours.loss(ids, ids).double()
    finite = (plus - minus) / (2 * step)
    assert finite.item() == pytest.approx((copies[0].grad.double() * direction).sum().item(), rel=2e-2, abs=1e-5)


def test_with_the_low_rank_prompt_and_projections_zero_it_is_prompt_tuning(pair):
    ours, _, path = pair
    twin = load_model(path / "base")
    prompts = add_prompt_tuning(twin, num_prompts=4, init="random").learned_prompts
    wrapper = add_ept(ours, num_prompts=4, knowledge_rows=6, r=3, spaces=2)
    trained_looking(wrapper)
    with torch.no_grad():
        wrapper.short_prompt.copy_(prompts)
        wrapper.knowledge_B.zero_()
        wrapper.space_up.zero_()
        ids = torch.randint(3, 256, (2, 9))
        assert_close(ours(ids), twin(ids), rtol=0, atol=0)
    assert minipeft.generate(ours, [[5, 6, 7]], 6) == minipeft.generate(twin, [[5, 6, 7]], 6)


def test_the_start_is_vocabulary_rows_and_adds_nothing_from_the_spaces(pair):
    ours, _, _ = pair
    wrapper = add_ept(ours, num_prompts=3, knowledge_rows=6, r=2, spaces=2, seed=4)
    vocabulary = ours.model.embed_tokens.word_embeddings.weight
    for row in wrapper.short_prompt:
        assert (vocabulary == row).all(dim=1).any()  # each short-prompt vector is a vocabulary row
    assert torch.all(wrapper.space_up == 0) and torch.all(wrapper.space_gate == 0)
    assert torch.linalg.matrix_rank(wrapper.knowledge_A @ wrapper.knowledge_B) == 2


def test_file_round_trips_names_its_format_and_refuses_what_it_cannot_honour(pair, tmp_path):
    ours, _, path = pair
    wrapper = add_ept(ours, num_prompts=3, knowledge_rows=5, r=2, spaces=2)
    trained_looking(wrapper)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert [config[k] for k in ("peft_type", "num_virtual_tokens", "num_knowledge_rows", "r", "num_spaces")] == \
        ["EPT", 3, 5, 2, 2]
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
    with pytest.raises(BadInput, match="spaces: expected a positive integer"):
        add_ept(load_model(path / "base"), spaces=0)


def test_counts_at_llama_7b():
    model = build_model(SHAPES["Llama-7B"])
    add_ept(model, num_prompts=8, knowledge_rows=16, r=4, spaces=3)
    D = 4096  # P, A, B, Down_s and Up_s, W_gate
    assert count_parameters(model)["trainable_params"] == 8 * D + 16 * 4 + 4 * D + 3 * 2 * D * 4 + D * 3
