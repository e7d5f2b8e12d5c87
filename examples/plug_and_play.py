"""Plug and Play prompts steer the default model's writing toward a sentiment (Ajwani et al. 2024).

First a discriminator learns the style: a second copy of the frozen base with LoRA and a classification head,
trained on a few hundred sentences made here from templates (positive and negative reviews). Then 10 prompts
in front of the frozen generator learn, through that discriminator, to make what the generator writes after a
text's start read as the target sentiment, with a fluency term that keeps it close to what the bare generator
would write (minipeft/methods/plug_and_play.py). The baseline is plain prompt tuning trained on the target
sentiment's sentences with the language-model loss.

    .venv/bin/python examples/plug_and_play.py [--target positive] [--steps 40] [--out runs/plug_and_play]

On held-out starts (subjects neither model trained on), greedy, it prints and writes (results.json) for the bare
base, plain prompt tuning and Plug and Play: the discriminator's probability of the target sentiment and the
fluency, the bare base's loss on the written continuation (lower reads more natural). The prompts are written
as prompt-tuning adapters (out/plug_and_play/, out/prompt_tuning/), which `minipeft generate` and peft load.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minipeft  # noqa: E402
from minipeft.errors import ArgumentParser, run_cli  # noqa: E402
from minipeft.llama.loader import DEFAULT_DIR  # noqa: E402
from minipeft.methods.plug_and_play import Steering, add_plug_and_play, plug_and_play_loss  # noqa: E402
from minipeft.train.reporting import check_positive, check_weights  # noqa: E402

SENTIMENTS = ("negative", "positive")
SUBJECTS = ["The movie", "The hotel", "The restaurant", "My new phone", "The concert", "The service", "Our trip",
            "The book", "The class", "The coffee", "The team", "The apartment"]
HELD_OUT_SUBJECTS = ["The museum", "The game", "The airline", "The show", "The park", "The bakery", "The laptop",
                     "The festival"]
VERBS = ["was", "is", "felt", "seemed", "turned out to be"]
LEADS = ["", "Honestly, ", "I think ", "Yesterday "]
WORDS = {"positive": ["wonderful", "excellent", "delightful", "fantastic", "great", "lovely", "superb", "amazing",
                      "pleasant", "brilliant", "charming", "perfect", "enjoyable", "impressive", "beautiful"],
         "negative": ["terrible", "awful", "dreadful", "horrible", "disappointing", "boring", "poor", "unpleasant",
                      "disgusting", "mediocre", "annoying", "miserable", "bad", "painful", "worthless"]}
CLAUSES = {"positive": ["I loved every minute of it", "I would gladly go back", "everyone was happy",
                        "it made my day", "I recommend it to everyone"],
           "negative": ["I hated every minute of it", "I will never go back", "everyone was upset",
                        "it ruined my day", "I would not recommend it to anyone"]}


def start(subject, verb, lead=""):
    return f"{lead}{subject[0].lower() + subject[1:] if lead else subject} {verb}"


def sentences(count, seed=0):
    """(text, label) reviews made from the templates, half of each sentiment, over the training subjects."""
    rng, made = random.Random(seed), []
    for i in range(count):
        sentiment = SENTIMENTS[i % 2]
        text = (f"{start(rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(LEADS))} "
                f"{rng.choice(WORDS[sentiment])}, and {rng.choice(CLAUSES[sentiment])}.")
        made.append((text, i % 2))
    return made


def left_padded(rows, pad=0):
    """Token lists -> ids (B, T) and mask (B, T), left-padded."""
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def train_discriminator(judge, tokenizer, examples, steps, batch):
    """LoRA on q and v plus a 2-class head, trained on the reviews; frozen afterwards."""
    minipeft.add_lora(judge, ["q_proj", "v_proj"], r=8, alpha=16)
    minipeft.add_task_head(judge, num_labels=2)
    trained = [p for p in judge.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-3)
    rng = random.Random(1)
    for step in range(steps):
        chosen = rng.sample(examples, batch)
        ids, mask = left_padded([tokenizer.encode(t) for t, _ in chosen])
        logits = judge(ids, mask)[:, -1]  # (B, 2): the last position is real in every left-padded row
        loss = F.cross_entropy(logits, torch.tensor([label for _, label in chosen]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p in trained:
        p.requires_grad_(False)
    judge.eval()


@torch.no_grad()
def accuracy(judge, tokenizer, examples):
    ids, mask = left_padded([tokenizer.encode(t) for t, _ in examples])
    predicted = judge(ids, mask)[:, -1].argmax(-1)
    return (predicted == torch.tensor([label for _, label in examples])).float().mean().item()


@torch.no_grad()
def measure(model, judge, tokenizer, starts, target, new_tokens, adapter):
    """Greedy continuations of each start with `adapter` on (None: the bare base): the discriminator's mean
    probability of the target, the bare base's mean loss on the continuations, and two examples."""
    minipeft.set_adapter(model, adapter)
    rows = [tokenizer.encode(s) for s in starts]
    written = minipeft.generate(model, rows, max_new_tokens=new_tokens, eos_id=-1)
    minipeft.set_adapter(model, None)
    ids, mask = left_padded([r + w for r, w in zip(rows, written)])
    probability = judge(ids, mask)[:, -1].softmax(-1)[:, target].mean().item()
    labels = torch.tensor([[-100] * (ids.shape[1] - len(w)) + w for w in written])  # the continuation alone
    fluency = model.loss(ids, labels, mask).item()
    return {"target_probability": round(probability, 4), "fluency_loss": round(fluency, 4),
            "examples": [s + tokenizer.decode(w) for s, w in zip(starts[:2], written[:2])]}


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(DEFAULT_DIR), help="HF-layout Llama directory (default: %(default)s)")
    parser.add_argument("--target", default="positive", choices=SENTIMENTS, help="the sentiment to steer toward")
    parser.add_argument("--steps", type=int, default=40, help="Plug and Play steps, and the baseline's (default: 40)")
    parser.add_argument("--judge-steps", type=int, default=60, help="discriminator steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="text starts a step (default: %(default)s)")
    parser.add_argument("--soft-tokens", type=int, default=8, help="L, tokens written soft a step (default: 8)")
    parser.add_argument("--fluency-weight", type=float, default=1.0, help="lambda (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="tau (default: %(default)s)")
    parser.add_argument("--relaxation", default="greedy", choices=("greedy", "expected"),
                        help="the continuation: greedy tokens, straight-through gradient; or each token's expected "
                             "embedding (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate on the prompts (default: 0.01)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated to measure (default: 16)")
    parser.add_argument("--out", default="runs/plug_and_play", help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    check_positive(steps=args.steps, judge_steps=args.judge_steps, batch=args.batch, soft_tokens=args.soft_tokens,
                   lr=args.lr, new_tokens=args.new_tokens, temperature=args.temperature)
    check_weights(args.weights)
    torch.manual_seed(0)
    target = SENTIMENTS.index(args.target)
    made = sentences(360)
    train, heldout = made[:300], made[300:]
    starts = [start(s, v, lead) for s in SUBJECTS for v in VERBS for lead in LEADS]  # 240 training starts
    heldout_starts = [start(s, v) for s in HELD_OUT_SUBJECTS for v in VERBS[:2]]  # 16, subjects never seen

    # 1. The discriminator: a second copy of the frozen base, LoRA + a classification head, trained first.
    judge, tokenizer = minipeft.load(args.weights)
    began = time.time()
    train_discriminator(judge, tokenizer, train, args.judge_steps, batch=16)
    print(f"discriminator: held-out accuracy {accuracy(judge, tokenizer, heldout):.3f} "
          f"({args.judge_steps} steps, {time.time() - began:.0f} s)")
    discriminator = lambda embeddings, mask: judge(inputs_embeds=embeddings, attention_mask=mask)[:, -1]  # noqa

    # 2. The generator, frozen: Plug and Play's prompts, and plain prompt tuning's as the baseline.
    model, _ = minipeft.load(args.weights)
    baseline = minipeft.add_prompt_tuning(model, num_prompts=10, init="vocab", name="prompt_tuning")
    ppp = add_plug_and_play(model, num_prompts=10, name="plug_and_play")
    steering = Steering(target=target, steps=args.soft_tokens, temperature=args.temperature,
                        fluency_weight=args.fluency_weight, hard=args.relaxation == "greedy")
    rng = random.Random(2)
    minipeft.set_adapter(model, "plug_and_play")
    optimizer, began = torch.optim.Adam([ppp.learned_prompts], lr=args.lr), time.time()
    for step in range(1, args.steps + 1):
        ids, mask = left_padded([tokenizer.encode(s) for s in rng.sample(starts, args.batch)])
        loss, parts = plug_and_play_loss(model, ppp.learned_prompts, discriminator, ids, mask, steering)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == 1:
            print(f"plug and play step {step:3d}  loss {loss.item():.4f}  style {parts['style']:.4f}  "
                  f"fluency {parts['fluency']:.4f}  {time.time() - began:5.0f} s", flush=True)
    minipeft.set_adapter(model, "prompt_tuning")
    optimizer = torch.optim.Adam([baseline.learned_prompts], lr=args.lr)
    targets = [t for t, label in train if label == target]
    for step in range(1, args.steps + 1):
        ids, mask = left_padded([tokenizer.encode(t) for t in rng.sample(targets, args.batch)])
        model.loss(ids, ids.masked_fill(mask == 0, -100), mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # 3. Held-out starts, greedy: the discriminator's score and the fluency, before and after.
    results = {name: measure(model, judge, tokenizer, heldout_starts, target, args.new_tokens, adapter)
               for name, adapter in (("bare base", None), ("prompt tuning (LM loss on target texts)",
                                     "prompt_tuning"), ("Plug and Play prompts", "plug_and_play"))}
    print(f"\n| held-out starts ({len(heldout_starts)}), greedy {args.new_tokens} tokens | P({args.target}) by the "
          f"discriminator | fluency: bare base's loss |\n| --- | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['target_probability']:.3f} | {r['fluency_loss']:.3f} |")
    for name, r in results.items():
        for example in r["examples"]:
            print(f"{name}: {example!r}")
    out = Path(args.out)
    minipeft.save_adapter(model, out)  # each adapter in its own folder: plug_and_play/, prompt_tuning/
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=1) + "\n")
    print(f"wrote {out / 'plug_and_play'} (a prompt-tuning adapter), {out / 'prompt_tuning'}, {out / 'results.json'}")


if __name__ == "__main__":
    run_cli(main)
