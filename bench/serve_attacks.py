"""`minipeft serve` tried as an attacker would, on 127.0.0.1: each attack's outcome, as a Markdown table row, for
the checkout given (run it on an older commit's checkout too, for a before-and-after table).

    .venv/bin/python bench/serve_attacks.py                      # this checkout
    git worktree add /tmp/before <commit> && .venv/bin/python bench/serve_attacks.py --root /tmp/before

Each server is a fresh `python -m minipeft serve` process of that checkout, on the default model (--weights).
"""

import argparse
import json
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minipeft.llama.loader import DEFAULT_DIR  # noqa: E402


class Server:
    def __init__(self, root, weights, *flags):
        command = [sys.executable, "-m", "minipeft", "serve", "--weights", str(weights), "--port", "0", "--quiet",
                   *flags]
        self.process = subprocess.Popen(command, cwd=root, stderr=subprocess.PIPE, text=True)
        line = next((line for line in self.process.stderr if line.startswith(("serving", "error"))), "")
        found = re.search(r"http://[\d.]+:(\d+)/v1", line)
        self.port = int(found.group(1)) if found else None
        self.started = line.strip()
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()

    def raw(self, data: bytes, wait=5.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            try:
                s.sendall(data)
            except ConnectionError:  # refused and closed before all of it was sent: read what it said
                pass
            received = b""
            try:
                while chunk := s.recv(65536):
                    received += chunk
                    if b"\r\n\r\n" in received and not received.startswith(b"HTTP/1.1 200"):
                        break
            except (TimeoutError, ConnectionError):
                pass
            return received

    def post(self, path, body, headers=(), wait=60.0) -> bytes:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", "Connection: close",
                 f"Content-Length: {len(data)}", *headers]
        return self.raw("\r\n".join(lines).encode() + b"\r\n\r\n" + data, wait)

    def threads(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"Threads:\s+(\d+)", status).group(1))

    def close(self):
        self.process.kill()
        self.process.wait()


def status(reply: bytes) -> str:
    return reply.split(b"\r\n", 1)[0].decode(errors="replace")[9:12] or "no answer"


def attacks(root, weights):
    server = Server(root, weights)
    model = "smollm2-135m-instruct"
    rows = []
    try:
        body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode()
        rows.append(("a cross-site POST, text/plain, Origin evil.example", status(server.raw(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\nContent-Type: "
            b"text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))))
        rows.append(("DNS rebinding: Host evil.example", status(server.raw(
            b"GET /v1/models HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n"))))
        reply = server.post("/api/adapters", {"name": "x", "path": "/etc"})
        rows.append(("POST /api/adapters {path: /etc}", f"{status(reply)}, names '/etc/adapter_config.json'"
                     if b"/etc/adapter" in reply else status(reply)))
        models = server.raw(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        rows.append(("/v1/models shows an absolute path", "yes" if b'"/' in models else "no"))
        big = b"{" + b" " * (6 * 2 ** 20) + b"}"
        rows.append(("Content-Length: -1 and a 6 MiB body", status(server.raw(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
            b"-1\r\n\r\n" + big))))
        rows.append(("Content-Length: abc", status(server.raw(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: abc\r\n\r\n{}"))))
        body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2}).encode()
        chunked = server.raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                             b"\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        rows.append(("a chunked body", f"{status(chunked)}, " + (
            "read as sent" if b"text_completion" in chunked else "read as {}" if b"key '" in chunked else "refused")))
        rows.append(("a seed of 2^64 beside a 32-token stream", seed_attack(server, model)))
        rows.append(("chat content with an image part", status(server.post("/v1/chat/completions", {
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}))))
        stops = ["\u00e9" * 65536 + str(i) for i in range(4)]
        rows.append(("a request with 4 stop strings of 64k characters", status(server.post(
            "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1, "stop": stops}))))
        rows.append(("1,100 half-sent requests: the server's threads", half_sent(server, 1100)))
        reply = server.post("/v1/completions", {"model": model, "prompt": ["word " * 8000] * 16, "max_tokens": 1,
                                                "stream": True}, wait=5)
        rows.append(("16 prompts of 8k tokens in one request", status(reply)))
    finally:
        server.close()
    for name, cost in stop_check_cost(root, weights).items():
        rows.append((f"a stream's own work a token at its 512th, {name} (Stream.take, in-process)", cost))
    zero = Server(root, weights, "--max-waiting", "0")
    rows.append(("--max-waiting 0", "refused at start" if zero.port is None else "accepted"))
    zero.close()
    return rows


STOP_CHECK = """
import sys, time
from minipeft.llama.tokenizer import load_tokenizer
from minipeft.serve.streams import Stream
tokenizer = load_tokenizer(sys.argv[1])
ids = tokenizer.encode("a b c d e f g h " * 100)[:512]
for length in (0, 256, 65536):
    stop = tuple("\u00e9" * (length - 1) + str(i) for i in range(4 if length else 0))
    stream = Stream([1], None, max_tokens=10 ** 6, stop=stop)
    for token in ids[:-8]:
        stream.take(token, tokenizer.decode)
    started = time.perf_counter()
    for token in ids[-8:]:
        stream.take(token, tokenizer.decode)
    print(length, (time.perf_counter() - started) / 8)
"""


def stop_check_cost(root, weights) -> dict:
    """Seconds a stream's `take` costs a token once 504 tokens are said, without stop strings and with 4 of 256
    and 64k characters, on that checkout's code (the 64k case: the text is scanned as it grows)."""
    lines = subprocess.run([sys.executable, "-c", STOP_CHECK, str(weights)], cwd=root, capture_output=True,
                           text=True, timeout=3600).stdout.split("\n")
    names = {"0": "no stop strings", "256": "4 stop strings of 256 characters", "65536": "4 of 64k characters"}
    return {names[line.split()[0]]: f"{float(line.split()[1]) * 1e6:,.0f} us" for line in lines if line.strip()}


def seed_attack(server, model) -> str:
    results = {}

    def stream():
        results["stream"] = status(server.post("/v1/completions", {"model": model, "prompt": "1, 2,",
                                                                   "max_tokens": 32, "temperature": 0}))
    running = threading.Thread(target=stream)
    running.start()
    time.sleep(0.5)
    seeded = status(server.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2, "seed": 2 ** 64,
                                                    "temperature": 1}, wait=20))
    running.join(timeout=120)
    after = status(server.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}, wait=20))
    return f"it: {seeded}; the stream beside: {results.get('stream', 'no answer')}; a request after: {after}"


def half_sent(server, count) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 200)), hard))
    before = server.threads()
    sockets = []
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sockets.append(s)
        except OSError:
            break
    time.sleep(2)
    during = server.threads()
    for s in sockets:
        s.close()
    return f"{before} -> {during}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT), help="the checkout to serve from (default: this one)")
    parser.add_argument("--weights", default=str(DEFAULT_DIR))
    args = parser.parse_args()
    for attack, outcome in attacks(args.root, Path(args.weights).resolve()):
        print(f"| {attack} | {outcome} |", flush=True)


if __name__ == "__main__":
    main()
