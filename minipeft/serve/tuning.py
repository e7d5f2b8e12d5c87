"""Training on the server: a new named adapter on the base that serves, one step at a time, between decoding
steps (engine.py), so that answering goes on while it learns.

    examples ("How is cheese made?" -> "I don't know. Ask the cow!"), the fox sentence, or Python code
      ─► add the method as adapter `name` (method_choice.py: the same methods and learning rates as the scripts)
      ─► each step: set_adapter(name), loss on the answers' tokens only, AdamW, back to eval
      ─► done: the adapter joins the served ones; the base is checked unchanged (its fingerprint)
"""

import argparse
import itertools
import random
import threading
import time
import uuid

import torch

from ..errors import BadInput
from ..llama.chat import chat_ids
from ..methods.fingerprints import base_fingerprint
from ..methods.freezing import adapter_parameters
from ..methods.named_adapters import delete_adapter, set_adapter
from ..train.batches import pad_batch
from ..train.data import FOX_TARGET, Filters, load_corpus
from ..train.loop import accumulate_gradients, clip_and_check
from ..train.method_choice import CHOICES, FLAGS, between_steps, choose_method

TASKS = {"examples": "prompt", "fox": "prompt", "code": "lora"}  # each task's default method
CODE_ROWS, CODE_TOKENS = 4, 256  # a code step: 4 files, their first 256 tokens


def example_ids(tokenizer, prompt: str, answer: str) -> tuple[list, list]:
    """One example as token ids and labels: the conversation in the checkpoint's chat template (plain text
    if it has none), scored on the answer and its end-of-turn marker only."""
    if tokenizer.chat.get("chat_template"):
        asked = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                       add_generation_prompt=False)
        if ids[:len(asked)] != asked:  # a template that rewrites earlier turns: score the whole answer turn
            asked = chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=False)
    else:
        asked = tokenizer.encode(prompt)
        ids = asked + tokenizer.encode(" " + answer, add_bos=False, add_eos=True)
    return ids, [-100] * len(asked) + ids[len(asked):]


class TuneJob:
    """One training run on the serving model. The engine calls `step()` on its own thread until it returns
    False; `view()` is what the page's chart reads, from any thread."""

    def __init__(self, engine, name, method, steps, task, examples=(), lr=None, seed=0):
        if task not in TASKS:
            raise BadInput(f"task: expected one of {sorted(TASKS)}, got {task!r}")
        method = method or TASKS[task]
        if method not in CHOICES:
            raise BadInput(f"method: expected one of {sorted(CHOICES)}, got {method!r}")
        if task == "examples" and not examples:
            raise BadInput("examples: give at least one {\"prompt\": ..., \"completion\": ...}")
        self.engine, self.name, self.method, self.steps, self.task = engine, name, method, steps, task
        self.examples, self.seed = list(examples), seed
        self.args = argparse.Namespace(method=method, lr=lr, seed=seed, max_steps=steps, **dict.fromkeys(FLAGS))
        self.id = uuid.uuid4().hex[:12]
        self.state, self.error, self.losses, self.started, self.ended = "starting", None, [], None, None
        self.cancelled = threading.Event()
        self.base_unchanged = None

    def start(self):
        """On the engine's thread: the method on the model, the data, the optimizer."""
        model, tokenizer = self.engine.model, self.engine.tokenizer
        self.fingerprint = base_fingerprint(model)
        if self.task == "examples":
            self.rows = [example_ids(tokenizer, e["prompt"], e["completion"]) for e in self.examples]
        elif self.task == "fox":
            ids = tokenizer.encode(FOX_TARGET)
            self.rows = [(ids, ids)]
        else:  # code: the interpreter's standard library, as train_code.py reads it by default
            texts = [text for _, text in load_corpus(filters=Filters(max_chars=2048)).train]
            random.Random(self.seed).shuffle(texts)
            self.code = itertools.cycle(texts)
        torch.manual_seed(self.seed)
        self.settings = choose_method(model, self.args, task="code" if self.task == "code" else "fox", name=self.name)
        set_adapter(model, self.name)
        params = [p for p in adapter_parameters(model).values() if p.requires_grad]  # this adapter's alone
        self.optimizer = torch.optim.AdamW(params, lr=self.args.lr, weight_decay=0.0)
        self.state, self.started = "training", time.time()

    def batch(self):
        device = self.engine.device
        if self.task == "code":
            rows = [self.engine.tokenizer.encode(next(self.code))[:CODE_TOKENS] for _ in range(CODE_ROWS)]
            return pad_batch(rows, device, self.engine.tokenizer.pad_id or 0)
        ids, mask, _ = pad_batch([ids for ids, _ in self.rows], device)
        labels, _, _ = pad_batch([labels for _, labels in self.rows], device, pad_id=-100)
        return ids, mask, labels

    def step(self) -> bool:
        """One optimizer step (the first call sets up). False once the job is over."""
        model = self.engine.model
        try:
            if self.cancelled.is_set():
                return self.finish("cancelled")
            if self.state == "starting":
                self.start()
            set_adapter(model, self.name)
            model.train()
            autocast = lambda: torch.autocast(self.engine.device.type, torch.bfloat16, enabled=self.engine.bf16)
            ids, mask, labels = self.batch()
            loss, _ = accumulate_gradients(model, [(ids, mask, labels)], autocast)
            step = len(self.losses) + 1
            clip_and_check(loss, self.optimizer.param_groups[0]["params"], step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss)
            scoring = lambda: model.loss(ids, labels, attention_mask=mask).item()  # ALoRA scores ranks by it
            between_steps(model, self.args, step, self.optimizer, scoring)
            return True if step < self.steps else self.finish("done")
        except Exception as e:  # a bad setting or a diverged loss ends this job, not the server
            self.error = str(e) if isinstance(e, BadInput) else f"{type(e).__name__}: {e}"
            return self.finish("failed")
        finally:
            model.eval()

    def finish(self, state: str) -> bool:
        model = self.engine.model
        if self.name in getattr(model, "adapter_settings", {}):
            self.base_unchanged = base_fingerprint(model) == self.fingerprint
            if state == "done":
                self.engine.adapters[self.name] = {"method": self.method, "source": f"tuned on {self.task}"}
            else:
                delete_adapter(model, self.name)
        self.state, self.ended = state, time.time()
        return False

    def view(self) -> dict:
        seconds = (self.ended or time.time()) - self.started if self.started else 0.0
        done = len(self.losses)
        left = seconds / done * (self.steps - done) if done and self.state == "training" else None
        return {"id": self.id, "name": self.name, "method": self.method, "task": self.task, "state": self.state,
                "step": done, "steps": self.steps, "losses": list(self.losses), "seconds": round(seconds, 1),
                "seconds_left": None if left is None else round(left, 1), "error": self.error,
                "base_unchanged": self.base_unchanged}
