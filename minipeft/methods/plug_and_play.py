"""Plug and Play prompts: soft prompts that steer a frozen generator toward a style, trained through a
discriminator that reads what the prompted generator writes, and held to natural text by a fluency term.

Ajwani, Zhu, Rose and Rudzicz 2024, "Plug and Play with Prompts: A Prompt Tuning Approach for Controlling Text
Generation" (AAAI-24 workshop on Deployable AI, arXiv 2404.05143).

    x, the start of a text: E(x) (T, D)                       P (n, D): the prompts, the only tensors that train
    [P ; E(x)] ─► generator (frozen) ─► p_1 ─► e_1 ─► [P ; E(x) ; e_1] ─► p_2 ─► e_2 ... ─► e_L
                   p_t = softmax(logits / tau); e_t = onehot(argmax p_t) W_E forward, with p_t W_E's gradient
                   backward (straight-through: the greedy token is read, the distribution learns)
    [E(x) ; e_1 .. e_L] ─► discriminator (frozen) ─► class logits ─► L_style = CE(logits, the target style)
    [E(x) ; e_1 .. e_L] ─► the bare generator (no P) ─► q_t ─────► L_fluency = mean_t KL(p_t || q_t)

    L = L_style + lambda L_fluency                                                      plug_and_play_loss

Once trained, P is prompt tuning's prompt (prompt_tuning.py, and its file): put in front of a text, it steers
what the frozen model writes, with greedy or sampled decoding as usual and no discriminator at inference.

What was read, and what is chosen. The paper's method section could not be read here (the search tool reaches
its abstract and summaries), so no equation number is cited. Read, and followed: prompt embeddings in front of
a frozen generator; trained by the loss of a small language model used as a discriminator, back-propagated to
the prompts through the generated text; a fluency term that anchors the text to what the generator would
write; a few hundred training examples. Chosen, where the paper's own relaxation could not be read: the
continuation is the greedy one, and its gradient the straight-through estimate (`hard`; hard=False writes each
e_t as the expected embedding p_t W_E instead, fully differentiable but unlike any text: in a run here the
prompts then fooled the discriminator with gibberish, examples/plug_and_play.py); the fluency term is the KL
divergence from the bare generator's next-token distribution on the same text, the anchor PPLM uses; lambda,
tau and L are settings, since the paper's values could not be read; the discriminator is any frozen classifier
that reads embeddings (examples/plug_and_play.py: LoRA and a classification head on a second copy of the same
base, trained first).

Trains n D numbers: 10 prompts x 4096 = 40,960 on Llama-7B.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import BadInput
from .prompt_tuning import WordEmbeddingsWithLearnedPrompts, add_prompt_tuning


@dataclass
class Steering:
    """The objective's settings: the style to reach, how long a continuation is written, and the weights."""
    target: int  # the discriminator's class to steer toward
    steps: int = 8  # L, the tokens written soft
    temperature: float = 1.0  # tau: also the softness of the straight-through gradient (a peaked p_t passes little)
    fluency_weight: float = 1.0  # lambda
    hard: bool = True  # the greedy token forward, straight-through backward; False: the expected embedding


def write(model, prompts, input_ids, attention_mask, steps: int, temperature: float, hard: bool = True):
    """The prompted generator's continuation, L tokens, differentiable in the prompts. Returns the texts'
    embeddings with it, [E(x) ; e_1 .. e_L] (B, T + L, D), their mask (B, T + L), and log p_t (B, L, V)."""
    vocabulary = model.model.embed_tokens.weight  # W_E (V, D): the frozen embedding
    text = F.embedding(input_ids, vocabulary).float()  # E(x): (B, T, D)
    front = prompts.expand(len(text), -1, -1)  # P: (B, n, D)
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    log_p = []
    for _ in range(steps):
        inputs = torch.cat([front, text], dim=1)  # [P ; E(x) ; e_<t]
        inputs_mask = torch.cat([mask.new_ones(front.shape[:2]), mask], dim=1)
        logits = model(inputs_embeds=inputs, attention_mask=inputs_mask, last_only=True)[:, 0]  # (B, V)
        log_p.append(torch.log_softmax(logits.float() / temperature, dim=-1))  # log p_t
        p = log_p[-1].exp()  # (B, V)
        if hard:  # the greedy token's one-hot forward, p's gradient backward
            p = p + (F.one_hot(p.argmax(-1), p.shape[-1]).to(p) - p).detach()
        e_t = p @ vocabulary.float()  # (B, D)
        text, mask = torch.cat([text, e_t[:, None]], dim=1), torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    return text, mask, torch.stack(log_p, dim=1)


def plug_and_play_loss(model, prompts: torch.Tensor, discriminator: Callable, input_ids, attention_mask,
                       steering: Steering) -> tuple[torch.Tensor, dict]:
    """L = L_style + lambda L_fluency for the prompts P (n, D) on a batch of text starts (B, T), left-padded.
    `discriminator(embeddings (B, T', D), mask (B, T'))` returns class logits (B, C). Returns L and its parts."""
    if steering.steps < 1 or steering.temperature <= 0 or steering.fluency_weight < 0:
        raise BadInput(f"steering: expected steps >= 1, temperature > 0 and fluency_weight >= 0, got {steering}")
    written, mask, log_p = write(model, prompts, input_ids, attention_mask, steering.steps, steering.temperature,
                                 steering.hard)
    logits = discriminator(written, mask)  # (B, C)
    style = F.cross_entropy(logits.float(), torch.full((len(logits),), steering.target, device=logits.device))
    L, T = steering.steps, input_ids.shape[1]
    bare = model(inputs_embeds=written, attention_mask=mask)[:, T - 1:T - 1 + L]  # (B, L, V): q_t, no prompts
    log_q = torch.log_softmax(bare.float() / steering.temperature, dim=-1)
    fluency = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # mean_t KL(p_t || q_t)
    return style + steering.fluency_weight * fluency, {"style": style.item(), "fluency": fluency.item()}


def add_plug_and_play(model, num_prompts=10, seed=0, name="default") -> WordEmbeddingsWithLearnedPrompts:
    """Freeze the model and give it `num_prompts` learned prompts (prompt tuning's, started from vocabulary
    rows), to train with plug_and_play_loss. Returns the wrapper: its learned_prompts are P."""
    return add_prompt_tuning(model, num_prompts=num_prompts, init="vocab", seed=seed, name=name)
