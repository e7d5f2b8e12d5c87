"""What each URL does, in OpenAI's shapes where OpenAI has one (the `openai` client works unchanged), in
minipeft's own under /api/ for what OpenAI has not (adapters, training). http.py carries it.

    POST /v1/completions, /v1/chat/completions   `model`: the base's id or an adapter's name; stream (SSE),
                                                 max_tokens, n, seed, stop, sampling (sampling.py), logprobs
    GET  /v1/models                              the base and every adapter
    GET  /api/status   /api/methods              the engine's load; the methods the tune panel offers
    GET  /health       /metrics                  "ok" while the engine runs; Prometheus text
    POST /api/adapters {"name", "path"}          load an adapter from --adapter-dir;   DELETE /api/adapters/NAME
    GET  /api/adapters/NAME/download             the adapter in peft's layout, zipped
    POST /api/tune {"name", "method", "steps", "task", "examples"}   GET /api/tune/ID   DELETE /api/tune/ID

Every key that changes the answer is honoured, or refused by name with a 400: nothing silently ignored.
Every size a caller chooses is bounded (limits.py); access.py has said who may call what before any of this.
"""

import collections
import io
import zipfile

from .. import formats
from ..bases import refuse_merged
from ..errors import BadInput, refuse_unhonoured, require
from ..llama.chat import chat_ids
from ..methods.named_adapters import delete_adapter
from ..train.method_choice import CHOICES
from .access import Access
from .engine import Full
from .limits import MAX_STOP_STRINGS, SEED_LIMIT, Limits
from .sampling import Sampling
from .shapes import ApiError, Download, Reply
from .streams import Stream
from .tuning import TASKS, TuneJob

SAMPLING = ("model", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "n", "top_k",
            "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos",
            "min_tokens", "logprobs")
NOT_MATH = ("user", "metadata", "store", "service_tier")
AT_DEFAULT = {"echo": False, "best_of": 1, "suffix": "", "tool_choice": "none", "parallel_tool_calls": True,
              "response_format": {"type": "text"}}


class Api:
    def __init__(self, engine, base_id: str, access: Access = None, limits: Limits = None, weights=None):
        self.engine, self.base_id = engine, base_id
        self.weights = weights  # the base's directory: an adapter `minipeft merge` folded into it is refused
        self.access, self.limits = access or Access("127.0.0.1"), limits or Limits()
        self.jobs = {}
        self.answered = collections.Counter()  # (route, status) -> requests; for /metrics
        self.seconds = collections.Counter()  # route -> seconds spent answering

    # --- OpenAI ------------------------------------------------------------------------------------------
    def models(self, _body=None) -> dict:
        listed = [(self.base_id, {"method": None, "source": self.base_id}), *self.engine.adapters.items()]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "minipeft",
                                            **info} for name, info in listed]}

    def completions(self, body) -> Reply:
        body = {key: value for key, value in body.items() if value is not None}  # null: the default, as OpenAI's
        refuse_unhonoured(body, (*SAMPLING, "prompt"), NOT_MATH, AT_DEFAULT, "request")
        prompts = require(body, "prompt", (str, list), "request")
        prompts = [prompts] if isinstance(prompts, str) or prompts and isinstance(prompts[0], int) else prompts
        if not prompts or len(prompts) > self.limits.max_prompts:
            raise ApiError(400, f"prompt: expected 1 to {self.limits.max_prompts} prompts (--max-prompts)",
                           param="prompt")
        tokenizer, longest = self.engine.tokenizer, self.limits.max_prompt_tokens
        if any(isinstance(p, str) and len(p) > 64 * longest for p in prompts):  # before tokenizing it
            raise ApiError(400, f"prompt: longer than {longest} tokens (--max-prompt-tokens)", param="prompt")
        ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        vocabulary = self.engine.model.config.vocab_size
        if not all(isinstance(p, list) and p and all(isinstance(i, int) and 0 <= i < vocabulary for i in p)
                   for p in ids):
            raise ApiError(400, f"prompt: expected non-empty text, a list of texts, or token ids in [0, {vocabulary})",
                           param="prompt")
        logprobs = require(body, "logprobs", int, "request", 0, 20) if "logprobs" in body else None
        return self.start(body, ids, chat=False, default_max_tokens=16, logprobs=logprobs)

    def chat_completions(self, body) -> Reply:
        body = {key: value for key, value in body.items() if value is not None}
        refuse_unhonoured(body, (*SAMPLING, "messages", "max_completion_tokens", "top_logprobs"), NOT_MATH,
                          AT_DEFAULT, "request")
        messages = require(body, "messages", list, "request")
        if not messages or len(messages) > self.limits.max_prompt_tokens:  # a message is a token at least
            raise ApiError(400, f"messages: expected 1 to {self.limits.max_prompt_tokens} messages",
                           param="messages")
        turns = []
        for i, message in enumerate(messages):
            role = require(message if isinstance(message, dict) else {}, "role", str, f"messages[{i}]")
            content = message.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]: text parts only
                if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                           for part in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported (this model reads "
                                        f"no images, audio or files)", param="messages")
                content = "".join(part["text"] for part in content)
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}]: expected a system, user or assistant message with text content",
                               param="messages")
            turns.append({"role": role, "content": content})
        if sum(len(t["content"]) for t in turns) > 64 * self.limits.max_prompt_tokens:
            raise ApiError(400, f"messages: longer than {self.limits.max_prompt_tokens} tokens (--max-prompt-tokens)",
                           param="messages")
        if "max_completion_tokens" in body:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        wants = require(body, "logprobs", bool, "request", default=False)
        top = require(body, "top_logprobs", int, "request", 0, 20, default=0)
        if top and not wants:
            raise ApiError(400, "top_logprobs: needs logprobs true", param="top_logprobs")
        return self.start(body, [chat_ids(self.engine.tokenizer, turns)], chat=True, default_max_tokens=256,
                          logprobs=top if wants else None)

    def start(self, body, prompts, chat: bool, default_max_tokens: int, logprobs=None) -> Reply:
        model = require(body, "model", str, "request")
        if model != self.base_id and model not in self.engine.adapters:
            raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists "
                                f"{[self.base_id, *self.engine.adapters]}", param="model", kind="not_found_error")
        rows_allowed = min(self.limits.max_prompts, self.engine.max_batch, self.engine.max_waiting)
        n = require(body, "n", int, "request", 1, rows_allowed, default=1)
        if len(prompts) * n > rows_allowed:
            raise ApiError(400, f"n: {len(prompts)} prompts x n = {len(prompts) * n} rows; this server takes at most "
                                f"{rows_allowed} a request (--max-prompts, --max-batch, --max-waiting)", param="n")
        limit = self.engine.model.config.max_position_embeddings
        max_tokens = require(body, "max_tokens", int, "request", 1, limit, default=default_max_tokens)
        longest = max(len(p) for p in prompts)
        if longest > self.limits.max_prompt_tokens:
            raise ApiError(400, f"prompt: {longest} tokens; at most {self.limits.max_prompt_tokens} "
                                f"(--max-prompt-tokens)", param="prompt")
        if longest + max_tokens > limit:
            raise ApiError(400, f"max_tokens: the prompt ({longest} tokens) and max_tokens ({max_tokens}) exceed the "
                                f"model's {limit} positions", param="max_tokens")
        sampling = self.sampling(body, max_tokens, logprobs)
        seed = require(body, "seed", int, "request", 0, SEED_LIMIT - len(prompts) * n) if "seed" in body else None
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        most = self.limits.max_stop_chars
        if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and 0 < len(s) <= most for s in stop)):
            raise ApiError(400, f"stop: expected a string or up to {MAX_STOP_STRINGS} strings of 1 to {most} "
                                f"characters (--max-stop-chars)", param="stop")
        stream = require(body, "stream", bool, "request", default=False)
        options = require(body, "stream_options", dict, "request", default={})
        ignore_eos = require(body, "ignore_eos", bool, "request", default=False)
        stop_ids = () if ignore_eos else tuple(
            {*self.engine.model.config.eos_token_ids, self.engine.tokenizer.eos_id} - {None})
        adapter = None if model == self.base_id else model
        rows = [(prompt, i * n + j) for i, prompt in enumerate(prompts) for j in range(n)]
        first = Stream(prompts[0], adapter, max_tokens, stop_ids, sampling, tuple(stop), seed)
        streams = [first] + [Stream(p, adapter, max_tokens, stop_ids, sampling, tuple(stop),
                                    None if seed is None else seed + index, index=index, events=first.events)
                             for p, index in rows[1:]]
        try:
            self.engine.submit(streams)
        except Full as e:
            raise ApiError(503, str(e), "server_busy") from None
        return Reply(streams, model, chat, stream, bool(options.get("include_usage")),
                     lambda token: self.engine.tokenizer.decode([token]))

    def sampling(self, body, max_tokens: int, logprobs) -> Sampling:
        vocabulary = self.engine.model.config.vocab_size
        bias = require(body, "logit_bias", dict, "request", default={})
        if len(bias) > 300 or not all(isinstance(k, str) and k.isdigit() and int(k) < vocabulary for k in bias):
            raise ApiError(400, f"logit_bias: expected at most 300 token ids in [0, {vocabulary}), as strings",
                           param="logit_bias")
        for key in bias:
            require(bias, key, (int, float), "request (logit_bias)", -100, 100)
        top_k = require(body, "top_k", int, "request", -1, vocabulary, default=0)
        return Sampling(
            temperature=require(body, "temperature", (int, float), "request", 0, 2, default=1.0),
            top_p=require(body, "top_p", (int, float), "request", 1e-9, 1, default=1.0), top_k=max(top_k, 0),
            min_p=require(body, "min_p", (int, float), "request", 0, 1, default=0.0),
            repetition_penalty=require(body, "repetition_penalty", (int, float), "request", 1e-3, 100, default=1.0),
            frequency_penalty=require(body, "frequency_penalty", (int, float), "request", -2, 2, default=0.0),
            presence_penalty=require(body, "presence_penalty", (int, float), "request", -2, 2, default=0.0),
            logit_bias={int(k): float(v) for k, v in bias.items()},
            min_tokens=require(body, "min_tokens", int, "request", 0, max_tokens, default=0), logprobs=logprobs)

    # --- what operators watch ----------------------------------------------------------------------------
    def health(self, _body=None) -> dict:
        if self.engine.stopped:
            raise ApiError(503, "the engine has stopped", "server_error")
        return {"status": "ok"}

    def metrics(self, _body=None) -> str:
        """Prometheus' text format: what was asked and answered, and the engine's load."""
        status = self.engine.status()
        lines = ["# TYPE minipeft_requests_total counter"]
        lines += [f'minipeft_requests_total{{route="{route}",status="{code}"}} {count}'
                  for (route, code), count in sorted(self.answered.items())]
        lines += ["# TYPE minipeft_request_seconds summary"]
        for route in sorted(self.seconds):
            count = sum(c for (r, _), c in self.answered.items() if r == route)
            lines += [f'minipeft_request_seconds_sum{{route="{route}"}} {self.seconds[route]:.6f}',
                      f'minipeft_request_seconds_count{{route="{route}"}} {count}']
        for name, kind, value in [("tokens_generated_total", "counter", status["tokens"]),
                                  ("streams_finished_total", "counter", self.engine.finished),
                                  ("forward_failures_total", "counter", self.engine.failures),
                                  ("streams_running", "gauge", status["running"]),
                                  ("streams_waiting", "gauge", status["waiting"]),
                                  ("batch_size_max", "gauge", status["widest_batch"]),
                                  ("adapters", "gauge", len(self.engine.adapters))]:
            lines += [f"# TYPE minipeft_{name} {kind}", f"minipeft_{name} {value}"]
        return "\n".join(lines) + "\n"

    def observe(self, route: str, status: int, seconds: float):
        self.answered[route, status] += 1
        self.seconds[route] += seconds

    # --- minipeft's own ----------------------------------------------------------------------------------
    def status(self, _body=None) -> dict:
        job = next((j for j in self.jobs.values() if j.state in ("starting", "training")), None)
        return {**self.engine.status(), "base": self.base_id, "training": job.view() if job else None}

    def methods(self, _body=None) -> dict:
        return {"methods": sorted(CHOICES), "tasks": TASKS}

    def check_name(self, body) -> str:
        name = require(body, "name", str, "request")
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ApiError(400, "name: expected 1 to 64 letters, digits, '-', '_' or '.'", param="name")
        return name

    def check_free(self, name: str):
        """On the engine's thread, where names are taken: so two requests for one name cannot both pass."""
        training = {j.name for j in self.jobs.values() if j.state in ("starting", "training")}
        taken = {self.base_id, *self.engine.adapters, *getattr(self.engine.model, "adapter_settings", {}), *training}
        if name in taken:
            raise ApiError(409, f"name: {name!r} is taken; choose another", param="name", kind="conflict")

    def add_adapter(self, body) -> dict:
        refuse_unhonoured(body, ("name", "path"), (), {}, "request")
        name, text = self.check_name(body), require(body, "path", str, "request")
        path = self.access.adapter_path(text)

        def load():
            self.check_free(name)
            if self.weights is not None:
                refuse_merged(self.weights, {name: path})
            config = formats.load_adapter(self.engine.model, path, name=name)
            self.engine.adapters[name] = {"method": config["peft_type"], "source": self.access.shown(str(path))}
        try:
            self.engine.call(load)
        except BadInput as e:
            raise ApiError(400, self.access.shown(str(e)), param="path") from None
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
        files = self.engine.call(lambda: formats.adapter_files(self.engine.model, name, self.base_id))
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for file_name, content in files.items():
                z.writestr(f"{name}/{file_name}", content)
        return Download(archive.getvalue(), f"{name}.zip")

    def tune(self, body) -> dict:
        refuse_unhonoured(body, ("name", "task", "method", "steps", "examples", "lr"), (), {}, "request")
        name = self.check_name(body)
        steps = require(body, "steps", int, "request", 1, 10_000, default=30)
        examples = require(body, "examples", list, "request", default=[])
        most, chars = self.limits.max_tune_examples, self.limits.max_tune_chars
        if len(examples) > most:
            raise ApiError(400, f"examples: {len(examples)}; at most {most} (--max-tune-examples)", param="examples")
        for i, example in enumerate(examples):
            for key in ("prompt", "completion"):
                text = require(example if isinstance(example, dict) else {}, key, str, f"examples[{i}]")
                if len(text) > chars:
                    raise ApiError(400, f"examples[{i}].{key}: {len(text)} characters; at most {chars} "
                                        f"(--max-tune-chars)", param="examples")
        lr = require(body, "lr", (int, float), "request", 1e-7, 1.0) if body.get("lr") is not None else None
        job = TuneJob(self.engine, name, body.get("method"), steps, require(body, "task", str, "request",
                                                                             default="examples"), examples, lr)

        def begin():  # one job at a time, and its name taken here, on the engine's thread
            if any(j.state in ("starting", "training") for j in self.jobs.values()):
                raise ApiError(409, "a training job is running; wait for it, or cancel it (DELETE /api/tune/ID)",
                               kind="conflict")
            self.check_free(name)
            self.jobs[job.id] = job
            self.engine.job = job
        self.engine.call(begin)
        return job.view()

    def tune_job(self, job_id: str, _body=None) -> dict:
        if job_id not in self.jobs:
            raise ApiError(404, f"no training job {job_id!r}", kind="not_found_error")
        return self.jobs[job_id].view()

    def cancel_tune(self, job_id: str, _body=None) -> dict:
        self.tune_job(job_id)
        self.jobs[job_id].cancelled.set()
        return self.jobs[job_id].view()
