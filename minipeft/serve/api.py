"""What each URL does, in OpenAI's shapes where OpenAI has one (the `openai` client works unchanged), in
minipeft's own under /api/ for what OpenAI has not (adapters, training). http.py carries it.

    POST /v1/completions, /v1/chat/completions   `model`: the base's id or an adapter's name; stream (SSE),
                                                 max_tokens, temperature, top_p, stop, seed
    GET  /v1/models                              the base and every adapter
    GET  /api/status   /api/methods              the engine's load; the methods the tune panel offers
    POST /api/adapters {"name", "path"}          load an adapter directory;   DELETE /api/adapters/NAME
    GET  /api/adapters/NAME/download             the adapter in peft's layout, zipped
    POST /api/tune {"name", "method", "steps", "task", "examples"}   GET /api/tune/ID   DELETE /api/tune/ID

Every key that changes the answer is honoured, or refused by name with a 400: nothing silently ignored.
"""

import io
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .. import formats
from ..errors import refuse_unhonoured, require
from ..llama.chat import chat_ids
from ..methods.named_adapters import delete_adapter
from ..train.method_choice import CHOICES
from .engine import Full
from .streams import Stream
from .tuning import TASKS, TuneJob

SAMPLING = ("model", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "n")
NOT_MATH = ("user", "metadata", "store", "service_tier")
AT_DEFAULT = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": 0, "echo": False,
              "best_of": 1, "suffix": "", "logit_bias": {}, "tool_choice": "none", "parallel_tool_calls": True,
              "response_format": {"type": "text"}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind="invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Download:
    content: bytes
    file_name: str
    content_type: str = "application/zip"


class Reply:
    """The streams of one request (one a prompt) and the events they send back, as OpenAI's JSON."""

    def __init__(self, streams, model: str, chat: bool, stream: bool, include_usage: bool):
        self.streams, self.model, self.chat, self.stream = streams, model, chat, stream
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.events = streams[0].events  # shared by all of them

    def envelope(self, choices, **more) -> dict:
        kind = ("chat.completion" + (".chunk" if self.stream else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **more}

    def choice(self, index, text, finish_reason):
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if self.stream:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

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
                yield self.envelope([self.choice(event[1], event[2], None)])
            else:
                ended += 1
                usage = _add_usage(usage, event[3])
                yield self.envelope([self.choice(event[1], None if self.chat else "", event[2])])
        if self.include_usage:
            yield self.envelope([], usage=usage)

    def whole(self, next_event) -> dict:
        texts, reasons, usage = [""] * len(self.streams), [None] * len(self.streams), _empty_usage()
        while None in reasons:
            event = next_event()
            if event[0] == "error":
                raise ApiError(500, event[2], "server_error")
            if event[0] == "text":
                texts[event[1]] += event[2]
            else:
                reasons[event[1]], usage = event[2], _add_usage(usage, event[3])
        return self.envelope([self.choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))], usage=usage)

    def cancel(self):
        for stream in self.streams:
            stream.gone = True


def _empty_usage():
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _add_usage(a, b):
    return {key: a[key] + b[key] for key in a}


class Api:
    def __init__(self, engine, base_id: str, weights):
        self.engine, self.base_id, self.weights = engine, base_id, str(weights)
        self.jobs = {}

    # --- OpenAI ------------------------------------------------------------------------------------------
    def models(self, _body=None) -> dict:
        listed = [(self.base_id, {"method": None, "source": self.weights}), *self.engine.adapters.items()]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "minipeft",
                                            **info} for name, info in listed]}

    def completions(self, body) -> Reply:
        body = {key: value for key, value in body.items() if value is not None}  # null: the default, as OpenAI's
        refuse_unhonoured(body, (*SAMPLING, "prompt"), NOT_MATH, AT_DEFAULT, "request")
        prompts = require(body, "prompt", (str, list), "request")
        prompts = [prompts] if isinstance(prompts, str) or prompts and isinstance(prompts[0], int) else prompts
        if not prompts or len(prompts) > self.engine.max_batch:
            raise ApiError(400, f"prompt: expected 1 to {self.engine.max_batch} prompts", param="prompt")
        tokenizer = self.engine.tokenizer
        ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        vocabulary = self.engine.model.config.vocab_size
        if not all(isinstance(p, list) and p and all(isinstance(i, int) and 0 <= i < vocabulary for i in p)
                   for p in ids):
            raise ApiError(400, f"prompt: expected non-empty text, a list of texts, or token ids in [0, {vocabulary})",
                           param="prompt")
        return self.start(body, ids, chat=False, default_max_tokens=16)

    def chat_completions(self, body) -> Reply:
        body = {key: value for key, value in body.items() if value is not None}
        refuse_unhonoured(body, (*SAMPLING, "messages", "max_completion_tokens"), NOT_MATH, AT_DEFAULT, "request")
        messages = require(body, "messages", list, "request")
        if not messages:
            raise ApiError(400, "messages: expected at least one message", param="messages")
        turns = []
        for i, message in enumerate(messages):
            role = require(message if isinstance(message, dict) else {}, "role", str, f"messages[{i}]")
            content = message.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict)
                                  and part.get("type") == "text")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}]: expected a system, user or assistant message with text content",
                               param="messages")
            turns.append({"role": role, "content": content})
        if "max_completion_tokens" in body:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        return self.start(body, [chat_ids(self.engine.tokenizer, turns)], chat=True, default_max_tokens=256)

    def start(self, body, prompts, chat: bool, default_max_tokens: int) -> Reply:
        model = require(body, "model", str, "request")
        if model != self.base_id and model not in self.engine.adapters:
            raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists "
                                f"{[self.base_id, *self.engine.adapters]}", param="model", kind="not_found_error")
        require(body, "n", int, "request", 1, 1, default=1)
        limit = self.engine.model.config.max_position_embeddings
        max_tokens = require(body, "max_tokens", int, "request", 1, limit, default=default_max_tokens)
        temperature = require(body, "temperature", (int, float), "request", 0, 2, default=1.0)
        top_p = require(body, "top_p", (int, float), "request", 1e-9, 1, default=1.0)
        seed = require(body, "seed", int, "request") if "seed" in body else None
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop: expected a string or up to 4 strings", param="stop")
        stream = require(body, "stream", bool, "request", default=False)
        options = require(body, "stream_options", dict, "request", default={})
        if max(len(p) for p in prompts) + max_tokens > limit:
            raise ApiError(400, f"max_tokens: the prompt ({max(len(p) for p in prompts)} tokens) and max_tokens "
                                f"({max_tokens}) exceed the model's {limit} positions", param="max_tokens")
        stop_ids = tuple({*self.engine.model.config.eos_token_ids, self.engine.tokenizer.eos_id} - {None})
        first = Stream(prompts[0], None if model == self.base_id else model, max_tokens, stop_ids, temperature,
                       top_p, tuple(stop), seed)
        streams = [first] + [Stream(p, first.adapter, max_tokens, stop_ids, temperature, top_p, tuple(stop),
                                    None if seed is None else seed + i, index=i, events=first.events)
                             for i, p in enumerate(prompts[1:], start=1)]
        try:
            self.engine.submit(streams)
        except Full as e:
            raise ApiError(503, str(e), "server_busy") from None
        return Reply(streams, model, chat, stream, bool(options.get("include_usage")))

    # --- minipeft's own ----------------------------------------------------------------------------------
    def status(self, _body=None) -> dict:
        job = next((j for j in self.jobs.values() if j.state in ("starting", "training")), None)
        return {**self.engine.status(), "base": self.base_id, "training": job.view() if job else None}

    def methods(self, _body=None) -> dict:
        return {"methods": sorted(CHOICES), "tasks": TASKS}

    def check_new_name(self, body) -> str:
        name = require(body, "name", str, "request")
        taken = {self.base_id, *self.engine.adapters, *getattr(self.engine.model, "adapter_settings", {})}
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ApiError(400, "name: expected 1 to 64 letters, digits, '-', '_' or '.'", param="name")
        if name in taken:
            raise ApiError(409, f"name: {name!r} is taken; choose another", param="name", kind="conflict")
        return name

    def add_adapter(self, body) -> dict:
        refuse_unhonoured(body, ("name", "path"), (), {}, "request")
        name, path = self.check_new_name(body), Path(require(body, "path", str, "request"))

        def load():
            config = formats.load_adapter(self.engine.model, path, name=name)
            self.engine.adapters[name] = {"method": config["peft_type"], "source": str(path)}
        self.engine.call(load)
        return {"id": name, **self.engine.adapters[name]}

    def delete_adapter(self, name: str, _body=None) -> dict:
        def remove():
            if name not in self.engine.adapters:
                raise ApiError(404, f"adapter {name!r} does not exist", kind="not_found_error")
            if self.engine.in_use(name):
                raise ApiError(409, f"adapter {name!r} is answering {self.engine.in_use(name)} requests; try again "
                                    f"when they end", kind="conflict")
            delete_adapter(self.engine.model, name)
            del self.engine.adapters[name]
        self.engine.call(remove)
        return {"id": name, "deleted": True}

    def download(self, name: str, _body=None) -> Download:
        if name not in self.engine.adapters:
            raise ApiError(404, f"adapter {name!r} does not exist", kind="not_found_error")
        files = self.engine.call(lambda: formats.adapter_files(self.engine.model, name, self.weights))
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for file_name, content in files.items():
                z.writestr(f"{name}/{file_name}", content)
        return Download(archive.getvalue(), f"{name}.zip")

    def tune(self, body) -> dict:
        refuse_unhonoured(body, ("name", "task", "method", "steps", "examples", "lr"), (), {}, "request")
        if any(j.state in ("starting", "training") for j in self.jobs.values()):
            raise ApiError(409, "a training job is running; wait for it, or cancel it (DELETE /api/tune/ID)",
                           kind="conflict")
        name = self.check_new_name(body)
        steps = require(body, "steps", int, "request", 1, 10_000, default=30)
        examples = require(body, "examples", list, "request", default=[])
        for i, example in enumerate(examples):
            for key in ("prompt", "completion"):
                require(example if isinstance(example, dict) else {}, key, str, f"examples[{i}]")
        lr = require(body, "lr", (int, float), "request", 1e-7, 1.0) if body.get("lr") is not None else None
        job = TuneJob(self.engine, name, body.get("method"), steps, require(body, "task", str, "request",
                                                                             default="examples"), examples, lr)
        self.jobs[job.id] = job
        self.engine.call(lambda: setattr(self.engine, "job", job))
        return job.view()

    def tune_job(self, job_id: str, _body=None) -> dict:
        if job_id not in self.jobs:
            raise ApiError(404, f"no training job {job_id!r}", kind="not_found_error")
        return self.jobs[job_id].view()

    def cancel_tune(self, job_id: str, _body=None) -> dict:
        self.tune_job(job_id)
        self.jobs[job_id].cancelled.set()
        return self.jobs[job_id].view()
