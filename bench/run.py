"""minipeft against transformers + peft + bitsandbytes on the same checkpoint, side by side, as ratios.

Each measurement runs in a fresh process (so peak memory is the process's own), and the two stacks
alternate: minipeft, peer, minipeft, peer, ... The median of the rounds is reported.

    .venv/bin/python bench/run.py                       # the default model on CPU, fp32
    .venv/bin/python bench/run.py --dtype bf16 --rounds 3
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (task, figure, lower is better)
FIGURES = [("train", "step_seconds", True), ("train", "tokens_per_second", False), ("train", "peak_memory_mb", True),
           ("generate", "tokens_per_second", False), ("load", "load_seconds", True), ("load", "peak_memory_mb", True)]


def measure(stack, task, args):
    command = [sys.executable, str(ROOT / "bench" / "worker.py"), "--stack", stack, "--task", task,
               "--weights", str(args.weights), "--dtype", args.dtype, "--device", args.device,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{stack} {task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def versions():
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ["torch", "bitsandbytes", "transformers", "peft", "minipeft"]}


def main():
    from minipeft.llama.default_model import DEFAULT_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_DIR))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per stack and task")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--tasks", default="train,generate,load")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()

    runs = {}
    for task in args.tasks.split(","):
        for round_ in range(args.rounds):
            for stack in ("minipeft", "peer") + (("peer-fp32",) if task == "generate" else ()):
                result = measure(stack, task, args)
                print(f"round {round_ + 1} {task:8s} {stack:8s} {json.dumps(result)}", flush=True)
                runs.setdefault((task, stack), []).append(result)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {platform.python_version()}, {versions()}")
    print(f"settings: NF4 base, LoRA r=8 on q/k/v, checkpointing, batch {args.batch} x {args.seq}, {args.dtype}, "
          f"{args.device}, median of {args.rounds} alternating runs each\n")
    print("| figure | minipeft | transformers+peft+bnb | minipeft / peer |")
    print("| --- | --- | --- | --- |")
    for task, figure, _ in FIGURES:
        if (task, "minipeft") not in runs:
            continue
        ours = statistics.median(r[figure] for r in runs[(task, "minipeft")])
        theirs = statistics.median(r[figure] for r in runs[(task, "peer")])
        print(f"| {task}: {figure} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x |")
        if (task, "peer-fp32") in runs and figure == "tokens_per_second":
            fp32 = statistics.median(r[figure] for r in runs[(task, "peer-fp32")])
            print(f"| {task}: {figure}, peer without its bf16 CPU kernel | {ours:.2f} | {fp32:.2f} | "
                  f"{ours / fp32:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{t}/{s}": r for (t, s), r in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
