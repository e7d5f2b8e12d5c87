"""What the training scripts leave behind: report.json, a loss curve, and checks on their arguments."""

import json
import shutil
from pathlib import Path

import torch

from ..errors import BadInput
from ..files import write_atomically
from ..llama.loader import DEFAULT_DIR, PREPARE_COMMAND
from ..methods.named_adapters import wrappers
from ..methods.prompt_tuning import nearest_tokens


def check_positive(**values):
    for name, value in values.items():
        if value is None or value <= 0:
            raise BadInput(f"--{name.replace('_', '-')}: expected a value > 0, got {value}")


def check_weights(weights_dir) -> Path:
    weights_dir = Path(weights_dir)
    if not (weights_dir / "config.json").is_file():
        if weights_dir.resolve() == DEFAULT_DIR:
            raise BadInput(f"{weights_dir}: default weights not prepared; run: {PREPARE_COMMAND}")
        raise BadInput(f"{weights_dir}: no config.json here (expected a Hugging Face-layout Llama checkpoint)")
    return weights_dir


def prepare_output_dir(out, need_bytes=16 * 2**20) -> Path:
    """Create `out` and prove it is writable, with room for the run's files, before training time is spent."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / ".write-test", b"ok")
        (out / ".write-test").unlink()
    except OSError as e:
        raise BadInput(f"--out {out}: cannot write there ({e.strerror or e})") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise BadInput(f"--out {out}: only {free / 2**20:.1f} MiB free, the run needs about "
                       f"{need_bytes / 2**20:.0f} MiB for checkpoints and reports")
    return out


def write_report(path, report: dict):
    write_atomically(path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())


def plot_losses(path, series: dict, title: str):
    """A PNG of each {label: (steps, values)} curve; skipped with a note if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no {Path(path).name})")
        return False
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, (steps, values) in series.items():
        axes.plot(steps, values, label=label)
    axes.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def prompt_neighbours(model, tokenizer, k=5) -> list[list[tuple[str, float]]]:
    """For each learned prompt vector on the model (prompt tuning, LoPT, EPT), its k nearest vocabulary tokens by
    cosine, as (token text, cosine): what the vector means, read off the vocabulary. [] without learned prompts."""
    found = [module for _, module in wrappers(model) if hasattr(module, "prompts")]
    neighbours = []
    with torch.no_grad():
        for module in found:
            cosine, ids = nearest_tokens(module.prompts(), model.model.embed_tokens.weight, k)
            neighbours += [[(tokenizer.decode([t]), round(c, 4)) for t, c in zip(row_ids, row_cos)]
                           for row_ids, row_cos in zip(ids.tolist(), cosine.tolist())]
    return neighbours


def write_samples(path, rows):
    """samples.md: each prompt's generation before and after training, as plain fenced blocks that read the same
    in a terminal and in a Markdown viewer. rows: (prompt, mode, before, after)."""
    fence = "```"
    lines = ["# Generations before and after training", ""]
    for prompt, mode, before, after in rows:
        while fence in before or fence in after:
            fence += "`"
        lines += [f"## {prompt!r}, {mode}", "", "before:", "", fence, before, fence, "", "after:", "", fence, after,
                  fence, ""]
    write_atomically(path, "\n".join(lines).encode())
