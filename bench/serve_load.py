"""Throughput of `minipeft serve` at 1, 4 and 16 concurrent streams, against the same requests one at a time,
in one run on one machine. Half the requests ask a LoRA adapter and half the bare base, so every batch is mixed.

    .venv/bin/python bench/serve_load.py [--tokens 64] [--counts 1,4,16]

Prints a Markdown table: tokens/s over all streams, the slowest stream's seconds, time to the first token.
"""

import argparse
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

import minipeft
from minipeft.cli import build_parser
from minipeft.llama.loader import DEFAULT_DIR
from minipeft.serve import start

PROMPTS = ["Once upon a time", "def quicksort(items):", "The history of cheese", "1, 2, 3, 4,", "Dear diary,",
           "import numpy as np", "The capital of France", "A quick brown fox"]


def lora_adapter(folder: Path, weights) -> Path:
    model, _ = minipeft.load(weights, quantize="nf4")
    minipeft.add_lora(model, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], r=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    minipeft.save_adapter(model, folder)
    return folder


def one(client, i, tokens, base) -> tuple[int, float, float]:
    """(tokens made, seconds to the first, seconds in all) of one streamed request: odd ones ask the adapter."""
    started, first, made = time.perf_counter(), None, 0
    for chunk in client.completions.create(model="lora" if i % 2 else base, prompt=PROMPTS[i % len(PROMPTS)],
                                           max_tokens=tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            made = chunk.usage.completion_tokens
    return made, first or 0.0, time.perf_counter() - started


def measure(client, n, tokens, base, together: bool) -> dict:
    started = time.perf_counter()
    if together:
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda i: one(client, i, tokens, base), range(n)))
    else:
        runs = [one(client, i, tokens, base) for i in range(n)]
    seconds = time.perf_counter() - started
    return {"tokens": sum(r[0] for r in runs), "seconds": seconds, "first": max(r[1] for r in runs),
            "slowest": max(r[2] for r in runs)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_DIR))
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each request (default: %(default)s)")
    parser.add_argument("--counts", default="1,4,16", help="concurrent streams to measure (default: %(default)s)")
    args = parser.parse_args()
    folder = lora_adapter(Path(tempfile.mkdtemp()), args.weights)
    server, engine = start(build_parser().parse_args(["serve", "--weights", args.weights, "--port", "0", "--quiet",
                                                      "--adapter", f"lora={folder}"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="-", max_retries=0)
    threading.Thread(target=report, args=(client, args, Path(args.weights).name, engine)).start()
    engine.run()  # on the main thread, as `minipeft serve` runs it
    server.shutdown()


def report(client, args, base, engine):
    measure(client, 2, 8, base, together=True)  # warm up
    print(f"minipeft serve, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"max_tokens {args.tokens}, greedy, half the streams on a LoRA adapter (r 8, six linears), NF4 base")
    print("| streams | one at a time: tokens/s | together: tokens/s | speed-up | together: slowest stream, s | "
          "first token, s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in map(int, args.counts.split(",")):
        alone, together = measure(client, n, args.tokens, base, False), measure(client, n, args.tokens, base, True)
        rate = lambda m: m["tokens"] / m["seconds"]
        print(f"| {n} | {rate(alone):.1f} | {rate(together):.1f} | {rate(together) / rate(alone):.2f}x | "
              f"{together['slowest']:.1f} | {together['first']:.2f} |", flush=True)
    engine.stop()

if __name__ == "__main__":
    main()
