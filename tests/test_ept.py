"""EPT, which no library implements, against the parts its paper names, written out here step by step: DePT's
decomposition (the text's embeddings updated by A B, position by position, none from position s on), prompt
fusion, multi-space projection and the gating network, in front of the tokens of transformers' own Llama. A case
small enough to check by hand; gradients equal autograd through the written-out model and a finite difference;
with B and every Up_k zero it is prompt tuning with the short prompt; cached generation equals recomputing the
whole sequence; its start; its file round-trips, and a file of the first EPT is refused by its key."""

import json
import math

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import BadInput, add_ept, add_prompt_tuning, load_adapter, load_model, save_adapter
from minipeft.methods.counting import count_parameters
from minipeft.methods.ept import LowRankTextUpdate
from minipeft.tools.methods_table import SHAPES
from minipeft.llama.loader import build_model
from tests.helpers import write_hf_checkpoint

NAMES = ("short_prompt", "knowledge_A", "knowledge_B", "space_down", "space_up", "space_gate")


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base")
    return load_model(tmp_path / "base"), reference.float().eval(), tmp_path


def tensors(model):
    update = model.model.text_offsets
    prompts = model.model.embed_tokens
    return [prompts.short_prompt, update.knowledge_A, update.knowledge_B, prompts.space_down, prompts.space_up,
            prompts.space_gate]


def prompt_from_the_equations(P, A, B, down, up, gate):
    """P' (m, D): prompt fusion, then each subspace's projection weighted by the gate, one subspace at a time."""
    D = P.shape[1]
    K = A @ B  # (s, D): the low-rank knowledge
    weights = torch.exp(P @ K.T / math.sqrt(D))
    F = P + (weights / weights.sum(dim=1, keepdim=True)) @ K  # fusion: P attends over the rows of A B
    scores = torch.exp(F @ gate)
    g = scores / scores.sum(dim=1, keepdim=True)  # the gating network: (m, S)
    out = F.clone()
    for k in range(down.shape[0]):
        out = out + g[:, k:k + 1] * (F @ down[k] @ up[k])
    return out


def text_from_the_equations(E, A, B):
    """E' = E + A B, row t of A B on text position t, for t < s (DePT)."""
    out = E.clone()
    for t in range(min(E.shape[1], A.shape[0])):
        out[:, t] = out[:, t] + A[t] @ B
    return out


def written_out(reference, params, ids, labels=None):
    P, A, B = params[:3]
    prompt = prompt_from_the_equations(*params)
    text = text_from_the_equations(reference.get_input_embeddings()(ids), A, B)
    inputs = torch.cat([prompt.expand(len(ids), -1, -1), text], dim=1)
    if labels is not None:
        labels = torch.cat([torch.full((len(ids), len(P)), -100), labels], dim=1)
    return reference(inputs_embeds=inputs, labels=labels)


def trained_looking(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors(model):
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_a_case_small_enough_to_check_by_hand():
    """s = 2, r = 1, D = 2: A = (1, 2)^T, B = (1, -1), so A B = ((1, -1), (2, -2)). Text positions 0, 1, 2 get
    (1, -1), (2, -2) and nothing. Fusion of P = (1, 0): scores (1, 2) / sqrt(2), weights w = softmax = (0.3302,
    0.6698), F = P + w A B = (1 + 1.6698, -1.6698)."""
    update = LowRankTextUpdate(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, -1.0]]))
    assert update.offsets(torch.tensor([[0, 1, 2]])).tolist() == [[[1.0, -1.0], [2.0, -2.0], [0.0, 0.0]]]
    P = torch.tensor([[1.0, 0.0]])
    no_spaces = torch.zeros(1, 2, 1), torch.zeros(1, 1, 2), torch.zeros(2, 1)
    F = prompt_from_the_equations(P, update.knowledge_A, update.knowledge_B, *no_spaces)
    assert_close(F, torch.tensor([[2.6698, -1.6698]]), rtol=0, atol=1e-4)


def test_logits_and_loss_equal_the_paper_written_out(pair):
    ours, reference, _ = pair
    add_ept(ours, num_prompts=3, max_length=6, r=2, spaces=3)
    trained_looking(ours)
    for T in (5, 9):  # within s, and past it (positions 6, 7, 8 get no update)
        ids = torch.randint(3, 256, (2, T))
        with torch.no_grad():
            expected = written_out(reference, [p.detach() for p in tensors(ours)], ids, labels=ids)
            assert_close(ours(ids), expected.logits, rtol=0, atol=1e-5)  # (B, m + T, vocab)
            assert_close(ours.loss(ids, ids), expected.loss, rtol=0, atol=1e-5)


def test_gradients_equal_autograd_through_the_equations_and_a_finite_difference(pair):
    ours, reference, _ = pair
    add_ept(ours, num_prompts=3, max_length=5, r=2, spaces=2)
    trained_looking(ours)
    ids = torch.randint(3, 256, (2, 7))
    ours.loss(ids, ids).backward()
    copies = [p.detach().clone().requires_grad_() for p in tensors(ours)]
    written_out(reference, copies, ids, labels=ids).loss.backward()
    for name, p, copy in zip(NAMES, tensors(ours), copies):
        assert_close(p.grad, copy.grad, rtol=1e-4, atol=1e-6), name
        assert copy.grad.abs().sum() > 0, name
    A = tensors(ours)[1]
    direction = torch.randn(A.shape, generator=torch.Generator().manual_seed(1))  # along A: text and fusion both
    with torch.no_grad():
        step = 1e-2
        A.add_(step * direction)
        plus = ours.loss(ids, ids).double()
        A.sub_(2 * step * direction)
        minus = ours.loss(ids, ids).double()
    finite = (plus - minus) / (2 * step)
    assert finite.item() == pytest.approx((copies[1].grad.double() * direction).sum().item(), rel=2e-2, abs=1e-5)


def test_with_b_and_the_projections_zero_it_is_prompt_tuning_with_the_short_prompt(pair):
    ours, _, path = pair
    twin = load_model(path / "base")
    prompts = add_prompt_tuning(twin, num_prompts=4, init="random").learned_prompts
    add_ept(ours, num_prompts=4, max_length=6, r=3, spaces=2)
    trained_looking(ours)
    P, _, B, _, up, _ = tensors(ours)
    with torch.no_grad():
        P.copy_(prompts)
        B.zero_()
        up.zero_()
        ids = torch.randint(3, 256, (2, 9))
        assert_close(ours(ids), twin(ids), rtol=0, atol=0)
    assert minipeft.generate(ours, [[5, 6, 7]], 6) == minipeft.generate(twin, [[5, 6, 7]], 6)


def test_cached_generation_equals_recomputing_the_whole_sequence(pair):
    """Each new token's position goes on from the prompt's (left padding not counted), so a generated token at
    position t < s gets row t of A B, as when the whole sequence is run again."""
    ours, _, _ = pair
    add_ept(ours, num_prompts=2, max_length=8, r=2, spaces=2)
    trained_looking(ours)
    with torch.no_grad():
        tensors(ours)[2].mul_(30)  # A B large enough to change which token is greedy
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    generated = minipeft.generate(ours, prompts, max_new_tokens=6, eos_id=-1)
    for prompt, new in zip(prompts, generated):
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                sequence.append(int(ours(torch.tensor([sequence]))[0, -1].argmax()))
        assert new == sequence[len(prompt):]


def test_the_start_is_vocabulary_rows_and_prompt_tuning(pair):
    ours, _, _ = pair
    add_ept(ours, num_prompts=3, max_length=6, r=2, spaces=2, seed=4)
    P, A, B, _, up, gate = tensors(ours)
    vocabulary = ours.model.embed_tokens.word_embeddings.weight
    for row in P:
        assert (vocabulary == row).all(dim=1).any()  # each short-prompt vector is a vocabulary row
    assert torch.all(B == 0) and torch.all(up == 0) and torch.all(gate == 0) and A.abs().sum() > 0


def test_file_round_trips_and_refuses_the_first_epts_files(pair, tmp_path):
    ours, _, path = pair
    add_ept(ours, num_prompts=3, max_length=5, r=2, spaces=2)
    trained_looking(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert [config[k] for k in ("peft_type", "num_virtual_tokens", "max_length", "r", "num_spaces")] == \
        ["EPT", 3, 5, 2, 2]
    again = load_model(path / "base")
    load_adapter(again, tmp_path / "adapter")
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    first = {key: value for key, value in config.items() if key != "max_length"}
    for changed, needle in (({**config, "r": 9}, r"'r' should be int in \[1, 5\], got 9"),
                            ({**config, "dropout": 0.1}, "key 'dropout' is 0.1; minipeft does not know this key"),
                            ({**first, "num_knowledge_rows": 16}, "'num_knowledge_rows' marks a file of minipeft's "
                                                                  "first EPT")):
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(changed))
        with pytest.raises(BadInput, match=needle):
            load_adapter(load_model(path / "base"), tmp_path / "adapter")
    with pytest.raises(BadInput, match="spaces: expected a positive integer"):
        add_ept(load_model(path / "base"), spaces=0)


def test_counts_at_llama_7b():
    model = build_model(SHAPES["Llama-7B"])
    add_ept(model, num_prompts=8, max_length=256, r=4, spaces=3)
    D = 4096  # P, A, B, Down_k and Up_k, W_gate
    assert count_parameters(model)["trainable_params"] == 8 * D + 256 * 4 + 4 * D + 3 * 2 * D * 4 + D * 3
