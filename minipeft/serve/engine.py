"""Continuous batching: every stream in one mixed batch on one frozen base, new ones joining at the next step.

    waiting ─► admit: the new prompts prefilled together, each row with its own adapter (or none)
                      ─► their KV cache joined to the running batch's (KVCache.join: left-padded)
    running ─► step: each row's next token from its own logits (greedy, or its temperature and top-p)
                      ─► a row that ends (EOS, max_tokens, a stop string, its client gone) leaves the batch
                         and the cache (KVCache.keep)
                      ─► one forward of every row's new token (set_adapter: a name, or None, a row)
    between steps ─► calls from other threads (load or delete an adapter, read one), one training step

One thread, the engine's, touches the model; the HTTP threads only hand it streams and calls. A training
job takes its steps here too, between decoding steps, so serving goes on while it trains.

`run` belongs on the process's main thread, where the model was loaded: on a 2-core Xeon, torch's matmuls
called from a second thread, once the main one has used OpenMP, ran up to 4x slower (a 576 x 1536 matrix
times a vector: 35 us on the main thread, 134 us on another; one stream 18 tokens/s instead of 30).
"""

import collections
import concurrent.futures
import sys
import threading
import time
import traceback

import torch

from ..llama.generate import left_padded
from ..llama.kv_cache import KVCache
from ..llama.quant import decoded_weights
from ..methods.named_adapters import set_adapter
from .sampling import logprob_entry, next_token


class Full(Exception):
    """The waiting queue holds max_waiting streams already."""


class Engine:
    def __init__(self, model, tokenizer, max_batch=16, max_waiting=64, bf16=False, weight_cache_mb=1024,
                 max_prefill_tokens=8192):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting, self.bf16 = max_batch, max_waiting, bf16
        self.max_prefill_tokens = max_prefill_tokens
        self.weight_cache_mb = weight_cache_mb
        self.device = model.model.norm.weight.device
        self.waiting = collections.deque()
        self.running, self.cache, self.logits = [], None, None
        self.calls = collections.deque()  # (function, future): run on this thread between steps
        self.adapters = {}  # the adapters served: name -> {"method", "source"}
        self.job = None  # a training job (tuning.TuneJob) that takes one step between decoding steps
        self.wake = threading.Condition()
        self.stopped = False
        self.tokens_made, self.busy_seconds, self.widest = 0, 0.0, 0  # widest: the most rows in one batch yet
        self.finished, self.failures = 0, 0  # streams ended; forwards that failed (for /metrics)

    # --- what other threads call -------------------------------------------------------------------------
    def submit(self, streams):
        with self.wake:
            if len(self.waiting) + len(streams) > self.max_waiting:
                raise Full(f"the queue is full ({self.max_waiting} requests waiting); try again shortly")
            self.waiting.extend(streams)
            self.wake.notify()

    def call(self, function, timeout=600):
        """Run function() on the engine's thread between steps; its result, or its exception, here."""
        future = concurrent.futures.Future()
        with self.wake:
            self.calls.append((function, future))
            self.wake.notify()
        return future.result(timeout)

    def status(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "max_waiting": self.max_waiting, "tokens": self.tokens_made, "widest_batch": self.widest,
                "tokens_per_second": round(self.tokens_made / self.busy_seconds, 1) if self.busy_seconds else None}

    def in_use(self, adapter: str) -> int:
        return sum(s.adapter == adapter for s in [*self.running, *self.waiting])

    def stop(self):
        with self.wake:
            self.stopped = True
            self.wake.notify()

    # --- the engine's thread --------------------------------------------------------------------------------
    def run(self):
        with decoded_weights(self.model, self.weight_cache_mb), torch.no_grad():
            while True:
                with self.wake:
                    self.wake.wait_for(lambda: self.stopped or self.waiting or self.running or self.calls or self.job)
                    if self.stopped:
                        return
                    calls, self.calls = list(self.calls), collections.deque()
                for function, future in calls:
                    self.run_call(function, future)
                started = time.perf_counter()
                try:
                    self.admit()
                    if self.running:
                        made = self.step()
                        self.tokens_made += made
                        self.busy_seconds += time.perf_counter() - started
                except Exception as e:  # a shared forward failed: its streams hear of it, and serving goes on
                    traceback.print_exc(file=sys.stderr)
                    self.failures += 1
                    for stream in self.running:
                        stream.fail(f"internal error while decoding: {type(e).__name__}")
                    self.running, self.cache, self.logits = [], None, None
                if self.job is not None:
                    with torch.enable_grad():
                        self.job = self.job if self.job.step() else None

    @staticmethod
    def run_call(function, future):
        try:
            future.set_result(function())
        except Exception as e:  # handed back to the thread that called
            future.set_exception(e)

    def forward(self, ids, attention_mask=None, cache=None):
        """The last position's logits (B, vocab), fp32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(ids, attention_mask, cache, last_only=True)[:, -1].float()

    def admit(self):
        """Prefill the waiting streams that fit, in one batch, and join them to the running ones. Each stream's
        own setup failing fails it alone; the prefill failing fails the new streams alone: the running go on."""
        with self.wake:
            room, new, longest = self.max_batch - len(self.running), [], 0
            while self.waiting and len(new) < room:  # as many as --max-prefill-tokens holds, one at least
                longest = max(longest, len(self.waiting[0].prompt))
                if new and longest * (len(new) + 1) > self.max_prefill_tokens:
                    break
                new.append(self.waiting.popleft())
        ready = []
        for stream in new:
            try:
                if stream.gone:
                    continue
                if stream.adapter is not None and stream.adapter not in self.adapters:  # removed while it waited
                    raise LookupError(f"adapter {stream.adapter!r} was removed before this request began")
                if stream.seed is not None:  # as generate seeds its draws
                    stream.generator = torch.Generator(self.device).manual_seed(stream.seed)
                ready.append(stream)
            except Exception as e:
                stream.fail(str(e) if isinstance(e, LookupError) else f"this request could not start: {e}")
        if not ready:
            return
        try:
            ids, mask = left_padded([s.prompt for s in ready], self.device)
            set_adapter(self.model, [s.adapter for s in ready])
            cache = KVCache(self.model.config.num_hidden_layers)
            logits = self.forward(ids, mask, cache)
            joined = KVCache.join([self.cache, cache]) if self.running else cache
            logits = torch.cat([self.logits, logits]) if self.running else logits
        except Exception as e:  # out of memory, say: these requests hear of it, the running ones go on
            traceback.print_exc(file=sys.stderr)
            self.failures += 1
            for stream in ready:
                stream.fail(f"this request's prefill failed: {type(e).__name__}")
            return
        self.cache, self.logits = joined, logits
        self.running += ready
        self.widest = max(self.widest, len(self.running))

    def step(self) -> int:
        """Each running stream takes its next token; those that end leave; the rest go one forward on."""
        next_ids = self.logits.argmax(-1)  # (B,): greedy on the model's logits, unless a row asks otherwise
        tokens = next_ids.tolist()
        decode, ended = self.tokenizer.decode, []
        for row, stream in enumerate(self.running):
            if stream.gone:
                ended.append(row)
                continue
            try:
                sampling, logits = stream.sampling, self.logits[row]
                if not sampling.plain():
                    tokens[row] = next_token(logits, sampling, stream.prompt, stream.tokens, stream.stop_ids,
                                             stream.generator)
                entry = None if sampling.logprobs is None else logprob_entry(logits, tokens[row], sampling.logprobs)
                if stream.take(tokens[row], decode, entry) is not None:
                    ended.append(row)
            except Exception as e:  # this row's own settings or text: it alone ends
                traceback.print_exc(file=sys.stderr)
                stream.fail(f"internal error in this stream: {type(e).__name__}")
                ended.append(row)
        made = len(self.running)
        if ended:
            self.finished += len(ended)
            keep = [row for row in range(len(self.running)) if row not in set(ended)]
            self.running = [self.running[row] for row in keep]
            self.cache = self.cache.keep(keep) if keep else None
            tokens = [tokens[row] for row in keep]
        if self.running:
            set_adapter(self.model, [s.adapter for s in self.running])
            self.logits = self.forward(torch.tensor(tokens, device=self.device)[:, None], cache=self.cache)
        return made
