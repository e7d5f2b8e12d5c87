"""One measurement of one stack in a fresh process; prints a JSON line. Driven by bench/run.py and bench/shape7b.py.

Stacks, with the same settings on both sides:
    minipeft  minipeft.load(quantize="nf4") + add_lora(q, k, v, r=8) + enable_checkpointing
    peer      transformers + BitsAndBytesConfig(nf4) + peft LoraConfig(r=8, q, k, v)
              + gradient_checkpointing_enable(use_reentrant=False)
    (--method prompt: 16 learned prompts initialised from vocabulary rows instead of LoRA, on both sides)

Tasks:
    train     median seconds per optimizer step (AdamW, batch B x T, every position labelled)
    generate  greedy tokens/s with the KV cache, 128 new tokens
    load      seconds to load the checkpoint into 4-bit
    peak      this CPU's (or GPU's) matmul peak at the dtype: the best GFLOP/s of a plain 2048^3 matmul,
              the roof that bench/run.py sets the training step's achieved GFLOP/s against
Every task also reports the process's peak memory (RSS on CPU, max_memory_allocated on CUDA), at the end
and right after the load.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_minipeft(weights, dtype, device):
    import minipeft

    return minipeft.load_model(weights, quantize="nf4", dtype=dtype, device=device)


def load_peer(weights, dtype, device, fp32_kernels=False):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(weights, quantization_config=quantization, dtype=dtype,
                                                 device_map={"": device}).eval()
    if fp32_kernels:  # bitsandbytes' default eval path on AVX512-BF16 CPUs repacks weights and computes in bf16
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def train_steps(stack, model, args, dtype, device):
    if stack.startswith("minipeft"):
        import minipeft

        if args.method == "lora":
            minipeft.add_lora(model, ["q_proj", "k_proj", "v_proj"], r=8, alpha=16)
        else:
            minipeft.add_prompt_tuning(model, num_prompts=16, init="vocab")
        minipeft.enable_checkpointing(model)
        minipeft.compile_blocks(model, enabled=stack == "minipeft-compile")  # compiles in the uncounted first step
        loss_of = lambda ids: model.loss(ids, labels=ids)
    else:
        from peft import LoraConfig, PromptTuningConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.method == "lora":
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0,
                                task_type="CAUSAL_LM")
        else:
            config = PromptTuningConfig(num_virtual_tokens=16, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        loss_of = lambda ids: model(input_ids=ids, labels=ids).loss
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    for step in range(args.steps + 1):  # the first step warms up and is not counted
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        start = sync(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(sync(device) - start)
    seconds = statistics.median(times)
    return {"step_seconds": seconds, "tokens_per_second": args.batch * args.seq / seconds, "loss": loss.item()}


@torch.no_grad()
def generate(stack, model, args, device):
    prompt = torch.tensor([[1, 563, 7071, 30, 78, 711]], device=device)  # any fixed ids
    if stack.startswith("minipeft"):
        import minipeft

        cache_mb = 0 if stack == "minipeft-no-cache" else 1024
        run = lambda n: minipeft.generate(model, prompt.tolist(), max_new_tokens=n, eos_id=-1,
                                          weight_cache_mb=cache_mb, read_codes=stack == "minipeft")[0]
    else:
        run = lambda n: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    run(8)  # warm-up
    times, tokens = [], None
    for _ in range(args.repeats):
        start = sync(device)
        tokens = run(args.new_tokens)
        times.append(sync(device) - start)
    return {"tokens_per_second": args.new_tokens / statistics.median(times), "tokens": tokens[:16]}


def matmul_peak(dtype, device, size=2048, repeats=5):
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = sync(device)
        a @ b
        best = min(best, sync(device) - start)
    return {"peak_gflops": 2 * size ** 3 / best / 1e9}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=["minipeft", "minipeft-decoded", "minipeft-no-cache", "minipeft-compile",
                                            "peer", "peer-fp32"],
                        required=True,
                        help="peer-fp32: the peer with bitsandbytes' bf16 CPU inference kernel switched off; "
                             "minipeft-decoded: generation from weights kept decoded, not the 4-bit kernel; "
                             "minipeft-no-cache: generation decoding every 4-bit weight for every token; "
                             "minipeft-compile: training with compile_blocks (--compile)")
    parser.add_argument("--task", choices=["train", "generate", "load", "peak"], required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", choices=["lora", "prompt"], default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.task == "peak":
        print(json.dumps({"stack": args.stack, "task": "peak", **matmul_peak(dtype, device)}))
        return
    start = sync(device)
    if args.stack.startswith("minipeft"):
        model = load_minipeft(args.weights, dtype, device)
    else:
        model = load_peer(args.weights, dtype, device, fp32_kernels=args.stack == "peer-fp32")
    result = {"stack": args.stack, "task": args.task, "load_seconds": sync(device) - start,
              "load_peak_memory_mb": peak_memory_mb(device)}
    if args.task == "train":
        result.update(train_steps(args.stack, model, args, dtype, device))
    elif args.task == "generate":
        result.update(generate(args.stack, model, args, device))
    result["peak_memory_mb"] = peak_memory_mb(device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
