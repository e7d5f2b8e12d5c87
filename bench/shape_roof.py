"""How fast a QLoRA step's arithmetic can go on this machine, whatever the code around it: each matmul of the step
(bench/roofline.py counts them) and its attention, timed alone at the step's own shapes, summed as the step runs
them. Set against the peak of a 2048^3 matmul, it says which share of that peak a step could reach at best, if
nothing but this arithmetic took any time (no dequantizing, no elementwise work, no Python).

    .venv/bin/python bench/shape_roof.py --dtype bf16          (the issue's step: default model, 4 x 256)

Per layer, for N = B x T tokens, each frozen linear (in -> out) runs (N, in) x (in, out) in the forward, again in
checkpointing's recompute, and (N, out) x (out, in) for the input gradient (but q, k and v of the first layer);
attention runs forward twice and backward once; lm_head runs 256 scored rows at a time (llama/loss.py), logits
and hidden gradient.
LoRA's rank-8 matmuls (under 1% of the arithmetic) are left out.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minipeft.llama.config import LlamaConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(run, repeats):
    run()  # warm-up: oneDNN builds its kernel for the shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)  # at best, as bench/worker.py measures the peak


# Each part is (make, flops of one run): make() draws the operands and returns the run, so that only the part being
# timed holds memory.

def matmul(m, k, n, dtype):
    def make():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        return lambda: torch.mm(a, b)
    return make, 2 * m * k * n


def attention(config, batch, seq, dtype, backward):
    hd, H, KV = config.head_dim, config.num_attention_heads, config.num_key_value_heads

    def make():
        q = torch.randn(batch, H, seq, hd, dtype=dtype, requires_grad=backward)
        k, v = (torch.randn(batch, KV, seq, hd, dtype=dtype, requires_grad=backward) for _ in range(2))
        grad = torch.randn(batch, H, seq, hd, dtype=dtype)

        def run():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            if backward:
                y.backward(grad)
        return run
    return make, (4 + 10 * backward) * batch * H * seq * seq * hd  # forward 4BHT^2hd; backward 10 (roofline.py)


def step_parts(config, batch, seq, dtype, chunk=256):
    """(name, make, flops of one run, runs a step): bench/roofline.py's count, LoRA left out."""
    D, I, hd, N = config.hidden_size, config.intermediate_size, config.head_dim, batch * seq
    q, kv, layers = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.num_hidden_layers
    shapes = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
              "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}
    parts = []
    for name, (i, o) in shapes.items():
        parts.append((f"{name} forward ({N}x{i} by {i}x{o})", *matmul(N, i, o, dtype), 2 * layers))  # and recompute
        no_gradient_below = name in ("q_proj", "k_proj", "v_proj")  # layer 0's: the embedding is frozen
        parts.append((f"{name} input gradient ({N}x{o} by {o}x{i})", *matmul(N, o, i, dtype),
                      layers - no_gradient_below))
    parts.append(("attention forward", *attention(config, batch, seq, dtype, False), layers))
    parts.append(("attention forward + backward", *attention(config, batch, seq, dtype, True), layers))
    V, (chunks, rest) = config.vocab_size, divmod(batch * (seq - 1), chunk)  # scored rows, a chunk at a time
    for rows, runs in ((chunk, chunks), (rest, 1)) if rest else ((chunk, chunks),):
        parts.append((f"lm_head logits ({rows}x{D} by {D}x{V})", *matmul(rows, D, V, dtype), runs))
        parts.append((f"lm_head hidden gradient ({rows}x{V} by {V}x{D})", *matmul(rows, V, D, dtype), runs))
    return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="weights/smollm2-135m-instruct", help="a checkpoint folder's config.json")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    config = LlamaConfig.from_json(Path(args.weights) / "config.json")
    make_peak, peak_flops = matmul(2048, 2048, 2048, dtype)
    peak = peak_flops / timed(make_peak(), args.repeats) / 1e9
    print(f"| part of one {args.dtype} step, {args.batch} x {args.seq} | runs | ms each | GFLOP/s | ms a step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    total_flops = total_seconds = 0
    for name, make, flops, runs in step_parts(config, args.batch, args.seq, dtype):
        seconds = timed(make(), args.repeats)
        total_flops, total_seconds = total_flops + flops * runs, total_seconds + seconds * runs
        rate, per_step = flops / seconds / 1e9, seconds * runs * 1e3
        print(f"| {name} | {runs} | {seconds * 1e3:.2f} | {rate:.0f} | {per_step:.0f} |")
    print(f"\n{total_flops / 1e9:.0f} GFLOP in {total_seconds:.2f} s at best: {total_flops / total_seconds / 1e9:.0f} "
          f"GFLOP/s, {total_flops / total_seconds / 1e9 / peak:.0%} of the 2048^3 matmul peak ({peak:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
