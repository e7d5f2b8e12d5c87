"""minipeft against transformers + peft + bitsandbytes on the same checkpoint, side by side, as ratios.

Each measurement runs in a fresh process (so peak memory is the process's own), and the two stacks
alternate: minipeft, peer, minipeft, peer, ... The median of the rounds is reported.

    .venv/bin/python bench/run.py                       # the default model on CPU, fp32
    .venv/bin/python bench/run.py --dtype bf16 --rounds 3
    .venv/bin/python bench/run.py --tasks makecode      # `make code`: old defaults, today's eager and compiled

Roofline: the training step's achieved GFLOP/s (its arithmetic, bench/roofline.py, over its median
time) against this machine's matmul peak at the same dtype, measured in the same run (task "peak").
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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


# `make code` before packing (its flags then were the defaults), today's defaults eager, and `make code` itself
MAKE_CODE = {"old defaults (one sample per row)": ["--no-packing", "--seq-len", "256", "--batch", "1", "--accum", "4",
                                                    "--max-steps", "150", "--lr", "1e-3", "--warmup", "10",
                                                    "--dtype", "fp32", "--dropout", "0.05"],
             "today's defaults, eager": [],
             "`make code` (today's defaults, compiled)": ["--compile"]}


def make_code(args):
    """Each train_code.py run end to end (load, held-out loss, training, samples, saving), timed on the wall."""
    rows = []
    for number, (name, flags) in enumerate(MAKE_CODE.items()):
        out = ROOT / "runs" / "bench_make_code" / f"run{number}"
        command = [sys.executable, str(ROOT / "train_code.py"), "--out", str(out), *flags]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"train_code.py {' '.join(flags)} failed:\n{result.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text())
        rows.append((name, " ".join(flags) or "(none)", seconds, report))
        print(f"{name}: {seconds:.0f} s, held-out {report['heldout_loss_before']:.4f} -> "
              f"{report['heldout_loss_after']:.4f}", flush=True)
    print("\n| run | flags | wall time (min) | tokens seen | training tokens/s | held-out before | held-out after |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, flags, seconds, r in rows:
        print(f"| {name} | `{flags}` | {seconds / 60:.1f} | {r['tokens_seen']:,} | {r['tokens_per_second']:.0f} | "
              f"{r['heldout_loss_before']:.4f} | {r['heldout_loss_after']:.4f} |")


def roofline(runs, args):
    from roofline import qlora_step_flops

    from minipeft.llama.config import LlamaConfig

    flops = qlora_step_flops(LlamaConfig.from_json(Path(args.weights) / "config.json"), args.batch, args.seq)["total"]
    peak = statistics.median(r["peak_gflops"] for r in runs[("peak", "minipeft")])
    print(f"\nRoofline, {args.dtype}: {flops / 1e9:.0f} GFLOP per step of {args.batch} x {args.seq} tokens; "
          f"matmul peak {peak:.0f} GFLOP/s (plain 2048^3 matmul, same run)\n")
    print("| stack | step (s) | achieved GFLOP/s | of the peak |")
    print("| --- | ---: | ---: | ---: |")
    for stack in [s for s in ("minipeft", "minipeft-compile", "peer") if ("train", s) in runs]:
        seconds = statistics.median(r["step_seconds"] for r in runs[("train", stack)])
        print(f"| {stack} | {seconds:.2f} | {flops / seconds / 1e9:.1f} | {flops / seconds / 1e9 / peak:.0%} |")


def versions():
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ["torch", "bitsandbytes", "transformers", "peft", "minipeft"]}


def main():
    from minipeft.llama.loader import DEFAULT_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_DIR))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per stack and task")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--tasks", default="train,generate,load,peak",
                        help="train, generate, load, peak (the matmul roof), makecode (default: %(default)s)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()

    tasks = args.tasks.split(",")
    if "makecode" in tasks:
        make_code(args)
        tasks.remove("makecode")
    runs = {}
    for task in tasks:
        for round_ in range(args.rounds):
            stacks = ("minipeft",) if task == "peak" else (
                ("minipeft", "peer")
                + (("peer-fp32", "minipeft-decoded", "minipeft-no-cache") if task == "generate" else ())
                + (("minipeft-compile",) if task == "train" else ()))
            for stack in stacks:
                result = measure(stack, task, args)
                print(f"round {round_ + 1} {task:8s} {stack:8s} {json.dumps(result)}", flush=True)
                runs.setdefault((task, stack), []).append(result)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {platform.python_version()}, {versions()}")
    print(f"settings: NF4 base, LoRA r=8 on q/k/v, checkpointing, batch {args.batch} x {args.seq}, {args.dtype}, "
          f"{args.device}, median of {args.rounds} alternating runs each\n")
    print("| figure | minipeft | transformers+peft+bnb | minipeft / peer |")
    print("| --- | --- | --- | --- |")
    for task, figure, _ in FIGURES:
        if (task, "minipeft") not in runs or (task, "peer") not in runs:
            continue
        ours = statistics.median(r[figure] for r in runs[(task, "minipeft")])
        theirs = statistics.median(r[figure] for r in runs[(task, "peer")])
        print(f"| {task}: {figure} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x |")
        if (task, "peer-fp32") in runs and figure == "tokens_per_second":
            fp32 = statistics.median(r[figure] for r in runs[(task, "peer-fp32")])
            print(f"| {task}: {figure}, peer without its bf16 CPU kernel | {ours:.2f} | {fp32:.2f} | "
                  f"{ours / fp32:.2f}x |")
        if (task, "minipeft-compile") in runs:
            compiled = statistics.median(r[figure] for r in runs[(task, "minipeft-compile")])
            print(f"| {task}: {figure}, minipeft with --compile | {compiled:.2f} | {theirs:.2f} | "
                  f"{compiled / theirs:.2f}x |")
        if (task, "minipeft-decoded") in runs and figure == "tokens_per_second":
            kept = statistics.median(r[figure] for r in runs[(task, "minipeft-decoded")])
            print(f"| {task}: {figure}, minipeft with weights kept decoded instead of its 4-bit kernel | {kept:.2f} | "
                  f"{theirs:.2f} | {kept / theirs:.2f}x |")
        if (task, "minipeft-no-cache") in runs and figure == "tokens_per_second":
            plain = statistics.median(r[figure] for r in runs[(task, "minipeft-no-cache")])
            print(f"| {task}: {figure}, minipeft decoding every weight for every token | {plain:.2f} | "
                  f"{theirs:.2f} | {plain / theirs:.2f}x |")
    if ("train", "peer") in runs and ("peak", "minipeft") in runs:
        roofline(runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{t}/{s}": r for (t, s), r in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
