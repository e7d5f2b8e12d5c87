"""One trained adapter, or a bare base, scored in its own process for bench/methods.py: HumanEval
(bench/humaneval.py: the canonical solutions' loss, greedy pass@1, pass@10), the loss on general text
(bench/forgetting.py), whose rise over the bare base's is the forgetting, and the cost of generating with it
(tokens/s at batch 1 and 8, the adapter as trained and merged into the base). Writes one JSON.

    .venv/bin/python bench/score.py --weights DIR [--adapter DIR] --json OUT [--limit 20] [--sampled 0] [--speed]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import forgetting  # noqa: E402
import humaneval  # noqa: E402

SPEED_PROMPT, SPEED_TOKENS, SPEED_REPEATS = 32, 32, 3  # tokens in, tokens out, the best of so many


def tokens_per_second(model, batch: int) -> float:
    """Greedy generation's new tokens a second, `batch` prompts of SPEED_PROMPT tokens each making SPEED_TOKENS
    (no stop token), the best of SPEED_REPEATS after one to warm up: the prefill counted, as a user waits for it."""
    import minipeft

    prompts = [[(7919 * (i + row)) % model.config.vocab_size for i in range(SPEED_PROMPT)] for row in range(batch)]
    minipeft.generate(model, prompts, max_new_tokens=2, eos_id=[])
    best = float("inf")
    for _ in range(SPEED_REPEATS):
        started = time.perf_counter()
        minipeft.generate(model, prompts, max_new_tokens=SPEED_TOKENS, eos_id=[])
        best = min(best, time.perf_counter() - started)
    return batch * SPEED_TOKENS / best


def speeds(model) -> dict:
    """Tokens/s at batch 1 and 8 as loaded, and again with every change to a weight merged into the base where
    the adapter is only such changes (None where it is not: learned prompts, a learned past, adapters in
    series)."""
    import minipeft
    from minipeft.methods.named_adapters import wrappers

    found = [m for _, m in wrappers(model)]
    result = {"unmerged": {batch: tokens_per_second(model, batch) for batch in (1, 8)}, "merged": None}
    if found and all(hasattr(m, "merge") for m in found):
        try:
            minipeft.merge(model)
        except minipeft.BadInput as refused:  # IA3 on a 4-bit base: it would round the weight again
            result["merge_refused"] = str(refused)
            return result
        result["merged"] = {batch: tokens_per_second(model, batch) for batch in (1, 8)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--adapter", help="an adapter directory to put on the base")
    parser.add_argument("--no-4bit", action="store_true", help="the base as stored (full fine-tuning's, the fp32 "
                                                               "LoRA's), not NF4")
    parser.add_argument("--limit", type=int, default=20, help="HumanEval pass@1 on the first N problems (default: 20)")
    parser.add_argument("--sampled", type=int, default=0, help="pass@10 on the first N problems (default: 0)")
    parser.add_argument("--new-tokens", type=int, default=256, help="new tokens a completion at most (default: 256)")
    parser.add_argument("--text", default=str(forgetting.DEFAULT_TEXT), help="the general text (default: %(default)s)")
    parser.add_argument("--speed", action="store_true", help="time generation at batch 1 and 8, unmerged and merged")
    parser.add_argument("--json", required=True, help="where the result goes")
    args = parser.parse_args()
    for flag, value in (("--limit", args.limit), ("--sampled", args.sampled)):
        if not 0 <= value <= 164:
            raise SystemExit(f"{flag} should be in [0, 164], got {value}")
    started = time.time()
    model, tokenizer = humaneval.load_scored(args.weights, args.adapter, four_bit=not args.no_4bit)
    result = humaneval.measure(model, tokenizer, args.limit, args.new_tokens, args.sampled)
    rows = forgetting.general_text(args.text)[:forgetting.ROWS]
    result["general_loss"] = forgetting.text_loss(model, tokenizer, rows)
    result["scoring_seconds"] = time.time() - started
    result["speed"] = speeds(model) if args.speed else None  # last: merging changes the model
    result.update(weights=args.weights, adapter=args.adapter, four_bit=not args.no_4bit,
                  seconds=time.time() - started)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
