"""One trained adapter, or the bare base, scored in its own process for bench/methods.py: HumanEval
(bench/humaneval.py: the canonical solutions' loss, greedy pass@1) and the loss on general text
(bench/forgetting.py), whose rise over the bare base's is the forgetting. Writes one JSON.

    .venv/bin/python bench/score.py --weights DIR [--adapter DIR] --json OUT [--limit 20] [--text FILE]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--adapter", help="an adapter directory to put on the base")
    parser.add_argument("--limit", type=int, default=20, help="HumanEval pass@1 on the first N problems (default: 20)")
    parser.add_argument("--new-tokens", type=int, default=256, help="new tokens a completion (default: 256)")
    parser.add_argument("--text", default=str(forgetting.DEFAULT_TEXT), help="the general text (default: %(default)s)")
    parser.add_argument("--json", required=True, help="where the result goes")
    args = parser.parse_args()
    if not 0 <= args.limit <= 164:
        raise SystemExit(f"--limit should be in [0, 164], got {args.limit}")
    started = time.time()
    model, tokenizer = humaneval.load_scored(args.weights, args.adapter)
    result = humaneval.measure(model, tokenizer, args.limit, args.new_tokens)
    rows = forgetting.general_text(args.text)[:forgetting.ROWS]
    result["general_loss"] = forgetting.text_loss(model, tokenizer, rows)
    result.update(weights=args.weights, adapter=args.adapter, seconds=time.time() - started)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
