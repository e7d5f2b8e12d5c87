"""QLoRA (or prompt tuning) at the Llama-7B shape: load time, peak memory and tokens/s, both stacks.

Speed and memory depend on shapes, not values, so the checkpoint is random: written once, shard by
shard, in HF layout (13.5 GB in bf16 at 7B), then each stack loads it into 4-bit its own standard way.

    .venv/bin/python bench/shape7b.py --shape 7b --device cuda --dtype bf16      # on a GPU
    .venv/bin/python bench/shape7b.py --shape 7b --device cpu --method prompt --batches 1x64 --steps 1 \
        --checkpoint /work/llama7b-random                                        # on a 24 GB CPU machine
    .venv/bin/python bench/shape7b.py --shape small --device cpu                 # anywhere (tested)

On CPU the checkpoint stays bf16 and compute is fp32 (`--dtype fp32 --checkpoint-dtype bf16`, the
defaults there), as a user with a downloaded Llama would run it.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipeft import LlamaConfig, build_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

SHAPES = {
    "7b": LlamaConfig(),  # the dataclass defaults are Llama-7B
    "small": LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024),
}


def write_random_checkpoint(config: LlamaConfig, directory: Path, dtype, layers_per_shard=2):
    """Random N(0, 0.02) weights in HF layout, one shard at a time: never the whole model in memory."""
    raw = {k: getattr(config, k) for k in config.__dataclass_fields__}
    (directory / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForCausalLM"],
                                                       "model_type": "llama", "torch_dtype": str(dtype)[6:]}))
    shapes = build_model(config).state_dict()  # meta tensors: names and shapes only
    groups = {}
    for name in shapes:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layer = int(name.split(".")[2]) // layers_per_shard if name.startswith("model.layers.") else -1
        groups.setdefault(layer, []).append(name)
    weight_map, total_size = {}, 0
    for index, (_, names) in enumerate(sorted(groups.items())):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n].shape) if "norm" in n else torch.randn(shapes[n].shape) * 0.02).to(dtype)
                   for n in names}
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32",
                        help="compute dtype (default: %(default)s)")
    parser.add_argument("--checkpoint-dtype", choices=["fp32", "bf16"], default="bf16",
                        help="dtype of the random checkpoint's tensors (default: %(default)s)")
    parser.add_argument("--method", choices=["lora", "prompt"], default="lora")
    parser.add_argument("--batches", default="1x512,4x512", help="comma-separated BxT (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stacks", default="minipeft,peer", help="default: %(default)s")
    parser.add_argument("--workdir", help="where the temporary random checkpoint goes (default: the system's)")
    parser.add_argument("--checkpoint", help="keep the random checkpoint in this directory, and reuse it if there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        weights = Path(args.checkpoint or workdir)
        if not (weights / "config.json").is_file():
            weights.mkdir(parents=True, exist_ok=True)
            print(f"writing a random {args.shape} checkpoint to {weights}", flush=True)
            write_random_checkpoint(SHAPES[args.shape], weights, DTYPES[args.checkpoint_dtype])
        rows = []
        for batch in args.batches.split(","):
            b, t = batch.split("x")
            for stack in args.stacks.split(","):
                command = [sys.executable, str(ROOT / "bench" / "worker.py"), "--stack", stack, "--task", "train",
                           "--weights", str(weights), "--dtype", args.dtype, "--device", args.device,
                           "--method", args.method, "--steps", str(args.steps), "--batch", b, "--seq", t]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{stack} {batch} failed:\n{result.stderr[-3000:]}")
                row = {"shape": args.shape, "batch": batch, **json.loads(result.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    unit = "GPU memory" if args.device.startswith("cuda") else "RSS"
    print(f"\n{args.method}, {args.dtype} compute, {args.checkpoint_dtype} checkpoint, {args.device}\n")
    print(f"| batch | stack | load (s) | peak {unit} after load (MB) | peak {unit} (MB) | step (s) | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['batch']} | {row['stack']} | {row['load_seconds']:.0f} | {row['load_peak_memory_mb']:,.0f} | "
              f"{row['peak_memory_mb']:,.0f} | {row['step_seconds']:.1f} | {row['tokens_per_second']:,.0f} |")


if __name__ == "__main__":
    main()
