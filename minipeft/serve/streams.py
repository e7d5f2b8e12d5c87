"""One request's answer as the engine makes it, a token at a time: its sampling settings, when it ends, and
the text it has said so far. Each token costs work in proportion to the text it adds, never to all the text
so far: a long answer or a long stop string cannot slow every stream in the batch.

    token ─► its text: the tokens since the last sure point decoded, less what they said before (a character
             whose bytes have not all come waits for them)
          ─► the unsaid text scanned once, left to right, for every stop string (Knuth-Morris-Pratt: each
             character moves each string's match on or back, never rescanned)
          ─► a stop string found? end there, unsaid.  Else say what is sure: not what could still become the
             start of a stop string
"""

import queue
from dataclasses import dataclass, field

import torch

from .sampling import Sampling


def failure(s: str) -> list:
    """KMP's table: failure[i] = the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table


def scan(text: str, s: str, table: list) -> tuple:
    """(where s first starts in text, or None; how much of s text's end could be the start of)."""
    k = 0
    for i, ch in enumerate(text):
        while k and ch != s[k]:
            k = table[k - 1]
        k += ch == s[k]
        if k == len(s):
            return i + 1 - k, 0
    return None, k


@dataclass
class Stream:
    """What a request asks (one prompt, one adapter or None for the bare base) and what the engine has made.

    The engine calls `take` with each new token; the HTTP thread reads `events`: ("text", index, piece,
    logprob entries) as text becomes sure, then ("end", index, finish_reason, usage), or ("error", index, message).
    """
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    stop_ids: tuple = ()
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple = ()  # strings
    seed: int | None = None
    index: int = 0  # which choice of its request
    events: queue.Queue = field(default_factory=queue.Queue)
    tokens: list = field(default_factory=list)
    text: str = ""  # the text of the tokens so far, but for a character still incomplete
    said: int = 0  # characters of the text already sent
    gone: bool = False  # its client hung up: the engine drops it at the next step
    generator: torch.Generator = None  # made by the engine from `seed`, on the model's device
    decoded_from: int = 0  # tokens before this one are in `text` for good...
    decoded_to: int = 0  # ...and those up to this one too, decoded after decoded_from's
    entries: list = field(default_factory=list)  # logprob entries of tokens not yet said

    def __post_init__(self):
        self.tables = [failure(s) for s in self.stop]

    def take(self, token: int, decode, entry=None) -> str | None:
        """Add one token; say what became sure. Returns the finish reason ("stop" or "length") once it ends."""
        if token in self.stop_ids:
            return self.end("stop", decode)
        self.tokens.append(token)
        if entry is not None:
            self.entries.append(entry)
        self.add_text(decode)
        held = 0
        if len(self.tokens) >= self.sampling.min_tokens:  # as vLLM: no stop string before min_tokens
            unsaid, starts = self.text[self.said:], []
            for s, table in zip(self.stop, self.tables):
                start, pending = scan(unsaid, s, table)
                if start is not None:
                    starts.append(start)
                held = max(held, pending)
            if starts:
                self.text = self.text[:self.said + min(starts)]
                return self.end("stop")
        if len(self.tokens) >= self.max_tokens:
            return self.end("length", decode)
        self.say(len(self.text) - held)
        return None

    def add_text(self, decode, final=False):
        """The text the new tokens add (vLLM's incremental detokenizing): decode from the last sure point, so a
        tokenizer that drops a leading space or joins bytes across tokens adds exactly what the whole would."""
        before = decode(self.tokens[self.decoded_from:self.decoded_to])
        after = decode(self.tokens[self.decoded_from:])
        if final or len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.decoded_from, self.decoded_to = self.decoded_to, len(self.tokens)

    def say(self, upto: int):
        if upto > self.said:
            self.events.put(("text", self.index, self.text[self.said:upto], self.entries))
            self.said, self.entries = upto, []

    def end(self, reason: str, decode=None) -> str:
        if decode is not None:  # what is still held back is said (a stop string found was cut off before)
            self.add_text(decode, final=True)
        self.say(len(self.text))
        usage = {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                 "total_tokens": len(self.prompt) + len(self.tokens)}
        self.events.put(("end", self.index, reason, usage))
        return reason

    def fail(self, message: str):
        self.events.put(("error", self.index, message))
