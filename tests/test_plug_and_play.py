"""Plug and Play prompts, which no library implements: the objective, L = L_style + lambda mean_t KL(p_t || q_t)
over the prompted generator's continuation (the greedy tokens, straight-through; or each the embedding expected
under p_t), written out here step by step on transformers' own Llama with a discriminator of the test's own;
its value on left-padded rows equals each row's alone; its gradient equals autograd through the written-out
objective, and, for the expected embeddings (a function whose derivative the gradient is), a finite
difference; the prompts are prompt tuning's, and so is their file."""

import json

import pytest
import torch
from torch.testing import assert_close

from minipeft import BadInput, load_model, save_adapter
from minipeft.methods.plug_and_play import Steering, add_plug_and_play, plug_and_play_loss, write
from tests.helpers import write_hf_checkpoint


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base")
    return load_model(tmp_path / "base"), reference.float().eval(), tmp_path


def discriminator_of(hidden_size, classes=3, seed=0):
    """A frozen classifier of the test's own: the mean of the real positions' embeddings, times a fixed matrix."""
    W = torch.randn(hidden_size, classes, generator=torch.Generator().manual_seed(seed))
    return lambda embeddings, mask: ((embeddings * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)) @ W


def objective_written_out(reference, P, ids, discriminator, s: Steering):
    """One row (1, T), no padding: the paper's objective, one soft token at a time."""
    W = reference.get_input_embeddings().weight  # (V, D)
    text, log_ps = W[ids], []
    for _ in range(s.steps):
        logits = reference(inputs_embeds=torch.cat([P[None], text], dim=1)).logits[:, -1] / s.temperature
        p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)  # p_t
        log_ps.append(p.log())
        token = torch.zeros_like(p)
        token[0, p[0].argmax()] = 1.0  # the greedy token
        chosen = p + (token - p).detach() if s.hard else p  # straight-through: its value, p's gradient
        text = torch.cat([text, (chosen @ W)[:, None]], dim=1)  # e_t
    scores = discriminator(text, torch.ones(text.shape[:2]))
    style = -(scores[0, s.target] - scores[0].exp().sum().log())  # cross-entropy
    T = ids.shape[1]
    q_logits = reference(inputs_embeds=text).logits[0, T - 1:T - 1 + s.steps] / s.temperature  # (L, V)
    kl = 0.0
    for t in range(s.steps):
        log_q = q_logits[t] - q_logits[t].exp().sum().log()
        kl = kl + (log_ps[t][0].exp() * (log_ps[t][0] - log_q)).sum()
    return style + s.fluency_weight * kl / s.steps


@pytest.mark.parametrize("hard", [True, False])
def test_the_objective_equals_the_paper_written_out_row_by_row(pair, hard):
    ours, reference, _ = pair
    P = add_plug_and_play(ours, num_prompts=3).learned_prompts
    discriminator = discriminator_of(ours.config.hidden_size)
    steering = Steering(target=2, steps=4, temperature=0.7, fluency_weight=0.5, hard=hard)
    lengths = [6, 4]
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second row left-padded
    loss, parts = plug_and_play_loss(ours, P, discriminator, ids, mask, steering)
    with torch.no_grad():
        rows = [objective_written_out(reference, P, ids[row:row + 1, 6 - n:], discriminator, steering)
                for row, n in enumerate(lengths)]
    assert_close(loss, sum(rows) / 2, rtol=0, atol=1e-5)
    assert parts["style"] > 0 and parts["fluency"] > 0


@pytest.mark.parametrize("hard", [True, False])
def test_the_gradient_equals_autograd_through_the_written_out_objective_and_a_finite_difference(pair, hard):
    ours, reference, _ = pair
    P = add_plug_and_play(ours, num_prompts=2).learned_prompts
    discriminator = discriminator_of(ours.config.hidden_size, seed=3)
    steering = Steering(target=0, steps=3, temperature=1.0, fluency_weight=2.0, hard=hard)
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    loss, _ = plug_and_play_loss(ours, P, discriminator, ids, None, steering)
    loss.backward()
    copy = P.detach().clone().requires_grad_()
    objective_written_out(reference, copy, ids, discriminator, steering).backward()
    assert_close(P.grad, copy.grad, rtol=1e-4, atol=1e-6)
    assert P.grad.abs().sum() > 0
    if hard:
        return  # the straight-through gradient is not the derivative of the greedy objective, by design
    direction = torch.randn(P.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        step = 1e-3
        P.add_(step * direction)
        plus = plug_and_play_loss(ours, P, discriminator, ids, None, steering)[0].double()
        P.sub_(2 * step * direction)
        minus = plug_and_play_loss(ours, P, discriminator, ids, None, steering)[0].double()
    finite = (plus - minus) / (2 * step)
    assert finite.item() == pytest.approx((copy.grad.double() * direction).sum().item(), rel=2e-2, abs=1e-5)


def test_the_prompts_are_prompt_tunings_in_the_model_and_in_the_file(pair, tmp_path):
    """The first soft token's distribution is what the model with the prompts in front predicts (contract 2), and
    the adapter file is prompt tuning's."""
    ours, _, _ = pair
    wrapper = add_plug_and_play(ours, num_prompts=4)
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        _, _, log_p = write(ours, wrapper.learned_prompts, ids, None, steps=1, temperature=1.0)
        assert_close(log_p[:, 0], torch.log_softmax(ours(ids)[:, -1], dim=-1), rtol=0, atol=1e-5)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4


def test_bad_settings_are_refused(pair):
    ours, _, _ = pair
    P = add_plug_and_play(ours, num_prompts=2).learned_prompts
    with pytest.raises(BadInput, match="temperature > 0"):
        plug_and_play_loss(ours, P, discriminator_of(ours.config.hidden_size), torch.ones(1, 3, dtype=torch.long),
                           None, Steering(target=0, temperature=0.0))
