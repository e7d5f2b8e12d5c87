"""Sequence classification with a trained head: is this snippet Python code, or English prose?

The lecture notes: "For the classification task we need to train the head additionally." The frozen base
reads the snippet; LoRA (r 8) adapts q, k, v and the MLP's three linears in every block; a new head, score
(2 x D), reads the last real token's hidden state and says which class. Only LoRA's matrices and the head
train (peft: task_type SEQ_CLS, whose modules_to_save is the head).

    .venv/bin/python examples/classify.py [--steps 40] [--method lora|prompt|...]

The snippets come from this Python's standard library: the first lines of module docstrings (prose) and of
function bodies (code), split by file into training and held-out sets. It prints the held-out accuracy
before (the new head alone) and after training, and writes the adapter, head included, in peft's layout.
"""

import argparse
import ast
import hashlib
import sys
import sysconfig
import time
from copy import copy
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minipeft  # noqa: E402
from minipeft.errors import ArgumentParser, run_cli  # noqa: E402
from minipeft.llama.loader import DEFAULT_DIR  # noqa: E402
from minipeft.train.method_choice import add_method_arguments, choose_method, method_settings  # noqa: E402
from minipeft.train.reporting import check_positive, check_weights  # noqa: E402

LABELS = ("prose", "code")


def snippets(max_chars: int) -> tuple[list, list]:
    """(text, label) pairs from the standard library, split into train and held-out by the file's hash."""
    train, heldout = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        found = []
        docstring = ast.get_docstring(tree)
        if docstring and len(docstring) > 40:
            found.append((docstring[:max_chars], 0))
        source = path.read_text(encoding="utf-8")
        body = next((node.body[-1] for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                     and not ast.get_docstring(node) and len(node.body) > 1), None)
        if body is not None:
            code = ast.get_source_segment(source, body) or ""
            if len(code) > 40:
                found.append((code[:max_chars], 1))
        held = hashlib.sha256(path.name.encode()).digest()[0] < 52  # about a fifth of the files
        (heldout if held else train).extend(found)
    return train, heldout


def batch(samples, tokenizer, seq_len, device):
    """Right-padded ids and attention mask (B, T), and the labels (B,)."""
    encoded = [tokenizer.encode(text)[:seq_len] for text, _ in samples]
    longest = max(len(ids) for ids in encoded)
    ids = torch.full((len(samples), longest), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids.to(device), mask.to(device), torch.tensor([label for _, label in samples], device=device)


@torch.no_grad()
def accuracy(model, samples, tokenizer, seq_len, device, batch_size=16) -> float:
    model.eval()
    right = 0
    for start in range(0, len(samples), batch_size):
        ids, mask, labels = batch(samples[start:start + batch_size], tokenizer, seq_len, device)
        right += (minipeft.classify(model, ids, mask).argmax(dim=-1) == labels).sum().item()
    return right / len(samples)


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_DIR), help="HF-layout Llama directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="snippets per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=48, help="tokens kept of each snippet (default: %(default)s)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate, for the method and the head (default: the "
                                                 "method's)")
    parser.add_argument("--out", default="runs/classify", help="where the adapter goes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    add_method_arguments(parser, default_method="lora")
    args = parser.parse_args()
    check_positive(steps=args.steps, batch=args.batch, seq_len=args.seq_len)
    method_settings(copy(args), task="code")  # a flag the method does not read is refused before the base loads
    torch.manual_seed(args.seed)
    train, heldout = snippets(max_chars=300)
    print(f"{len(train)} training and {len(heldout)} held-out snippets; code: {sum(label for _, label in train)} of "
          f"the training ones, {sum(label for _, label in heldout)} of the held-out ones")

    # Load, wrap: the method, then the head beside it, in the same adapter.
    model, tokenizer = minipeft.load(check_weights(args.weights), quantize="nf4")
    choose_method(model, args, task="code")
    head = minipeft.add_task_head(model, num_labels=len(LABELS))
    minipeft.count_parameters(model, verbose=True)
    device = head.score.weight.device
    print(f"held-out accuracy before (the new head alone): "
          f"{accuracy(model, heldout, tokenizer, args.seq_len, device):.3f}")

    # Train: cross-entropy of the class logits at each snippet's last token.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        picked = [train[order[(step * args.batch + i) % len(train)]] for i in range(args.batch)]
        ids, mask, labels = batch(picked, tokenizer, args.seq_len, device)
        loss = F.cross_entropy(minipeft.classify(model, ids, mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:6.1f} s", flush=True)

    # Show.
    after = accuracy(model, heldout, tokenizer, args.seq_len, device)
    print(f"held-out accuracy after: {after:.3f}")
    minipeft.save_adapter(model, Path(args.out) / "adapter", base_model_name_or_path=str(args.weights))
    print(f"wrote {Path(args.out) / 'adapter'} ({args.method} and the head: peft's SEQ_CLS layout)")


if __name__ == "__main__":
    run_cli(main)
