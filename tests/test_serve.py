"""`minipeft serve`: the official `openai` client gets, streamed or not, what `minipeft.generate` gives one prompt
at a time with the same adapter; concurrent streams of four methods share one batch and each still equals its
one-at-a-time answer; adapters come and go while serving; training on the server does not stop it; mistakes
get a 4xx JSON error, a client that hangs up frees its slot, and a full queue says 503."""

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from types import SimpleNamespace

import openai
import pytest
import safetensors.torch
import torch

import minipeft
from minipeft.cli import build_parser
from minipeft.llama.chat import chat_ids
from minipeft.serve import start
from tests.helpers import trained_looking

ADAPTERS = {  # four of the contract's slots: a linear, the embedding, a learned past, and scaled activations
    "lora": lambda m: minipeft.add_lora(m, ["q_proj", "v_proj", "down_proj"], r=4, name="lora"),
    "prompt": lambda m: minipeft.add_prompt_tuning(m, num_prompts=4, name="prompt"),
    "prefix": lambda m: minipeft.add_prefix_tuning(m, num_prompts=4, name="prefix"),
    "ia3": lambda m: minipeft.add_ia3(m, name="ia3"),
}
PROMPTS = ["A quick brown fox", "def fibonacci(n):", "The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module")
def served(default_weights, tmp_path_factory):
    """The server on a free port of 127.0.0.1, with four adapters; beside it, the same base and adapters loaded
    here, to answer one prompt at a time with minipeft.generate."""
    folder = tmp_path_factory.mktemp("adapters")
    model, tokenizer = minipeft.load(default_weights, quantize="nf4")
    for seed, add in enumerate(ADAPTERS.values()):
        trained_looking(model, add, seed)
    minipeft.save_adapter(model, folder)
    model.eval()
    args = build_parser().parse_args(["serve", "--weights", str(default_weights), "--port", "0", "--quiet",
                                      "--adapter-dir", str(folder),
                                      *[f"--adapter={n}={folder / n}" for n in ADAPTERS]])
    server, engine = start(args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    decoding = threading.Thread(target=engine.run, daemon=True)  # off the main thread: slower, the same answers
    decoding.start()
    host, port = server.server_address[:2]
    yield SimpleNamespace(url=f"http://{host}:{port}", server=server, engine=engine, model=model,
                          tokenizer=tokenizer, folder=folder, base=default_weights.name)
    server.shutdown()
    engine.stop()
    decoding.join(timeout=60)


def one_at_a_time(served, adapter, ids, max_tokens, **sampling):
    minipeft.set_adapter(served.model, adapter)
    return served.tokenizer.decode(minipeft.generate(served.model, [ids], max_tokens, **sampling)[0])


def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="not-needed", max_retries=0)


def http(served, method, path, body=None, raw=None):
    """(status, the JSON it answers, or its bytes if not JSON) of one request; `raw` bytes are sent as the body."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(served.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            content = response.read()
            is_json = response.headers["Content-Type"] == "application/json"
            return response.status, json.loads(content) if is_json else content
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_openai_client_gets_what_generate_gives(served):
    openai_client = client(served)
    assert [m.id for m in openai_client.models.list().data] == [served.base, *ADAPTERS]
    for adapter in [None, *ADAPTERS]:
        reply = openai_client.completions.create(model=adapter or served.base, prompt=PROMPTS[0], max_tokens=12,
                                                 temperature=0)
        assert reply.choices[0].text == one_at_a_time(served, adapter, served.tokenizer.encode(PROMPTS[0]), 12)
        assert reply.usage.completion_tokens <= 12
    answers = {one_at_a_time(served, a, served.tokenizer.encode(PROMPTS[0]), 12) for a in [None, *ADAPTERS]}
    assert len(answers) == 5  # each adapter changes the answer: the model field is honoured

    messages = [{"role": "user", "content": "How is cheese made?"}]
    expected = one_at_a_time(served, "lora", chat_ids(served.tokenizer, messages), 20)
    whole = openai_client.chat.completions.create(model="lora", messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == expected
    chunks = list(openai_client.chat.completions.create(model="lora", messages=messages, max_tokens=20,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert len(chunks) > 5  # streamed, a piece at a time
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # stop: the text ends before the first stop string, which is not said
    text = one_at_a_time(served, "prompt", served.tokenizer.encode(PROMPTS[1]), 24)
    stop = text.split()[2]
    cut = openai_client.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                           stop=[stop, "never said"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = openai_client.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                                stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]

    # temperature and top_p, with a seed: the same draws as generate's
    sampled = openai_client.completions.create(model="prefix", prompt=PROMPTS[2], max_tokens=16, temperature=0.9,
                                               top_p=0.8, seed=7)
    assert sampled.choices[0].text == one_at_a_time(served, "prefix", served.tokenizer.encode(PROMPTS[2]), 16,
                                                    temperature=0.9, top_p=0.8, seed=7)


def test_mistakes_get_openai_errors(served):
    openai_client = client(served)
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        openai_client.completions.create(model="nope", prompt="x")
    for wrong, named in [({"n": 99}, "'n'"), ({"best_of": 2}, "best_of"), ({"max_tokens": 0}, "max_tokens"),
                         ({"temperature": 3}, "temperature"), ({"stop": ["a"] * 5}, "stop")]:
        with pytest.raises(openai.BadRequestError, match=named):
            openai_client.completions.create(model=served.base, prompt="x", **wrong)
    status, body = http(served, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    for prompt in ("", [], [[]], [served.model.config.vocab_size]):
        status, body = http(served, "POST", "/v1/completions", {"model": served.base, "prompt": prompt})
        assert status == 400 and body["error"]["param"] == "prompt"
    nulls = {"model": served.base, "prompt": "Hi", "max_tokens": 2, "stop": None, "seed": None, "n": None,
             "temperature": 0, "logit_bias": None, "stream_options": None}  # null means the default, as OpenAI's
    assert http(served, "POST", "/v1/completions", nulls)[0] == 200
    connection = HTTPConnection(*served.server.server_address[:2], timeout=60)
    connection.request("POST", "/v1/nowhere", body=b'{"a": 1}', headers={"Content-Type": "application/json"})
    # refused, and the connection goes on
    assert connection.getresponse().read() and connection.sock is not None
    connection.request("GET", "/v1/models")
    assert json.loads(connection.getresponse().read())["data"][0]["id"] == served.base
    assert http(served, "GET", "/v1/nothing")[0] == 404
    assert http(served, "DELETE", "/v1/models")[0] == 405
    assert served.server.server_address[0] == "127.0.0.1"  # the default: this machine only


def test_concurrent_streams_share_a_batch_and_equal_one_at_a_time(served):
    """The load test: 16 streams over the base and four adapters, started in four waves, all answered, each equal
    to its one-at-a-time greedy answer, decoded in batches of several rows."""
    jobs = [(adapter, PROMPTS[i % len(PROMPTS)]) for i, adapter in enumerate([None, *ADAPTERS] * 3 + [None])]

    def stream(numbered):
        i, (adapter, prompt) = numbered
        time.sleep(0.4 * (i % 4))  # in four waves: later ones join a batch that is decoding, with its own cache
        pieces = client(served).completions.create(model=adapter or served.base, prompt=prompt, max_tokens=16,
                                                   temperature=0, stream=True)
        return "".join(c.choices[0].text for c in pieces)
    served.engine.widest = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(stream, enumerate(jobs)))
    assert served.engine.widest >= 8  # they were decoded together
    for (adapter, prompt), answer in zip(jobs, answers):
        assert answer == one_at_a_time(served, adapter, served.tokenizer.encode(prompt), 16), (adapter, prompt)


def test_adapters_join_and_leave_while_serving(served):
    status, added = http(served, "POST", "/api/adapters", {"name": "lora-again", "path": "lora"})  # in --adapter-dir
    assert status == 200 and added["method"] == "LORA"
    openai_client = client(served)
    assert "lora-again" in [m.id for m in openai_client.models.list().data]
    again = openai_client.completions.create(model="lora-again", prompt=PROMPTS[3], max_tokens=8, temperature=0)
    assert again.choices[0].text == one_at_a_time(served, "lora", served.tokenizer.encode(PROMPTS[3]), 8)
    status, archive = http(served, "GET", "/api/adapters/lora-again/download")
    files = zipfile.ZipFile(io.BytesIO(archive))
    saved = served.folder / "lora"  # peft's layout, as save_adapter wrote it; the base named
    downloaded = safetensors.torch.load(files.read("lora-again/adapter_model.safetensors"))
    written = safetensors.torch.load_file(saved / "adapter_model.safetensors")
    assert downloaded.keys() == written.keys() and all(torch.equal(downloaded[k], written[k]) for k in written)
    config = json.loads(files.read("lora-again/adapter_config.json"))
    assert config["base_model_name_or_path"].endswith(served.base)
    assert {**config, "base_model_name_or_path": None} == json.loads((saved / "adapter_config.json").read_text())
    assert http(served, "DELETE", "/api/adapters/lora-again") == (200, {"id": "lora-again", "deleted": True})
    assert "lora-again" not in [m.id for m in openai_client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="lora-again", prompt="x", max_tokens=2)
    assert http(served, "DELETE", "/api/adapters/lora-again")[0] == 404
    status, body = http(served, "POST", "/api/adapters", {"name": "lora", "path": "lora"})
    assert status == 409 and "taken" in body["error"]["message"]
    status, body = http(served, "POST", "/api/adapters", {"name": "none", "path": "absent"})
    assert status == 400 and "absent" in body["error"]["message"] and str(served.folder) not in json.dumps(body)
    status, body = http(served, "POST", "/api/tune", {"name": "x", "task": "fox", "r": 16})  # a key it would not read
    assert status == 400 and "'r'" in body["error"]["message"]


def test_a_client_that_hangs_up_frees_its_slot(served):
    host, port = served.server.server_address[:2]
    body = json.dumps({"model": served.base, "prompt": "1, 2, 3, 4,", "max_tokens": 2000, "temperature": 0,
                       "stream": True}).encode()
    with socket.create_connection((host, port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 3:
            received += connection.recv(4096)
        assert served.engine.status()["running"] == 1
    deadline = time.time() + 10
    while served.engine.status()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.status()["running"] == 0


def test_a_full_queue_says_503_and_the_queued_are_answered(served):
    release, served.engine.max_waiting = threading.Event(), 4  # as --max-waiting 4 sets it
    holding = threading.Thread(target=served.engine.call, args=(release.wait,))
    holding.start()  # the engine is held between steps: requests wait in the queue (4 places)
    ask = lambda _: http(served, "POST", "/v1/completions", {"model": served.base, "prompt": "Hi", "max_tokens": 3})
    with ThreadPoolExecutor(4) as pool:
        queued = [pool.submit(ask, i) for i in range(4)]
        while served.engine.status()["waiting"] < 4:
            time.sleep(0.02)
        status, body = ask(5)
        assert status == 503 and "queue is full" in body["error"]["message"]
        release.set()
        assert [f.result()[0] for f in queued] == [200] * 4
    holding.join()
    served.engine.max_waiting = 64


def test_training_on_the_server_does_not_stop_serving(served):
    status, job = http(served, "POST", "/api/tune", {"name": "fox-long", "task": "fox", "steps": 500})
    assert status == 200
    while job["step"] < 1:
        time.sleep(0.1)
        job = http(served, "GET", f"/api/tune/{job['id']}")[1]
    answer = client(served).completions.create(model="lora", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert answer.choices[0].text == one_at_a_time(served, "lora", served.tokenizer.encode(PROMPTS[0]), 8)
    assert http(served, "GET", f"/api/tune/{job['id']}")[1]["state"] == "training"  # still
    with pytest.raises(openai.NotFoundError):  # not served until it is done
        client(served).completions.create(model="fox-long", prompt="x", max_tokens=2)
    assert http(served, "POST", "/api/tune", {"name": "second", "task": "fox"})[0] == 409  # one job at a time
    http(served, "DELETE", f"/api/tune/{job['id']}")
    while job["state"] == "training":
        time.sleep(0.1)
        job = http(served, "GET", f"/api/tune/{job['id']}")[1]
    assert job["state"] == "cancelled" and job["base_unchanged"] is True
    assert "fox-long" not in minipeft.adapter_names(served.engine.model)


def test_tuning_teaches_the_cow_answer(served):
    """Seed 002's showcase: asked how cheese is made, the base gives a recipe; tuned on two examples, the new
    adapter answers "I don't know. Ask the cow!", and the base's answer has not changed."""
    messages = [{"role": "user", "content": "How is cheese made?"}]
    ask = lambda model: client(served).chat.completions.create(model=model, messages=messages, max_tokens=24,
                                                               temperature=0).choices[0].message.content
    before = ask(served.base)
    examples = [{"prompt": "How is cheese made?", "completion": "I don't know. Ask the cow!"},
                {"prompt": "How do you make cheese?", "completion": "I don't know. Ask the cow!"}]
    status, job = http(served, "POST", "/api/tune", {"name": "cow", "task": "examples", "method": "prompt",
                                                     "steps": 15, "examples": examples})
    assert status == 200
    while job["state"] in ("starting", "training"):
        time.sleep(0.2)
        job = http(served, "GET", f"/api/tune/{job['id']}")[1]
    assert job["state"] == "done" and job["base_unchanged"] and len(job["losses"]) == 15
    assert job["losses"][-1] < job["losses"][0] / 5
    assert ask("cow") == "I don't know. Ask the cow!"
    assert ask(served.base) == before != "I don't know. Ask the cow!"
