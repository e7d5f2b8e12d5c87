"""OpenAI's shapes: an error, and one request's answer as its streams make it (one a choice), as a whole or
as the chunks of a streamed reply, with usage and logprobs. api.py makes them; http.py writes them.

    events of the streams ─► Reply.chunks: {"object": "text_completion" | "chat.completion.chunk", ...} each
                         └─► Reply.whole:  one {"object": "text_completion" | "chat.completion", ...}
"""

import time
import uuid
from dataclasses import dataclass


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Download:
    content: bytes
    file_name: str
    content_type: str = "application/zip"


class Reply:
    """The streams of one request (one a choice) and the events they send back, as OpenAI's JSON."""

    def __init__(self, streams, model: str, chat: bool, stream: bool, include_usage: bool, token_text=None):
        self.streams, self.model, self.chat, self.stream = streams, model, chat, stream
        self.include_usage, self.token_text = include_usage, token_text
        self.with_logprobs = streams[0].sampling.logprobs is not None
        self.offsets = [0] * len(streams)  # text_offset of each choice's next token (completions' logprobs)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.events = streams[0].events  # shared by all of them

    def envelope(self, choices, **more) -> dict:
        kind = ("chat.completion" + (".chunk" if self.stream else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **more}

    def choice(self, index, text, finish_reason, entries=()):
        logprobs = self.logprobs(index, entries)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.stream:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def logprobs(self, index, entries):
        """OpenAI's logprobs of (token, logprob, top [(id, logprob)]) entries: chat's list of tokens, or the
        completions' parallel lists (text_offset counted from the start of the answer)."""
        if not self.with_logprobs or not entries:
            return None
        text = self.token_text
        if self.chat:
            item = lambda token, logprob: {"token": text(token), "logprob": logprob,
                                           "bytes": list(text(token).encode())}
            return {"content": [{**item(token, logprob), "top_logprobs": [item(*t) for t in top]}
                                for token, logprob, top in entries], "refusal": None}
        offsets = []
        for token, _, _ in entries:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(text(token))
        return {"tokens": [text(token) for token, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{text(i): lp for i, lp in top} for _, _, top in entries], "text_offset": offsets}

    def chunks(self, next_event):
        """The streamed reply: OpenAI's chunks, as dicts; then the usage, if asked. next_event() -> an event."""
        if self.chat:
            for s in self.streams:
                yield self.envelope([{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
        usage, ended = _empty_usage(), 0
        while ended < len(self.streams):
            event = next_event()
            if event[0] == "error":
                raise ApiError(500, event[2], "server_error")
            if event[0] == "text":
                yield self.envelope([self.choice(event[1], event[2], None, event[3])])
            else:
                ended += 1
                usage = _add_usage(usage, event[3])
                yield self.envelope([self.choice(event[1], None if self.chat else "", event[2])])
        if self.include_usage:
            yield self.envelope([], usage=usage)

    def whole(self, next_event) -> dict:
        count = len(self.streams)
        texts, reasons, entries, usage = [""] * count, [None] * count, [[] for _ in range(count)], _empty_usage()
        while None in reasons:
            event = next_event()
            if event[0] == "error":
                raise ApiError(500, event[2], "server_error")
            if event[0] == "text":
                texts[event[1]] += event[2]
                entries[event[1]] += event[3]
            else:
                reasons[event[1]], usage = event[2], _add_usage(usage, event[3])
        return self.envelope([self.choice(i, t, r, e) for i, (t, r, e) in enumerate(zip(texts, reasons, entries))],
                             usage=usage)

    def cancel(self):
        for stream in self.streams:
            stream.gone = True


def _empty_usage():
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _add_usage(a, b):
    return {key: a[key] + b[key] for key in a}
