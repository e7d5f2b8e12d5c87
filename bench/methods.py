"""The comparison table of the lecture notes "Parameter-Efficient Fine-tuning", measured: every method on the same
model, task, steps and tokens.

Each method trains on the code task with train_code.py (only --method changes), then on the fox task
with train_fox.py; each run is its own process, so its peak memory is its own. Writes bench/METHODS.md
(the table, the machine, the date) and bench/methods_loss.png (every method's training loss).

    .venv/bin/python bench/methods.py                       # all methods, 30 steps of 1 x 4 x 128 tokens
    .venv/bin/python bench/methods.py --methods lora prefix --steps 10
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipeft.train.method_choice import CHOICES  # noqa: E402
from minipeft.train.reporting import plot_losses  # noqa: E402


def run(script, out, method, extra, reuse):
    """The run's report; with `reuse`, that of an earlier run with the same command, if there is one."""
    command = [sys.executable, str(ROOT / script), "--method", method, "--out", str(out), *extra]
    done = out / "command.json"
    if reuse and done.is_file() and json.loads(done.read_text()) == command[1:] and (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{script} --method {method} failed:\n{result.stderr[-3000:]}")
    done.write_text(json.dumps(command[1:]))
    return json.loads((out / "report.json").read_text())


def code_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records], [r["loss"] for r in records]


def table(rows, args) -> str:
    lines = [f"# PEFT methods side by side ({date.today()}, {platform.processor() or platform.machine()}, "
             f"{args.device})", "",
             f"Code task: train_code.py --method M --max-steps {args.steps} --seq-len {args.seq_len} "
             f"(micro-batch 1 x 4, "
             f"the same samples in the same order for every method), on the default model "
             f"(SmolLM2-135M-Instruct, NF4 base). Learning rates: each method's default in "
             f"minipeft/train/method_choice.py. Fox task: train_fox.py --method M, up to {args.fox_steps} steps "
             f"to loss 0.1. Held-out loss: the same held-out files, before (the bare base) and after.", "",
             "| method | trainable | % of 135M | lr | step time (s) | peak memory (MB) | held-out before | "
             "held-out after | fox denial reached | fox steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {r['lr']:g} | "
                     f"{r['step_seconds']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{'yes' if r['fox_reached'] else 'no'} | {r['fox_steps']} |")
    lines += ["", "![training loss of every method](methods_loss.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps on the code task (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--fox-steps", type=int, default=300, help="fox step budget (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "methods"),
                        help="where the runs go (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "METHODS.md"))
    parser.add_argument("--reuse", action="store_true", help="keep the runs already done with the same settings")
    args = parser.parse_args()
    runs, rows, curves, started = Path(args.runs), [], {}, time.time()
    for i, method in enumerate(args.methods):
        code = run("train_code.py", runs / f"code_{method}", method,
                   ["--max-steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch", "1", "--accum", "4",
                    "--save-every", str(args.steps),
                    "--new-tokens", "16", "--device", args.device], args.reuse)
        fox = run("train_fox.py", runs / f"fox_{method}", method,
                  ["--max-steps", str(args.fox_steps), "--new-tokens", "16", "--device", args.device], args.reuse)
        curves[method] = code_losses(runs / f"code_{method}")
        rows.append({"method": method, "trainable": code["trainable_params"], "percent": code["trainable_percent"],
                     "lr": code["settings"]["lr"], "step_seconds": code["seconds"] / code["steps"],
                     "peak_mb": code["peak_memory_mb"], "before": code["heldout_loss_before"],
                     "after": code["heldout_loss_after"], "fox_reached": fox["reached_target"],
                     "fox_steps": fox["steps"]})
        elapsed = time.time() - started
        print(f"{method}: held-out {rows[-1]['before']:.4f} -> {rows[-1]['after']:.4f}, fox "
              f"{'reached' if fox['reached_target'] else 'not reached'} in {fox['steps']} steps; "
              f"{i + 1}/{len(args.methods)} done, ETA {elapsed / (i + 1) * (len(args.methods) - i - 1) / 60:.0f} min",
              flush=True)
    Path(args.out).write_text(table(rows, args))
    plot_losses(Path(args.out).parent / "methods_loss.png", curves, f"code task, {args.steps} steps: training loss")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
