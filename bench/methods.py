"""The comparison table of the lecture notes "Parameter-Efficient Fine-tuning", measured: every method on the same
model, task, steps and tokens.

Each method trains on the code task with train_code.py (only --method changes), then on the fox task
with train_fox.py; each run is its own process, so its peak memory is its own. Each code adapter is then
scored in its own process (bench/score.py), as the bare base is once: on HumanEval, the canonical solutions'
per-token loss on all 164 problems and greedy pass@1 on the first --humaneval of them; and forgetting, the
rise of its loss on general text (bench/forgetting.py). Writes bench/METHODS.md (the table, the machine, the
date), bench/methods_loss.png (every method's training loss) and one JSON a run in --results (its settings,
figures, versions and machine).

    .venv/bin/python bench/methods.py                       # all methods, 30 steps of 1 x 4 x 128 tokens
    .venv/bin/python bench/methods.py --methods lora prefix --steps 10
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import forgetting  # noqa: E402
from minipeft.llama.loader import DEFAULT_DIR  # noqa: E402
from minipeft.train.method_choice import CHOICES  # noqa: E402
from minipeft.train.reporting import plot_losses  # noqa: E402


def run(script, out, arguments, reuse, report="report.json"):
    """The run's report; with `reuse`, that of an earlier run with the same command, if there is one."""
    command = [sys.executable, str(ROOT / script), *arguments]
    done = out / f"{report}.command"
    if reuse and done.is_file() and json.loads(done.read_text()) == command[1:] and (out / report).is_file():
        return json.loads((out / report).read_text())
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{script} {' '.join(arguments[:2])} failed:\n{result.stderr[-3000:]}")
    done.write_text(json.dumps(command[1:]))
    return json.loads((out / report).read_text())


def score(out, args, adapter=None):
    """bench/score.py on the base, or the base with `adapter`, in its own process: HumanEval and the loss on
    general text."""
    out.mkdir(parents=True, exist_ok=True)
    return run("bench/score.py", out, ["--weights", args.weights, *(["--adapter", str(adapter)] if adapter else []),
                                       "--limit", str(args.humaneval), "--new-tokens", str(args.humaneval_tokens),
                                       "--text", args.general_text, "--json", str(out / "score.json")],
               args.reuse, "score.json")


def versions() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"minipeft_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count()}


FOX_REACHED = {True: "yes", False: "no", None: "-"}  # None: the fox task not run (--fox-steps 0)


def code_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records], [r["loss"] for r in records]


def table(rows, base, args) -> str:
    lines = [f"# PEFT methods side by side ({date.today()}, {platform.processor() or platform.machine()}, "
             f"{args.device})", "",
             f"Code task: train_code.py --method M --max-steps {args.steps} --seq-len {args.seq_len} "
             f"(micro-batch 1 x 4, the same samples in the same order for every method), on {args.weights} (NF4 "
             f"base). Learning rates: each method's default in minipeft/train/method_choice.py. Fox task: "
             + (f"train_fox.py --method M, up to {args.fox_steps} steps to loss 0.1." if args.fox_steps else "not run.")
             + " Held-out loss: the same held-out files, before (the bare base) and after.", "",
             f"HumanEval: the canonical solutions' loss a token on all 164 problems (the bare base: "
             f"{base['solution_loss']:.4f}), and greedy pass@1 on the first {args.humaneval} "
             f"({args.humaneval_tokens} new tokens; the bare base solves {len(base['solved'])}). Forgetting: the "
             f"loss a token on general text the task never saw (bench/forgetting.py: the first 100 rows of "
             f"{Path(args.general_text).name}), after minus the bare base's {base['general_loss']:.4f}.", "",
             "| method | trainable | % of base | lr | step time (s) | peak memory (MB) | held-out before | "
             "held-out after | HumanEval loss | HumanEval solved | forgetting | fox denial reached | fox steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        solved = f"{len(r['humaneval']['solved'])}/{r['humaneval']['problems']}"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {r['lr']:g} | "
                     f"{r['step_seconds']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{r['humaneval']['solution_loss']:.4f} | {solved} | {r['forgetting']:+.4f} | "
                     f"{FOX_REACHED[r['fox_reached']]} | {r['fox_steps']} |")
    lines += ["", "HumanEval problems solved: " + "; ".join(
        f"{r['method']}: {', '.join(r['humaneval']['solved']) or 'none'}" for r in rows) +
        f" (the bare base: {', '.join(base['solved']) or 'none'}).",
        "", "![training loss of every method](methods_loss.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps on the code task (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--fox-steps", type=int, default=300,
                        help="fox step budget, 0 to leave the fox task out (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=str(DEFAULT_DIR), help="the base (default: %(default)s)")
    parser.add_argument("--data", nargs="+", help="the code task's JSON-lines files (default: train_code.py's)")
    parser.add_argument("--humaneval", type=int, default=20,
                        help="greedy pass@1 on the first N HumanEval problems, 0 for none (default: %(default)s); "
                             "the loss is on all 164")
    parser.add_argument("--humaneval-tokens", type=int, default=256, help="new tokens a completion (default: 256)")
    parser.add_argument("--general-text", default=str(forgetting.DEFAULT_TEXT),
                        help="forgetting's general text, one row a line (default: %(default)s, fetched if missing)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "methods"),
                        help="where the runs go (default: %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"),
                        help="one JSON a run goes here (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "METHODS.md"))
    parser.add_argument("--reuse", action="store_true", help="keep the runs already done with the same settings")
    args = parser.parse_args()
    if not 0 <= args.humaneval <= 164:
        raise SystemExit(f"--humaneval should be in [0, 164], got {args.humaneval}")
    runs, rows, curves, started = Path(args.runs), [], {}, time.time()
    results, machine = Path(args.results), versions()
    results.mkdir(parents=True, exist_ok=True)
    forgetting.general_text(args.general_text)  # fetched once, before the runs read it
    base = score(runs / "base", args)
    data = ["--data", *args.data] if args.data else []
    for i, method in enumerate(args.methods):
        out = runs / f"code_{method}"
        code = run("train_code.py", out, ["--method", method, "--out", str(out), "--weights", args.weights, *data,
                                          "--max-steps", str(args.steps), "--seq-len", str(args.seq_len),
                                          "--batch", "1", "--accum", "4", "--save-every", str(args.steps),
                                          "--new-tokens", "16", "--device", args.device], args.reuse)
        scored = score(out / "score", args, out / "adapter")
        fox = run("train_fox.py", runs / f"fox_{method}",
                  ["--method", method, "--out", str(runs / f"fox_{method}"), "--weights", args.weights,
                   "--max-steps", str(args.fox_steps), "--new-tokens", "16", "--device", args.device],
                  args.reuse) if args.fox_steps else {"reached_target": None, "steps": "-"}
        curves[method] = code_losses(out)
        rows.append({"method": method, "trainable": code["trainable_params"], "percent": code["trainable_percent"],
                     "lr": code["settings"]["lr"], "step_seconds": code["seconds"] / code["steps"],
                     "peak_mb": code["peak_memory_mb"], "before": code["heldout_loss_before"],
                     "after": code["heldout_loss_after"], "fox_reached": fox["reached_target"],
                     "fox_steps": fox["steps"], "humaneval": scored,
                     "forgetting": scored["general_loss"] - base["general_loss"],
                     "adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size})
        record = {**rows[-1], "base": base, "code_report": code, "fox_report": fox, "versions": machine}
        (results / f"{method}.json").write_text(json.dumps(record, indent=1) + "\n")
        elapsed = time.time() - started
        print(f"{method}: held-out {rows[-1]['before']:.4f} -> {rows[-1]['after']:.4f}, HumanEval loss "
              f"{base['solution_loss']:.4f} -> {scored['solution_loss']:.4f}, solved {len(scored['solved'])}, "
              f"forgetting {rows[-1]['forgetting']:+.4f}; fox "
              f"{FOX_REACHED[fox['reached_target']]} in {fox['steps']} steps; "
              f"{i + 1}/{len(args.methods)} done, ETA {elapsed / (i + 1) * (len(args.methods) - i - 1) / 60:.0f} min",
              flush=True)
    Path(args.out).write_text(table(rows, base, args))
    plot_losses(Path(args.out).parent / "methods_loss.png", curves, f"code task, {args.steps} steps: training loss")
    print(f"wrote {args.out} and {len(rows)} results in {results}")


if __name__ == "__main__":
    main()
