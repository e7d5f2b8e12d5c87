"""`minipeft serve` tried as an attacker and as an operator would, on a real server on 127.0.0.1 over a tiny
random model (the default tokenizer, so text prompts work): who may call what, every bound a caller could push
on, an engine no request can break, the endpoints and sampling settings operators expect, and a soak."""

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from types import SimpleNamespace

import openai
import pytest
import torch

import minipeft
from minipeft.cli import build_parser
from minipeft.errors import BadInput
from minipeft.serve import start
from minipeft.serve import http as serve_http
from minipeft.serve import streams as serve_streams
from minipeft.serve.streams import Stream
from tests.helpers import tiny_with_adapters

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tiny(default_weights, tmp_path_factory):
    """A random Llama of the default tokenizer's vocabulary, and a LoRA adapter for it in an adapter dir."""
    folder = tmp_path_factory.mktemp("tiny")
    weights, adapters = tiny_with_adapters(folder, default_weights)
    return SimpleNamespace(weights=weights, adapters=adapters, folder=folder)


class Served:
    def __init__(self, tiny, *flags, decode=True, adapter=True):
        lora = ["--adapter", f"lora={tiny.adapters / 'lora'}"] if adapter else []
        args = build_parser().parse_args(["serve", "--weights", str(tiny.weights), "--port", "0", "--quiet",
                                          *lora, *flags])
        self.server, self.engine = start(args)
        self.host, self.port = self.server.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.decoding = threading.Thread(target=self.engine.run, daemon=True)
        self.decoding.start()
        self.base = tiny.weights.name

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.engine.stop()
        self.decoding.join(timeout=60)

    def raw(self, data: bytes, read_all=True) -> bytes:
        """Bytes sent as they are on one connection; what comes back until the server closes it (or 2 s pass)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            s.settimeout(2 if read_all else 10)
            received = b""
            try:
                while chunk := s.recv(65536):
                    received += chunk
            except TimeoutError:
                pass
            return received

    def ask(self, method, path, body=None, headers=None, raw=None):
        """(status, JSON or text) of one request; Host, Content-Type as a client sends them unless given."""
        connection = HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=data, headers={k: v for k, v in sent.items() if v is not None})
        response = connection.getresponse()
        content = response.read()
        connection.close()
        kind = response.getheader("Content-Type") or ""
        return response.status, json.loads(content) if kind == "application/json" else content.decode()

    def complete(self, **body):
        return self.ask("POST", "/v1/completions", {"model": self.base, "prompt": "Hello there", "max_tokens": 4,
                                                    "temperature": 0, **body})


@pytest.fixture(scope="module")
def served(tiny):
    server = Served(tiny, "--adapter-dir", str(tiny.adapters), "--max-connections", "8", "--timeout", "2",
                    "--max-prompts", "4", "--max-prompt-tokens", "64", "--max-stop-chars", "16",
                    "--max-tune-examples", "2", "--max-tune-chars", "40", "--max-body", "4096")
    yield server
    server.close()


def error_of(answer):
    status, body = answer
    return status, body["error"]["code"] if body["error"]["code"] else body["error"]["message"]


# --- access ---------------------------------------------------------------------------------------------------
def test_on_loopback_other_sites_and_rebound_names_are_refused(served):
    assert served.complete()[0] == 200
    assert error_of(served.ask("GET", "/v1/models", headers={"Host": "evil.example:80"})) == (403, "bad_host")
    for origin in ("http://evil.example", "null", f"http://localhost:{served.port + 1}"):
        assert error_of(served.ask("POST", "/api/tune", {"name": "x", "task": "fox"},
                                   headers={"Origin": origin})) == (403, "bad_origin")
    same_site = served.ask("GET", "/v1/models", headers={"Origin": f"http://127.0.0.1:{served.port}"})
    assert same_site[0] == 200
    status, body = served.ask("POST", "/v1/completions", headers={"Content-Type": "text/plain"},
                              raw=json.dumps({"model": served.base, "prompt": "x"}).encode())
    assert status == 415 and "application/json" in body["error"]["message"]  # a form cannot post JSON
    models = served.ask("GET", "/v1/models")[1]["data"]
    assert [(m["id"], m["source"]) for m in models] == [(served.base, served.base), ("lora", "lora")]  # no paths


def test_an_api_key_is_asked_of_every_route_but_the_page(tiny):
    server = Served(tiny, "--api-key", KEY)
    try:
        for path in ("/v1/models", "/api/status", "/health", "/metrics"):
            status, body = server.ask("GET", path)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", path
            assert body["error"]["type"] == "invalid_request_error"
        assert server.ask("GET", "/v1/models", headers={"Authorization": "Bearer wrong-key-123"})[0] == 401
        assert server.ask("GET", "/")[0] == 200 and "minipeft serve" in server.ask("GET", "/")[1]  # the page
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=server.base, prompt="Hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong-000", max_retries=0).models.list()
    finally:
        server.close()


def test_beyond_loopback_a_key_is_needed_and_admin_needs_allow_admin(tiny, monkeypatch):
    monkeypatch.delenv("MINIPEFT_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--weights", str(tiny.weights), "--port", "0", "--host", "0.0.0.0"])
    with pytest.raises(BadInput, match="--host 0.0.0.0: .* needs --api-key"):
        start(args)
    args = build_parser().parse_args(["serve", "--weights", str(tiny.weights), "--max-waiting", "0"])
    with pytest.raises(BadInput, match="--max-waiting"):
        start(args)
    monkeypatch.setenv("MINIPEFT_API_KEY", KEY)
    server = Served(tiny, "--host", "0.0.0.0", "--adapter-dir", str(tiny.adapters))
    key = {"Authorization": f"Bearer {KEY}", "Host": "server.lan:8000"}
    try:
        assert server.ask("GET", "/v1/models")[0] == 401
        assert server.ask("GET", "/v1/models", headers=key)[0] == 200  # any name reaches it; the key is the guard
        for method, path, body in [("POST", "/api/adapters", {"name": "again", "path": "lora"}),
                                   ("POST", "/api/tune", {"name": "x", "task": "fox"}),
                                   ("DELETE", "/api/adapters/lora", None)]:
            assert error_of(server.ask(method, path, body, headers=key)) == (403, "admin_only"), path
    finally:
        server.close()
    server = Served(tiny, "--host", "0.0.0.0", "--adapter-dir", str(tiny.adapters), "--allow-admin")
    try:
        status, added = server.ask("POST", "/api/adapters", {"name": "again", "path": "lora"}, headers=key)
        assert status == 200 and added["source"] == "lora"
    finally:
        server.close()


def test_adapters_load_only_from_the_adapter_dir_and_no_reply_shows_a_path(served, tiny):
    (tiny.folder / "outside").mkdir(exist_ok=True)
    link = tiny.adapters / "link"
    if not link.exists():
        link.symlink_to(tiny.folder / "outside")
    for path, code in [(str(tiny.adapters / "lora"), "bad_path"), ("../adapters/lora", "bad_path"),
                       ("link", "bad_path"), ("/etc", "bad_path")]:
        assert error_of(served.ask("POST", "/api/adapters", {"name": "x", "path": path})) == (400, code), path
    status, body = served.ask("POST", "/api/adapters", {"name": "x", "path": "missing"})
    assert status == 400 and str(tiny.folder) not in json.dumps(body) and "missing" in body["error"]["message"]
    server = Served(tiny)  # no --adapter-dir: nothing is loaded from a path
    try:
        assert error_of(server.ask("POST", "/api/adapters", {"name": "x", "path": "lora"})) == (403, "no_paths")
    finally:
        server.close()


def test_an_adapter_merged_into_the_served_base_is_refused_at_start_and_on_load(tiny):
    """The base's config.json says the LoRA is folded in (as `minipeft merge` writes it): applying it again, by
    --adapter or POST /api/adapters, is refused."""
    import shutil

    from minipeft.bases import adapter_digest

    merged = tiny.folder / "merged-base"
    if not merged.exists():
        shutil.copytree(tiny.weights, merged)
        config = json.loads((merged / "config.json").read_text())
        config["minipeft_merged"] = [{"peft_type": "LORA", "sha256": adapter_digest(tiny.adapters / "lora")}]
        (merged / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="adapter .lora. .* is already merged into the base merged-base"):
        Served(SimpleNamespace(weights=merged, adapters=tiny.adapters))
    server = Served(SimpleNamespace(weights=merged, adapters=tiny.adapters), "--adapter-dir", str(tiny.adapters),
                    adapter=False)
    try:
        status, body = server.ask("POST", "/api/adapters", {"name": "again", "path": "lora"})
        assert status == 400 and "is already merged into the base merged-base" in body["error"]["message"], body
        assert str(tiny.folder) not in body["error"]["message"]  # no absolute path in a reply
        assert server.ask("GET", "/v1/models")[1]["data"][1:] == []  # nothing was loaded
    finally:
        server.close()


# --- the HTTP layer -------------------------------------------------------------------------------------------
def request_bytes(served, body: bytes, *headers) -> bytes:
    lines = [b"POST /v1/completions HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_content_length_and_chunked_bodies_are_read_or_refused_properly(served):
    body = json.dumps({"model": served.base, "prompt": "Hi", "max_tokens": 2}).encode()
    for length in (b"-1", b"abc", b"1e3", b"+5", b"5, 5"):
        reply = served.raw(request_bytes(served, body, b"Content-Length: " + length))
        assert reply.startswith(b"HTTP/1.1 400"), length
    two = served.raw(request_bytes(served, body, b"Content-Length: 5", b"Content-Length: 5"))
    assert two.startswith(b"HTTP/1.1 400")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    reply = served.raw(request_bytes(served, chunked + b"0\r\n\r\n", b"Transfer-Encoding: chunked"))
    assert reply.startswith(b"HTTP/1.1 200") and b'"text_completion"' in reply  # read as sent, not as {}
    too_long = b"%x\r\n%s\r\n0\r\n\r\n" % (5000, b"x" * 5000)
    assert served.raw(request_bytes(served, too_long, b"Transfer-Encoding: chunked")).startswith(b"HTTP/1.1 413")
    bad = served.raw(request_bytes(served, b"zz\r\nabc\r\n0\r\n\r\n", b"Transfer-Encoding: chunked"))
    assert bad.startswith(b"HTTP/1.1 400")
    assert served.raw(request_bytes(served, body, b"Transfer-Encoding: gzip")).startswith(b"HTTP/1.1 501")


def test_after_a_413_the_unread_body_is_never_read_as_the_next_request(served):
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    reply = served.raw(request_bytes(served, smuggled, b"Content-Length: 999999"))
    assert reply.startswith(b"HTTP/1.1 413") and reply.count(b"HTTP/1.1") == 1  # closed, not answered twice
    refused = served.raw(b"POST /v1/nowhere HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
    assert refused.startswith(b"HTTP/1.1 403") and refused.count(b"HTTP/1.1") == 1


def half_sent(served, count):
    slow = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", served.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append(s)
    time.sleep(0.3)
    return slow


def test_connections_are_capped_and_slow_senders_are_cut_off(served):
    before = threading.active_count()
    slow = half_sent(served, 8)  # --max-connections 8: each sends half a request and waits
    assert served.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").startswith(b"HTTP/1.1 503")
    assert threading.active_count() <= before + 8
    trickle = slow[0]
    deadline = time.time() + 8  # --timeout 2: a sender that trickles a byte a second is still cut off
    while time.time() < deadline:
        try:
            trickle.sendall(b"X")
            if trickle.recv(1, socket.MSG_DONTWAIT) == b"":
                break
        except BlockingIOError:
            pass
        except OSError:
            break
        time.sleep(0.5)
    assert time.time() < deadline
    for s in slow:
        s.close()
    time.sleep(0.5)
    assert served.complete()[0] == 200
    pool = threading.active_count()
    for s in half_sent(served, 8) + half_sent(served, 8):  # the second eight: a 503 each, no new thread
        s.close()
    assert threading.active_count() == pool <= before + 8  # the pool's workers, reused, not one per socket


def test_a_hang_up_is_seen_on_descriptors_above_1024():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip("this process may not open descriptors above 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    ours, theirs = socket.socketpair()
    high = socket.socket(fileno=os.dup2(ours.fileno(), 1050))
    try:
        assert not serve_http.client_gone(high)  # select() failed here, and read as a hang-up
        theirs.sendall(b"more")
        assert not serve_http.client_gone(high)
        theirs.close()
        high.recv(10)
        assert serve_http.client_gone(high)
    finally:
        high.close()
        ours.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- limits ---------------------------------------------------------------------------------------------------
def test_every_size_a_caller_chooses_is_bounded(served):
    long_text = "word " * 200  # > --max-prompt-tokens 64
    for body, named in [({"stop": ["x" * 17]}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                        ({"seed": 2 ** 64}, "seed"), ({"seed": -1}, "seed"), ({"seed": 2 ** 63 - 1, "n": 2}, "seed"),
                        ({"prompt": ["a"] * 5}, "prompt"), ({"prompt": ["a", "b"], "n": 3}, "n"),
                        ({"prompt": long_text}, "prompt"), ({"n": 0}, "n"), ({"top_k": -2}, "top_k"),
                        ({"logit_bias": {"49152": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                        ({"min_tokens": 9}, "min_tokens"), ({"logprobs": 21}, "logprobs")]:
        status, answer = served.complete(**body)
        assert status == 400 and named in answer["error"]["message"] + str(answer["error"]["param"]), body
    # the longest of several prompts, with max_tokens, must fit the context (256), not the first
    status, answer = served.complete(prompt=["Hi", "word " * 60], max_tokens=200)
    assert status == 400 and "positions" in answer["error"]["message"]
    assert served.complete(seed=2 ** 63 - 1)[0] == 200
    examples = [{"prompt": "a", "completion": "b"}] * 3
    assert "--max-tune-examples" in served.ask("POST", "/api/tune", {"name": "t", "examples": examples})[1][
        "error"]["message"]
    long_example = [{"prompt": "a" * 41, "completion": "b"}]
    assert "--max-tune-chars" in served.ask("POST", "/api/tune", {"name": "t", "examples": long_example})[1][
        "error"]["message"]
    status, answer = served.ask("POST", "/v1/chat/completions", {"model": served.base, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {}}]}]})
    assert status == 400 and "only text parts" in answer["error"]["message"]  # refused, not dropped


def test_a_request_that_can_never_fit_the_queue_is_a_400(tiny):
    server = Served(tiny, "--max-waiting", "2")
    try:
        status, answer = server.complete(prompt=["a", "b", "c"])
        assert status == 400 and "--max-waiting" in answer["error"]["message"]
        assert server.complete(prompt=["a", "b"])[0] == 200
    finally:
        server.close()


def test_the_stop_scan_reads_each_character_once(monkeypatch):
    """Long stop strings cost each token the text it adds, not all the text so far; the answer is what a plain
    search of the whole text gives."""
    scanned = []
    real_scan = serve_streams.scan
    monkeypatch.setattr(serve_streams, "scan", lambda text, s, table: scanned.append(len(text)) or
                        real_scan(text, s, table))
    words = ["ab", "ra", "ca", "da", "br", "a!"] * 400
    decode = lambda ids: "".join(words[i] for i in ids)
    stops = ("x" * 250 + "y", "ab" * 120 + "z", "cadab" * 40 + "q", "!abr" * 50 + "?")
    stream = Stream([1], None, max_tokens=2400, stop=stops)
    for token in range(2400):
        if stream.take(token, decode):
            break
    said = "".join(event[2] for event in stream.events.queue if event[0] == "text")
    assert said == decode(range(2400)) and max(scanned) <= 250 + 2  # the held-back part and one token
    assert serve_streams.scan("xxabcab", "abcab", serve_streams.failure("abcab")) == (2, 0)
    assert serve_streams.scan("zzabca", "abcab", serve_streams.failure("abcab")) == (None, 4)


# --- an engine no request can break ---------------------------------------------------------------------------
def test_a_request_that_fails_to_start_fails_alone(served):
    """A bad seed past the checks, or a prefill that runs out of memory: that request gets an error, a stream
    decoding beside it goes on to its end, and the server answers after."""
    engine = served.engine
    running = Stream(served.engine.tokenizer.encode("Once upon a time"), None, max_tokens=40, stop_ids=())
    engine.submit([running])
    while not running.tokens:
        time.sleep(0.01)
    bad_seed = Stream([5, 6], None, max_tokens=4, seed=2 ** 64)
    engine.submit([bad_seed])
    real_forward = engine.forward

    def failing(ids, mask=None, cache=None):
        if ids.shape[1] == 3:  # the prefill of the three-token prompt below
            raise RuntimeError("out of memory (a test)")
        return real_forward(ids, mask, cache)
    engine.forward = failing
    try:
        big = Stream([7, 8, 9], None, max_tokens=4)
        engine.submit([big])
        events = [running.events.get(timeout=60) for _ in range(2)]  # whatever it says, it keeps going
        assert bad_seed.events.get(timeout=60)[0] == "error" and big.events.get(timeout=60)[0] == "error"
    finally:
        engine.forward = real_forward
    while (event := running.events.get(timeout=60))[0] == "text":
        events.append(event)
    assert event[0] == "end" and event[3]["completion_tokens"] == 40 and events
    assert served.complete()[0] == 200 and served.ask("GET", "/health") == (200, {"status": "ok"})


def test_two_requests_for_one_name_cannot_both_take_it(served):
    release = threading.Event()
    holding = threading.Thread(target=served.engine.call, args=(release.wait,))
    holding.start()  # both requests pass their checks while the engine is held; one takes the name
    with ThreadPoolExecutor(2) as pool:
        tune = pool.submit(served.ask, "POST", "/api/tune", {"name": "same", "task": "fox", "steps": 1})
        load = pool.submit(served.ask, "POST", "/api/adapters", {"name": "same", "path": "lora"})
        time.sleep(0.5)
        release.set()
        statuses = sorted([tune.result()[0], load.result()[0]])
    holding.join()
    assert statuses == [200, 409]
    while any(j.state in ("starting", "training") for j in served.engine.job and [served.engine.job] or []):
        time.sleep(0.05)
    served.ask("DELETE", "/api/adapters/same")


# --- what operators expect ------------------------------------------------------------------------------------
def test_health_and_metrics(served):
    assert served.ask("GET", "/health") == (200, {"status": "ok"})
    served.complete()
    status, text = served.ask("GET", "/metrics")
    assert status == 200 and "# TYPE minipeft_requests_total counter" in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[0] != "#"}
    assert values['minipeft_requests_total{route="completions",status="200"}'] >= 1
    assert values["minipeft_tokens_generated_total"] >= 4 and "minipeft_streams_waiting" in values
    assert values['minipeft_request_seconds_count{route="completions"}'] >= 1


def test_logprobs_are_the_models_own(served, tiny):
    model, tokenizer = minipeft.load(tiny.weights, quantize="nf4")
    prompt = tokenizer.encode("Hello there")
    status, answer = served.complete(max_tokens=5, logprobs=3)
    assert status == 200
    logprobs = answer["choices"][0]["logprobs"]
    tokens = [tokenizer.encode(t, add_bos=False) for t in logprobs["tokens"]]
    ids = minipeft.generate(model, [prompt], 5, eos_id=-1)[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1].float(), -1)
    assert len(logprobs["token_logprobs"]) == 5 and all(len(t) == 1 for t in tokens)
    for i, token in enumerate(ids):
        assert abs(logprobs["token_logprobs"][i] - expected[i, token].item()) < 1e-3
        top = expected[i].topk(3)
        assert list(logprobs["top_logprobs"][i].values()) == pytest.approx(top.values.tolist(), abs=1e-3)
    assert logprobs["text_offset"][0] == 0 and answer["choices"][0]["text"] == "".join(logprobs["tokens"])
    status, chat = served.ask("POST", "/v1/chat/completions", {"model": served.base, "max_tokens": 3,
                                                               "messages": [{"role": "user", "content": "Hi"}],
                                                               "logprobs": True, "top_logprobs": 2})
    content = chat["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["logprob"] <= 0 and content[0]["bytes"] == list(content[0]["token"].encode())


def test_n_bias_and_min_tokens(served):
    tokenizer = served.engine.tokenizer
    status, answer = served.complete(n=3, temperature=1.0, seed=11, max_tokens=6)
    alone = [served.complete(temperature=1.0, seed=11 + i, max_tokens=6)[1]["choices"][0]["text"] for i in range(3)]
    assert status == 200 and [c["text"] for c in answer["choices"]] == alone  # row i draws with seed + i
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    forced = tokenizer.encode(" cheese", add_bos=False)[0]
    answer = served.complete(logit_bias={str(forced): 100}, max_tokens=3)[1]
    assert answer["choices"][0]["text"] == tokenizer.decode([forced] * 3)
    eos = 2
    assert served.complete(logit_bias={str(eos): 100})[1]["usage"]["completion_tokens"] == 0  # ends at once
    answer = served.complete(logit_bias={str(eos): 100}, min_tokens=3)[1]
    assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["finish_reason"] == "stop"
    answer = served.complete(logit_bias={str(eos): 100}, ignore_eos=True, max_tokens=4)[1]
    assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["finish_reason"] == "length"
    penalised = served.complete(max_tokens=12, frequency_penalty=2.0, presence_penalty=1.0,
                                repetition_penalty=1.3)
    assert penalised[0] == 200


def test_penalties_and_cuts_are_as_openai_and_transformers_define_them():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                         TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from minipeft.llama.generate import kept
    from minipeft.serve.sampling import Sampling, adjusted

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, generator=generator) * 3
    prompt, made = [3, 7, 7, 250], [7, 9, 9, 9, 11]
    settings = Sampling(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.25,
                        logit_bias={11: -2.0, 12: 5.0})
    ours = adjusted(logits, settings, prompt, made, stop_ids=(2,))
    expected = logits.clone()
    expected[11] -= 2.0
    expected[12] += 5.0
    expected = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([prompt + made]), expected[None])[0]
    for token in set(made):  # OpenAI: mu - c * frequency - [c > 0] * presence
        expected[token] -= made.count(token) * 0.5 + 0.25
    assert torch.allclose(ours, expected)
    assert adjusted(logits, Sampling(min_tokens=9), prompt, made, stop_ids=(2, 5))[[2, 5]].isneginf().all()
    for temperature, top_k, top_p, min_p in [(0.7, 50, 0.9, 0.05), (1.3, 0, 0.5, 0.0), (1.0, 5, 1.0, 0.2)]:
        scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        for warper in [TopKLogitsWarper(top_k) if top_k else None, TopPLogitsWarper(top_p),
                       MinPLogitsWarper(min_p) if min_p else None]:
            scores = warper(None, scores) if warper else scores
        theirs = torch.softmax(scores, -1)[0]
        probs, order = kept(logits[None], temperature, top_p, top_k, min_p)
        ours = torch.zeros(300).scatter(0, order[0], probs[0])
        assert torch.equal(ours > 0, theirs > 0)
        assert torch.allclose(ours / ours.sum(), theirs, atol=1e-6)


# --- the soak ---------------------------------------------------------------------------------------------------
def test_soak_200_requests_good_bad_hung_up_and_slow(tiny):
    """200 requests from 8 clients at once: good ones (both models, streamed or not, sampling settings), malformed
    ones, ones that hang up mid-stream, slow senders. After: every good one answered as alone, the server answers,
    and it holds no extra threads, streams or memory."""
    import resource

    server = Served(tiny, "--timeout", "1", "--max-connections", "16")
    model, tokenizer = minipeft.load(tiny.weights, quantize="nf4")
    minipeft.load_adapter(model, tiny.adapters / "lora", name="lora")
    expected = {}
    for name in (server.base, "lora"):
        minipeft.set_adapter(model, None if name == server.base else "lora")
        ids = tokenizer.encode("Hello there")
        expected[name] = tokenizer.decode(minipeft.generate(model, [ids], 6)[0])

    def good(i):
        name, streamed = (server.base, "lora")[i // 4 % 2], i // 8 % 2  # i is 0, 4, 8, ...
        if streamed:  # read as the bytes come
            body = json.dumps({"model": name, "prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                               "stream": True}).encode()
            reply = server.raw(request_bytes(server, body, b"Content-Length: %d" % len(body)), read_all=False)
            events = reply.split(b"\r\n\r\n", 1)[1].decode().split("\n\n")
            text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {"))
            return text == expected[name]
        status, answer = server.complete(model=name, max_tokens=6, top_k=40 if i % 3 else 0)  # greedy all the same
        return status == 200 and answer["choices"][0]["text"] == expected[name]

    def malformed(i):
        bodies = [b"{not json", b"[1]", json.dumps({"model": server.base, "prompt": "x", "seed": 2 ** 64}).encode(),
                  json.dumps({"model": "nope", "prompt": "x"}).encode(), b"\xff\xfe"]
        status, _ = server.ask("POST", "/v1/completions", raw=bodies[i % len(bodies)])
        return status in (400, 404)

    def hung_up(i):
        body = json.dumps({"model": server.base, "prompt": "Once", "max_tokens": 200, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(request_bytes(server, body, b"Content-Length: %d" % len(body)))
            received = b""
            while received.count(b"data: ") < 2:
                received += s.recv(4096)
        return True

    def slow(i):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n{")
            s.settimeout(5)
            return s.recv(4096) in (b"",) or True  # cut off by the deadline

    kinds = [good, malformed, hung_up, slow]
    try:
        assert server.complete()[0] == 200
        threads, memory = threading.active_count(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.time()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: (kinds[i % 4].__name__, kinds[i % 4](i)), range(200)))
        seconds = time.time() - started
        failed = [r for r in results if not r[1]]
        assert not failed, failed[:5]
        deadline = time.time() + 10
        while (server.engine.running or server.engine.waiting) and time.time() < deadline:
            time.sleep(0.1)
        assert not server.engine.running and not server.engine.waiting
        assert server.complete(model="lora", max_tokens=6)[1]["choices"][0]["text"] == expected["lora"]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory
        print(f"soak: 200 requests in {seconds:.1f} s; threads {threads} -> {threading.active_count()}; "
              f"peak memory +{grown / 1024:.1f} MiB")
        assert threading.active_count() <= threads + 16  # the pool: at most --max-connections workers
        assert grown < 200 * 1024
    finally:
        server.close()
