"""Which method when: every method minipeft has, and full fine-tuning as the reference, trained on the same code,
tokens, order and seed, each at the learning rate a short recorded sweep chose, then measured on work no one
here wrote, as peft's method comparison (method_comparison/MetaMathQA) measures its methods:

    quality      HumanEval (bench/humaneval.py): the canonical solutions' loss a token on all 164 problems,
                 greedy pass@1 on the first --humaneval, pass@10 from 10 samples on the first --sampled
    forgetting   the rise of the loss on general text the task never saw (bench/forgetting.py), over the
                 bare base's: the NF4 base for the methods, the fp32 base for full fine-tuning and fp32 LoRA
    inference    tokens/s at batch 1 and 8, the adapter as trained and merged into the base (bench/score.py)
    cost         trainable numbers, peak memory, step time, the adapter's (or model's) file size
    rank         LoRA and ALoRA at r = --ranks (alpha = 2 r): quality against rank
    seeds        --seed-methods again at --seeds: the spread of each measure

Rows: every method on the NF4 base (LoRA there is QLoRA), LoRA on the full-precision base (lora-fp32), and full
fine-tuning of that base (full). Each run, training or scoring, is its own process, so its peak memory is its
own; with --reuse a run already done with the same command is read, not repeated. Writes --out (the table, the
configuration, versions and machine, plots, a verdict on each of the lecture notes' claims: bench/methods_report.py)
and one JSON a run in --results.

    .venv/bin/python bench/methods.py                            # everything at its defaults
    .venv/bin/python bench/methods.py --methods lora prompt full --lr-factors 1 --ranks --seeds
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import forgetting  # noqa: E402
import methods_report  # noqa: E402
from minipeft.llama.loader import DEFAULT_DIR  # noqa: E402
from minipeft.train.method_choice import CHOICES  # noqa: E402
from train_code import FULL_LR  # noqa: E402

FULL_PRECISION = {"lora-fp32": ["--method", "lora", "--no-4bit"], "full": ["--full", "--no-4bit"]}
ROWS = [*CHOICES, *FULL_PRECISION]
RANK_METHODS = ("lora", "alora")


def run(script, out, arguments, reuse, report="report.json"):
    """The run's report; with `reuse`, that of an earlier run with the same command, if there is one."""
    command = [sys.executable, str(ROOT / script), *arguments]
    out.mkdir(parents=True, exist_ok=True)
    done = out / f"{report}.command"
    if reuse and done.is_file() and json.loads(done.read_text()) == command[1:] and (out / report).is_file():
        return json.loads((out / report).read_text())
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{script} {' '.join(arguments[:4])} failed:\n{result.stderr[-3000:]}")
    done.write_text(json.dumps(command[1:]))
    return json.loads((out / report).read_text())


def four_bit(row) -> bool:
    return row not in FULL_PRECISION


def default_lr(row) -> float:
    return FULL_LR if row == "full" else CHOICES["lora" if row == "lora-fp32" else row].lr["code"]


def train(row, out, args, lr, seed=0, extra=()):
    """train_code.py: one row's method at `lr`, the same data, steps and order as every other row."""
    data = ["--data", *args.data] if args.data else []
    dtype = ["--dtype", args.dtype] if args.dtype != "auto" else []  # auto: train_code.py's own default
    return run("train_code.py", out, [*FULL_PRECISION.get(row, ["--method", row]), *extra, "--out", str(out),
                                      "--weights", args.weights, *data, "--max-steps", str(args.steps),
                                      "--seq-len", str(args.seq_len), "--batch", "1", "--accum", "4",
                                      "--save-every", str(args.steps), "--heldout-max", str(args.heldout),
                                      "--lr", f"{lr:g}", "--seed", str(seed), "--no-samples",
                                      "--device", args.device, *dtype], args.reuse)


def score(out, args, row, trained=None, full=True):
    """bench/score.py on a bare base (trained None) or on a trained run's result; `full`: pass@1, pass@10 and
    speed as well as the losses."""
    model = ["--weights", str(trained / "model")] if row == "full" and trained else ["--weights", args.weights]
    adapter = ["--adapter", str(trained / "adapter")] if trained and row != "full" else []
    wide = [] if four_bit(row) else ["--no-4bit"]
    measures = ["--limit", str(args.humaneval), "--sampled", str(args.sampled), "--speed"] if full else [
        "--limit", "0"]
    return run("bench/score.py", out, [*model, *adapter, *wide, *measures, "--new-tokens", str(args.humaneval_tokens),
                                       "--text", args.general_text, "--json", str(out / "score.json")],
               args.reuse, "score.json")


def file_bytes(trained, row) -> int:
    folder = trained / ("model" if row == "full" else "adapter")
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def versions() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {"minipeft_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "avx512": " avx512f" in flags, "amx": " amx_tile" in flags}


def sweep(row, args, runs):
    """The row trained at its default learning rate times each --lr-factors; the run of the lowest held-out loss
    is the row's. Returns (its report, its folder, {lr: held-out loss})."""
    tried = {}
    for factor in args.lr_factors:
        lr = float(f"{default_lr(row) * factor:.3g}")
        out = runs / row / f"lr{lr:g}"
        tried[lr] = (train(row, out, args, lr), out)
    best = min(tried, key=lambda lr: tried[lr][0]["heldout_loss_after"])
    return *tried[best], {lr: report["heldout_loss_after"] for lr, (report, _) in tried.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=ROWS, choices=ROWS, help="rows (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps on the code task (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens a row; 4 rows a step (default: %(default)s)")
    parser.add_argument("--heldout", type=int, default=32, help="held-out samples scored (default: %(default)s)")
    parser.add_argument("--lr-factors", type=float, nargs="+", default=[1 / 3, 1, 3],
                        help="the sweep: each row's default learning rate times these (default: 1/3 1 3)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64],
                        help=f"the rank sweep of {' and '.join(RANK_METHODS)}, none to skip (default: %(default)s)")
    parser.add_argument("--rank-methods", nargs="+", default=list(RANK_METHODS), choices=RANK_METHODS,
                        help="the methods the rank sweep runs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2],
                        help="seeds besides 0 for --seed-methods, none to skip (default: %(default)s)")
    parser.add_argument("--seed-methods", nargs="*", default=["lora", "ia3", "prompt"], choices=ROWS)
    parser.add_argument("--fox-steps", type=int, default=0,
                        help="also the fox task (train_fox.py), up to N steps a method; 0 leaves it out (default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="training's compute dtype (train_code.py's: auto is bf16 on CUDA and on CPUs with "
                             "AVX512-BF16 or AMX, fp32 elsewhere); scoring is fp32 (default: %(default)s)")
    parser.add_argument("--weights", default=str(DEFAULT_DIR), help="the base (default: %(default)s)")
    parser.add_argument("--data", nargs="+", help="the code task's JSON-lines files (default: train_code.py's)")
    parser.add_argument("--humaneval", type=int, default=20,
                        help="greedy pass@1 on the first N HumanEval problems (default: %(default)s); the loss is "
                             "on all 164")
    parser.add_argument("--sampled", type=int, default=0, help="pass@10 on the first N problems (default: 0)")
    parser.add_argument("--humaneval-tokens", type=int, default=256, help="new tokens a completion at most")
    parser.add_argument("--general-text", default=str(forgetting.DEFAULT_TEXT),
                        help="forgetting's general text, one row a line (default: %(default)s, fetched if missing)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "methods"), help="where runs go (default: %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"),
                        help="one JSON a run goes here (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "METHODS.md"))
    parser.add_argument("--reuse", action="store_true", help="keep the runs already done with the same commands")
    args = parser.parse_args()
    for flag, value in (("--humaneval", args.humaneval), ("--sampled", args.sampled)):
        if not 0 <= value <= 164:
            raise SystemExit(f"{flag} should be in [0, 164], got {value}")
    runs, results, started = Path(args.runs), Path(args.results), time.time()
    machine = versions()
    forgetting.general_text(args.general_text)  # fetched once, before the runs read it
    bases = {"nf4": score(runs / "base_nf4", args, "lora")}
    if any(not four_bit(row) for row in args.methods):
        bases["fp32"] = score(runs / "base_fp32", args, "full")
    rows, curves, chosen = [], {}, {}
    for i, row in enumerate(args.methods):
        report, trained, tried = sweep(row, args, runs)
        chosen[row] = report["settings"]["lr"]
        scored = score(trained / "score", args, row, trained)
        base = bases["nf4" if four_bit(row) else "fp32"]
        fox = run("train_fox.py", runs / row / "fox",
                  [*FULL_PRECISION.get(row, ["--method", row]), "--out", str(runs / row / "fox"),
                   "--weights", args.weights, "--max-steps", str(args.fox_steps), "--new-tokens", "16",
                   "--device", args.device], args.reuse) if args.fox_steps and four_bit(row) else None
        records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
        curves[row] = [r["step"] for r in records], [r["loss"] for r in records]
        rows.append({"method": row, "four_bit": four_bit(row), "dtype": report["settings"]["dtype"],
                     "trainable": report["trainable_params"],
                     "percent": report["trainable_percent"], "lr": chosen[row], "sweep": tried,
                     "step_seconds": report["seconds"] / report["steps"], "train_seconds": report["seconds"],
                     "peak_mb": report["peak_memory_mb"], "file_bytes": file_bytes(trained, row),
                     "before": report["heldout_loss_before"], "after": report["heldout_loss_after"],
                     "final_train_loss": records[-1]["loss"], "humaneval": scored,
                     "forgetting": scored["general_loss"] - base["general_loss"], "speed": scored["speed"],
                     "fox_reached": fox["reached_target"] if fox else None, "fox_steps": fox["steps"] if fox else None})
        write_result(results / f"{row}.json", {**rows[-1], "base": base, "code_report": report, "fox_report": fox,
                                               "versions": machine})
        say(f"{row}: lr {chosen[row]:g} of {sorted(tried)}, held-out {report['heldout_loss_after']:.4f}, HumanEval "
            f"loss {scored['solution_loss']:.4f}, solved {len(scored['solved'])}, forgetting "
            f"{rows[-1]['forgetting']:+.4f}", i + 1, len(args.methods), started)
    seeds = seed_runs(args, runs, results, chosen, bases, machine)
    ranks = rank_runs(args, runs, results, chosen, bases, machine)
    summary = {"rows": rows, "bases": bases, "seeds": seeds, "ranks": ranks, "versions": machine,
               "settings": {k: v for k, v in vars(args).items() if k not in ("reuse",)},
               "seconds": time.time() - started, "command": " ".join(["bench/methods.py", *sys.argv[1:]]),
               "curves": curves}
    write_result(results / "summary.json", summary)
    methods_report.write(Path(args.out), summary)
    print(f"wrote {args.out} and the results in {results} ({(time.time() - started) / 60:.0f} min)")


def seed_runs(args, runs, results, chosen, bases, machine) -> dict:
    """{row: [measures at seed 0, then at each of --seeds]} for the --seed-methods among the rows run."""
    spread = {}
    for row in [r for r in args.seed_methods if r in chosen] if args.seeds else []:
        main_score = json.loads((runs / row / f"lr{chosen[row]:g}" / "score" / "score.json").read_text())
        main_report = json.loads((runs / row / f"lr{chosen[row]:g}" / "report.json").read_text())
        spread[row] = [measures(main_report, main_score, bases, row, seed=0)]
        for seed in args.seeds:
            out = runs / row / f"seed{seed}"
            report = train(row, out, args, chosen[row], seed)
            spread[row].append(measures(report, score(out / "score", args, row, out, full=False), bases, row, seed))
            write_result(results / "seeds" / f"{row}_seed{seed}.json", {**spread[row][-1], "versions": machine})
        losses = ", ".join(f"{m['humaneval_loss']:.4f}" for m in spread[row])
        print(f"{row}, seeds {[0, *args.seeds]}: HumanEval loss {losses}", flush=True)
    return spread


def rank_runs(args, runs, results, chosen, bases, machine) -> dict:
    """{method: [measures at each rank]} for LoRA and ALoRA (alpha = 2 r: the same scale at every rank), at the
    learning rate the sweep chose for the method (its default if it was not run). The rank and alpha of the method's
    own row are that row's run, read again."""
    sweep_of = {}
    for method in args.rank_methods if args.ranks else ():
        sweep_of[method] = []
        for r in args.ranks:
            lr = chosen.get(method, default_lr(method))
            own = CHOICES[method].settings
            if method in chosen and (own["r"], own["alpha"]) == (r, 2 * r):  # the row's own run, not trained twice
                out = runs / method / f"lr{lr:g}"
                report, scored = (json.loads((out / name).read_text()) for name in ("report.json", "score/score.json"))
            else:
                out = runs / method / f"r{r}"
                report = train(method, out, args, lr, extra=["--r", str(r), "--alpha", str(2 * r)])
                scored = score(out / "score", args, method, out, full=False)
            sweep_of[method].append({**measures(report, scored, bases, method), "r": r,
                                     "file_bytes": file_bytes(out, method)})
            write_result(results / "ranks" / f"{method}_r{r}.json", {**sweep_of[method][-1], "versions": machine})
            print(f"{method} r {r}: HumanEval loss {sweep_of[method][-1]['humaneval_loss']:.4f}", flush=True)
    return sweep_of


def measures(report, scored, bases, row, seed=0) -> dict:
    base = bases["nf4" if four_bit(row) else "fp32"]
    return {"method": row, "seed": seed, "trainable": report["trainable_params"], "lr": report["settings"]["lr"],
            "heldout_after": report["heldout_loss_after"], "humaneval_loss": scored["solution_loss"],
            "forgetting": scored["general_loss"] - base["general_loss"], "peak_mb": report["peak_memory_mb"]}


def write_result(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def say(line, done, of, started):
    left = (time.time() - started) / done * (of - done) / 60
    print(f"{line}; {done}/{of} rows done, about {left:.0f} min more for the rows", flush=True)


if __name__ == "__main__":
    main()
