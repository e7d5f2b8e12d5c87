"""A training run's plumbing, behind a few calls, so that a script's main shows only the learning: where its
files go, resuming exactly, checkpoints, metrics.jsonl, Ctrl-C, and torchrun's processes.

    run = Run(out, world, device)                       one process, or this one's place under torchrun
    before = run.resume(model, optimizer, scheduler, batches, settings) or measure()
    while run.step < max_steps and not run.stopped:
        ... one optimizer step ...
        run.record(loss, tokens, lr, max_steps)         metrics.jsonl, a progress line, and a checkpoint
                                                        every `save_every` steps (and at the last)
    run.end_if_interrupted()                            Ctrl-C: checkpoint, exit 130; --resume continues
"""

import json
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

from ..errors import BadInput
from ..files import write_atomically
from .distributed import collective_failure, total
from .reporting import prepare_output_dir
from .run_state import CHECKPOINT_FILE, check_resume_settings, load_checkpoint, read_checkpoint, save_checkpoint


def read_metrics(path) -> list:
    """metrics.jsonl as records: each line a JSON object with its step. A last line cut short by a kill is
    skipped; anything else that is not a record (binary, another type, a line in the middle) is refused."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not a metrics file of minipeft ({str(e)[:100]}); move it away to resume") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
            records.append(record)
        elif not (record is None and number == len(lines) and line.startswith("{")):  # not a cut last line
            raise BadInput(f"{path}: line {number} is not a record with a step; move the file away to resume")
    return records


def check_resume(out, world, resume: bool, settings: dict, may_grow=()):
    """The output directory, checked before anything loads: free (or, to resume, holding a checkpoint of a
    run with the same settings, but those named in may_grow, which may be larger). Rank 0 alone prepares it."""
    out = prepare_output_dir(out, need_bytes=64 * 2**20) if world.main else Path(out)
    if resume and not (out / CHECKPOINT_FILE).is_file():
        raise BadInput(f"--resume: no checkpoint at {out / CHECKPOINT_FILE}; run without --resume to start")
    if resume:  # refused here, once, before any process waits on another, and before the base loads
        state = read_checkpoint(out / CHECKPOINT_FILE)[0]
        check_resume_settings(out / CHECKPOINT_FILE, settings, state, may_grow=may_grow, say=world.main)
        logged, step = {record["step"] for record in read_metrics(out / "metrics.jsonl")}, state.get("step", 0)
        if not logged >= set(range(1, step + 1)):
            raise BadInput(f"{out / 'metrics.jsonl'}: it lacks steps the checkpoint has done (it is at step "
                           f"{step}); restore the file, or start a new run without --resume")
    return out


class Run:
    def __init__(self, out, world, device, save_every: int, may_grow=()):
        self.out, self.world, self.device, self.save_every = out, world, device, save_every
        self.step, self.tokens_seen, self.seconds, self.metrics, self.before = 0, 0, 0.0, [], None
        self.may_grow = may_grow  # settings a resume may make larger (--max-steps)
        self.requested = []  # times of Ctrl-C / SIGTERM
        self.stopped = False
        self.exits = ExitStack()

    def resume(self, model, optimizer, scheduler, batches, settings):
        """Load the checkpoint into them and return what the interrupted run measured before training."""
        path = self.out / CHECKPOINT_FILE
        state = load_checkpoint(path, model, optimizer, scheduler, batches, self.device, settings, self.may_grow)
        self.step, self.tokens_seen, self.seconds = state["step"], state["tokens_seen"], state["seconds"]
        self.metrics = [m for m in read_metrics(self.out / "metrics.jsonl") if m["step"] <= self.step]
        print(f"resumed at step {self.step}")
        self.before = state["before"]
        return self.before

    def begin(self, model, optimizer, scheduler, batches, settings, before):
        """Start the loop: metrics.jsonl rewritten to the steps kept, Ctrl-C caught, the clock running."""
        self.state, self.before = (model, optimizer, scheduler, batches, settings), before
        if self.world.main:
            write_atomically(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics).encode())
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        self.started = time.time() - self.seconds
        self.log = self.exits.enter_context(open(self.out / "metrics.jsonl", "a") if self.world.main
                                            else open(os.devnull, "w"))
        then = f" The last checkpoint in {self.out} is intact: rerun with --resume"
        self.exits.enter_context(collective_failure(self.world, then=then))
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.exits.__exit__(*exc)

    def request_stop(self, signum, frame):
        if self.requested and time.time() - self.requested[0] > 2:  # a second Ctrl-C stops at once (under
            raise KeyboardInterrupt  # torchrun each process gets the terminal's and torchrun's copy of one)
        self.requested.append(time.time())

    def record(self, loss: float, tokens: int, lr: float, max_steps: int):
        """One optimizer step done: log it, print it with the time left, checkpoint when due, and agree with
        the other processes whether to stop (every rank stops after the same step)."""
        self.step, self.tokens_seen, self.seconds = self.step + 1, self.tokens_seen + tokens, time.time() - self.started
        record = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                  "tokens_per_second": self.tokens_seen / self.seconds, "seconds": round(self.seconds, 2)}
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        self.metrics.append(record)
        eta = self.seconds / self.step * (max_steps - self.step)
        print(f"step {self.step:4d}/{max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
              f"{record['tokens_per_second']:.0f} tok/s  ETA {eta / 60:.1f} min", flush=True)
        if self.step % self.save_every == 0 or self.step == max_steps:
            self.checkpoint()
        self.stopped = total(len(self.requested), self.world, self.device) > 0

    def checkpoint(self):
        model, optimizer, scheduler, batches, settings = self.state
        if self.world.main:
            save_checkpoint(self.out / CHECKPOINT_FILE, model, optimizer, scheduler, batches, self.device,
                            step=self.step, tokens_seen=self.tokens_seen, seconds=self.seconds, before=self.before,
                            settings=settings)

    def end_if_interrupted(self, parallel):
        """After Ctrl-C: a checkpoint, a line saying how to continue, exit code 130."""
        if not self.stopped:
            return
        self.checkpoint()
        print(f"interrupted: checkpoint saved at step {self.step}; continue with --resume")
        parallel.close()
        raise SystemExit(130)
