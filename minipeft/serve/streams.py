"""One request's answer as the engine makes it, a token at a time: its sampling settings, when it ends, and
the text it has said so far.

    token ─► ids so far ─► their text ─► a stop string in it? end there, unsaid
                                    └─► say what is sure: not a trailing piece of a UTF-8 character, not what
                                        could still become the start of a stop string
"""

import queue
from dataclasses import dataclass, field

import torch


@dataclass
class Stream:
    """What a request asks (one prompt, one adapter or None for the bare base) and what the engine has made.

    The engine calls `take` with each new token; the HTTP thread reads `events`: ("text", index, piece) as
    text becomes sure, then ("end", index, finish_reason, usage), or ("error", index, message)."""
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    stop_ids: tuple = ()
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple = ()  # strings
    seed: int | None = None
    index: int = 0  # which choice of its request
    events: queue.Queue = field(default_factory=queue.Queue)
    tokens: list = field(default_factory=list)
    said: int = 0  # characters of the text already sent
    gone: bool = False  # its client hung up: the engine drops it at the next step
    generator: torch.Generator = None  # made by the engine from `seed`, on the model's device

    def take(self, token: int, decode) -> str | None:
        """Add one token; say what became sure. Returns the finish reason ("stop" or "length") once it ends."""
        if token in self.stop_ids:
            return self.end("stop", self.text_of(decode))
        self.tokens.append(token)
        text = self.text_of(decode)
        found = [text.find(s) for s in self.stop if s in text]
        if found:
            return self.end("stop", text[:min(found)])
        if len(self.tokens) >= self.max_tokens:
            return self.end("length", text)
        sure = len(text.rstrip("\ufffd"))  # a character whose bytes have not all come yet
        sure -= max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text[:sure].endswith(s[:n])),
                    default=0)  # the start of a stop string, perhaps
        self.say(text[:sure])
        return None

    def text_of(self, decode) -> str:
        return decode(self.tokens)

    def say(self, text: str):
        if len(text) > self.said:
            self.events.put(("text", self.index, text[self.said:]))
            self.said = len(text)

    def end(self, reason: str, text: str) -> str:
        self.say(text)
        usage = {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                 "total_tokens": len(self.prompt) + len(self.tokens)}
        self.events.put(("end", self.index, reason, usage))
        return reason

    def fail(self, message: str):
        self.events.put(("error", self.index, message))
