"""bench/METHODS.md from one run of bench/methods.py: the table, the configuration, versions and machine, plots
(the Pareto fronts, the rank sweep, the training losses) and, for each claim of the lecture notes, what the run
says: holds, does not hold, or can't tell at this scale, with the numbers that decide it.

Every verdict is computed from the run (the rules are below, one function a claim), not written by hand, so a
run that comes out otherwise says otherwise.
"""

from datetime import date
from pathlib import Path
from statistics import mean


def write(out: Path, summary: dict):
    rows, bases, v, s = summary["rows"], summary["bases"], summary["versions"], summary["settings"]
    plots = draw(out.parent, summary, summary["curves"])
    lines = [f"# PEFT methods side by side ({date.today()})", "",
             f"Made by one command, `{summary['command']}`, in {summary['seconds'] / 3600:.1f} h on {v['cpu']} "
             f"({v['cores']} cores{', AVX512' if v['avx512'] else ', AVX2 only'}{', AMX' if v['amx'] else ''}), "
             f"torch {v['torch']}, Python {v['python']}, minipeft {v['minipeft_commit'][:7]}; every training "
             f"and scoring run its own process, one at a time. One JSON a run: bench/results/.", "",
             "## The run", "",
             f"- Task: train_code.py, {s['steps']} steps of 4 rows x {s['seq_len']} tokens (the same rows in the same "
             f"order for every method, seed 0), on {Path(s['weights']).name}; held-out loss on {s['heldout']} "
             f"held-out files; training's compute in "
             f"{' and '.join(sorted({str(r.get('dtype')) for r in rows}))} (autocast; the trained tensors fp32), "
             f"scoring in fp32.",
             f"- Learning rate: each row's default times {', '.join(f'{f:.3g}' for f in s['lr_factors'])}, the one "
             f"of the lowest held-out loss kept (the sweep column).",
             f"- HumanEval: the canonical solutions' loss a token on all 164 problems; greedy pass@1 on the first "
             f"{s['humaneval']}" + (f"; pass@10 (10 samples at T 0.8, top-p 0.95) on the first {s['sampled']}"
                                    if s["sampled"] else "") + f"; at most {s['humaneval_tokens']} new tokens.",
             f"- Forgetting: the loss a token on the first 100 rows of {Path(s['general_text']).name} "
             f"(bench/forgetting.py), after minus the bare base's: NF4 {bases['nf4']['general_loss']:.4f}"
             + (f", fp32 {bases['fp32']['general_loss']:.4f}" if "fp32" in bases else "") + ".",
             "- Speed: new tokens a second generating 32 after a 32-token prompt, the best of 3 (bench/score.py), "
             "as trained (unmerged) and with the adapter merged into the base where it can be.", "",
             "| method | base | trainable | % | lr (sweep: held-out) | step (s) | peak MB | file MB | held-out | "
             "HumanEval loss | pass@1 | " + ("pass@10 | " if s["sampled"] else "") + "forgetting | tok/s b1 | "
             "tok/s b8 | merged b1 | merged b8 |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | " +
             ("---: | " if s["sampled"] else "") + "---: | ---: | ---: | ---: | ---: |"]
    for name, base in bases.items():
        lines.append(row_line(f"(bare base, {name})", name, None, base, s))
    for r in rows:
        lines.append(row_line(r["method"], "nf4" if r["four_bit"] else "fp32", r, r["humaneval"], s))
    solved = "; ".join(f"{r['method']}: {', '.join(r['humaneval']['solved']) or 'none'}" for r in rows)
    lines += ["", f"HumanEval problems solved (greedy): {solved}; the bare NF4 base: "
              f"{', '.join(bases['nf4']['solved']) or 'none'}.", ""]
    lines += [f"![{alt}]({name})" for name, alt in plots] + [""]
    lines += seeds_section(summary) + ranks_section(summary) + verdicts(summary)
    out.write_text("\n".join(lines) + "\n")


def row_line(name, base_kind, r, scored, s) -> str:
    speed = scored.get("speed") or {}
    rate = lambda kind, b: f"{speed[kind][str(b)]:.1f}" if speed.get(kind) else "-"
    solved = f"{len(scored['solved'])}/{scored['problems']}" if scored["problems"] else "-"
    at_10 = scored.get("pass_at_10")
    cells = [name, base_kind]
    if r:
        sweep = ", ".join(f"{lr:g}: {loss:.3f}" for lr, loss in sorted((float(k), x) for k, x in r["sweep"].items()))
        cells += [f"{r['trainable']:,}", f"{r['percent']:.3f}", f"{r['lr']:g} ({sweep})", f"{r['step_seconds']:.2f}",
                  f"{r['peak_mb']:.0f}", f"{r['file_bytes'] / 2**20:.1f}", f"{r['after']:.4f}"]
    else:
        cells += ["-"] * 7
    cells += [f"{scored['solution_loss']:.4f}", solved] + ([f"{at_10['pass_at_k']:.3f}" if at_10 else "-"]
                                                            if s["sampled"] else [])
    cells += [f"{r['forgetting']:+.4f}" if r else "0", rate("unmerged", 1), rate("unmerged", 8), rate("merged", 1),
              rate("merged", 8)]
    return "| " + " | ".join(cells) + " |"


def seeds_section(summary) -> list:
    seeds = summary["seeds"]
    if not seeds:
        return []
    lines = ["## Seeds", "", "The same row again at other seeds (the data order and the adapter's initialisation "
             "change), at the learning rate the sweep chose: the spread says how far apart two rows must be to "
             "differ.", "", "| method | seeds | held-out | HumanEval loss | forgetting |",
             "| --- | --- | --- | --- | --- |"]
    for method, runs in seeds.items():
        cell = lambda key: f"{mean(m[key] for m in runs):.4f} ({min(m[key] for m in runs):.4f} to " \
                           f"{max(m[key] for m in runs):.4f})"
        lines.append(f"| {method} | {', '.join(str(m['seed']) for m in runs)} | {cell('heldout_after')} | "
                     f"{cell('humaneval_loss')} | {cell('forgetting')} |")
    return lines + [""]


def ranks_section(summary) -> list:
    ranks = summary["ranks"]
    if not ranks:
        return []
    lines = ["## Rank", "", "LoRA (on the six linears) and ALoRA (on q and v, its rank r at the start) at each rank, "
             "alpha = 2 r, at the learning rate the sweep chose for each.", "",
             "| method | r | trainable | file MB | held-out | HumanEval loss | forgetting |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, runs in ranks.items():
        lines += [f"| {method} | {m['r']} | {m['trainable']:,} | {m['file_bytes'] / 2**20:.2f} | "
                  f"{m['heldout_after']:.4f} | {m['humaneval_loss']:.4f} | {m['forgetting']:+.4f} |" for m in runs]
    return lines + ["", "![quality against rank](methods_rank.png)", ""]


def noise(summary) -> float:
    """How far apart two measures of HumanEval loss must be to differ: the widest spread over seeds of any row
    run at several (0 if none was)."""
    spreads = [max(m["humaneval_loss"] for m in runs) - min(m["humaneval_loss"] for m in runs)
               for runs in summary["seeds"].values()]
    return max(spreads, default=0.0)


def pareto(points) -> list:
    """The names of the points no other point beats on both coordinates (lower is better on each)."""
    return [name for name, x, y in points
            if not any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for _, x2, y2 in points)]


def verdicts(summary) -> list:
    lines = ["## What this says about the lecture notes' claims", ""]
    for claim, rule in CLAIMS:
        verdict, why = rule(summary)
        lines += [f"- **{claim}** {verdict}. {why}"]
    return lines + [""]


def trade_offs(summary):
    rows = summary["rows"]
    by = lambda key: [(r["method"], r[key], r["humaneval"]["solution_loss"]) for r in rows]
    fronts = {key: pareto(by(key)) for key in ("trainable", "peak_mb", "step_seconds")}
    if len(rows) < 3:
        return "can't tell", "Fewer than three rows were run."
    said = "; ".join(f"against {label}: {', '.join(fronts[key])}" for key, label in
                     (("trainable", "trainable numbers"), ("peak_mb", "peak memory"), ("step_seconds", "step time")))
    best = min(rows, key=lambda r: r["humaneval"]["solution_loss"])
    alone = all(front == [best["method"]] for front in fronts.values())  # one row cheapest and best on each axis
    return ("does not hold" if alone else "holds"), (
        f"The best HumanEval loss is {best['method']}'s ({best['humaneval']['solution_loss']:.4f}); the rows no "
        f"other row beats on both HumanEval loss and the cost (the Pareto fronts), {said}.")


def forgetting_claim(summary):
    rows = {r["method"]: r for r in summary["rows"]}
    if "full" not in rows or len(rows) < 2:
        return "can't tell", "Full fine-tuning was not run."
    full, peft = rows["full"], [r for name, r in rows.items() if name != "full"]
    if full["forgetting"] <= noise(summary):  # nothing to be less prone to
        theirs = ", ".join(f"{r['method']} {r['forgetting']:+.4f}" for r in peft)
        return "can't tell at this scale", (
            f"Full fine-tuning did not forget: its loss on the general text moved by {full['forgetting']:+.4f} (the "
            f"methods': {theirs}). A prompt method's rise is its prompt read in front of every row, not a changed "
            f"weight.")
    worse = [r["method"] for r in peft if r["forgetting"] >= full["forgetting"]]
    gain = lambda r: r["humaneval"]["solution_loss"]
    same_gain = [r for r in peft if gain(r) <= gain(full) + noise(summary)]
    numbers = (f"Full fine-tuning's forgetting is {full['forgetting']:+.4f} (HumanEval loss {gain(full):.4f}); the "
               f"methods' range from {min(r['forgetting'] for r in peft):+.4f} to "
               f"{max(r['forgetting'] for r in peft):+.4f}")
    if not worse and full["forgetting"] > noise(summary):
        rider = (f", and {', '.join(r['method'] for r in same_gain)} learned as much or more" if same_gain else
                 ", though none of them learned the task as far (forgetting less can be learning less, as Biderman "
                 "et al. found)")
        return "holds", numbers + rider + "."
    if len(worse) * 2 >= len(peft):
        return "does not hold", numbers + f": {', '.join(worse)} forgot as much or more."
    return "can't tell", numbers + f": {', '.join(worse)} forgot as much or more, the others less."


def slowdown(summary, names, batch, kind="unmerged"):
    """(name, its tokens/s over its bare base's at `batch`) for the rows named that were timed."""
    bases = summary["bases"]
    rate = lambda speed, kind: speed[kind][str(batch)] if speed and speed.get(kind) else None
    return [(r["method"], rate(r["speed"], kind) / rate(bases["nf4" if r["four_bit"] else "fp32"]["speed"], "unmerged"))
            for r in summary["rows"] if r["method"] in names and rate(r["speed"], kind)]


def adapters_slow_claim(summary):
    serial = slowdown(summary, ("bottleneck",), 1), slowdown(summary, ("bottleneck",), 8)
    lora = slowdown(summary, ("lora",), 1), slowdown(summary, ("lora",), 1, "merged")
    if not serial[0]:
        return "can't tell", "Bottleneck adapters were not run."
    b1, b8 = serial[0][0][1], serial[1][0][1]
    why = (f"Bottleneck adapters (in series, never merged) run at {b1:.2f}x the bare base's speed at batch 1 and "
           f"{b8:.2f}x at batch 8")
    if lora[0] and lora[1]:
        why += f"; LoRA unmerged at {lora[0][0][1]:.2f}x at batch 1, merged at {lora[1][0][1]:.2f}x"
    holds = b1 < 0.95 and b1 <= b8
    return ("holds" if holds else "does not hold" if b1 >= 0.95 else "holds in part"), why + "."


def prompt_claim(summary):
    found = slowdown(summary, ("prompt", "prefix", "lopt", "ept", "iapt"), 1)
    if not found:
        return "can't tell", "No prompt method was run."
    rates = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in found)
    slow = [name for name, ratio in found if ratio < 0.95]
    return ("holds" if slow else "does not hold at this prompt length"), (
        f"At batch 1 (a 32-token prompt, 32 new tokens), against the bare base: {rates}. The length limit holds by "
        f"construction: prompt tuning's 16 positions come out of the model's context.")


def rank_claim(summary):
    runs = summary["ranks"].get("lora")
    if not runs or len(runs) < 4:
        return "can't tell", "The LoRA rank sweep was not run (or has fewer than four ranks)."
    losses = {m["r"]: m["humaneval_loss"] for m in runs}
    ranks = sorted(losses)
    middle = ranks[len(ranks) // 2]
    early, late = losses[ranks[0]] - losses[middle], losses[middle] - losses[ranks[-1]]
    said = ", ".join(f"r {r}: {losses[r]:.4f}" for r in ranks)
    spread = noise(summary)
    if abs(late) <= max(spread, 1e-9) and early > spread:
        return "holds", (f"HumanEval loss {said}: past r {middle} it moves less than the spread over seeds "
                         f"({spread:.4f}).")
    if late > spread and late >= early:
        return "does not hold", f"HumanEval loss {said}: it kept falling past r {middle}."
    return "can't tell", (f"HumanEval loss {said}; the spread over seeds is {spread:.4f}: the curve's shape is not "
                          f"clear of it.")


CLAIMS = [("Trade-offs: parameter efficiency, memory efficiency, model performance, inference cost, training speed.",
           trade_offs),
          ("PEFT is less prone to catastrophic forgetting than full fine-tuning.", forgetting_claim),
          ("Adapters slow down the model, especially for small batch sizes.", adapters_slow_claim),
          ("Prompt tuning limits the maximum length and slows down the model.", prompt_claim),
          ("The effectiveness of higher rank appears to plateau.", rank_claim)]


def style(row) -> dict:
    return {"color": "tab:red" if row["method"] == "full" else "C0", "marker": "o" if row["four_bit"] else "s"}


def draw(folder: Path, summary, curves) -> list:
    """The plots, as (file name, alt text); none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)")
        return []
    rows, made = summary["rows"], []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for axis, key, label, log in ((axes[0], "trainable", "trainable numbers", True),
                                  (axes[1], "peak_mb", "peak training memory (MB)", False)):
        for r in rows:
            axis.scatter(r[key], r["humaneval"]["solution_loss"], **style(r))
            axis.annotate(r["method"], (r[key], r["humaneval"]["solution_loss"]), fontsize=8)
        front = sorted((r[key], r["humaneval"]["solution_loss"]) for r in rows
                       if r["method"] in pareto([(x["method"], x[key], x["humaneval"]["solution_loss"]) for x in rows]))
        axis.plot(*zip(*front), color="gray", linestyle="--", linewidth=1) if front else None
        axis.set(xlabel=label, ylabel="HumanEval loss (lower is better)", xscale="log" if log else "linear")
    for r in rows:
        axes[2].scatter(r["forgetting"], r["humaneval"]["solution_loss"], **style(r))
        axes[2].annotate(r["method"], (r["forgetting"], r["humaneval"]["solution_loss"]), fontsize=8)
    axes[2].set(xlabel="forgetting: rise of the general-text loss", ylabel="HumanEval loss")
    fig.suptitle("Quality against cost and against forgetting (dashed: the Pareto front; circles: the NF4 base, "
                 "squares: the fp32 base; red: full fine-tuning)")
    fig.tight_layout()
    fig.savefig(folder / "methods_pareto.png", dpi=90)
    made.append(("methods_pareto.png", "HumanEval loss against trainable numbers, peak memory and forgetting"))
    if summary["ranks"]:
        fig, axis = plt.subplots(figsize=(6.4, 4.2))
        for method, runs in summary["ranks"].items():
            axis.plot([m["r"] for m in runs], [m["humaneval_loss"] for m in runs], marker="o", label=method)
        axis.set(xscale="log", xlabel="rank r", ylabel="HumanEval loss", title="Quality against rank")
        axis.legend()
        fig.tight_layout()
        fig.savefig(folder / "methods_rank.png", dpi=90)
    plt.close("all")
    from minipeft.train.reporting import plot_losses

    if plot_losses(folder / "methods_loss.png", curves, "code task: training loss"):
        made.append(("methods_loss.png", "training loss of every row"))
    return made


if __name__ == "__main__":  # METHODS.md again from a run's summary.json (the rules or the wording changed)
    import argparse
    import json

    parser = argparse.ArgumentParser(description="bench/METHODS.md from the summary.json of a bench/methods.py run")
    parser.add_argument("summary", help="RESULTS/summary.json")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "METHODS.md"))
    args = parser.parse_args()
    write(Path(args.out), json.loads(Path(args.summary).read_text()))
