"""train_fox.py end to end on the real default model: a shortened run, its report, and its adapter."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import minipeft

ROOT = Path(__file__).resolve().parent.parent


def run_fox(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_fox.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_short_fox_run_writes_report_and_lowers_loss(default_weights, tmp_path):
    result = run_fox("--out", str(tmp_path), "--max-steps", "6", "--new-tokens", "6")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ["model", "trainable_params", "total_params", "trainable_percent", "steps", "final_loss", "seconds",
                "before", "after", "after_without_adapter", "base_unchanged"]:
        assert key in report
    assert report["trainable_params"] == 16 * 576
    assert report["steps"] == 6 and report["losses"][-1] < report["losses"][0]
    assert report["base_unchanged"] is True
    assert report["after_without_adapter"] == report["before"]  # the frozen base answers as before
    assert len(report["nearest_tokens"]) == 16 and all(len(row) == 5 for row in report["nearest_tokens"])
    assert "prompt 15 is nearest to " in result.stdout

    # The adapter is peft's layout and reproduces the trained prompt's loss in a fresh model.
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 16
    model, tokenizer = minipeft.load(default_weights, quantize="nf4")
    minipeft.load_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([tokenizer.encode("A quick brown fox did not jump over the lazy dog. Besides, that dog "
                                         "deserved it anyway!")])
    with torch.no_grad():
        assert model.loss(ids, ids).item() < report["losses"][0]


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, needle in [(["--num-prompts", "0"], "--num-prompts"), (["--lr", "-1"], "--lr"),
                         (["--max-steps", "0"], "--max-steps"), (["--weights", str(tmp_path / "nope")], "config.json"),
                         # a flag the method does not read, refused before the (here missing) base would load:
                         (["--r", "4", "--weights", str(tmp_path / "nope")], "--r: --method prompt does not use it"),
                         (["--method", "lora", "--num-prompts", "8", "--weights", str(tmp_path / "nope")],
                          "--num-prompts: --method lora does not use it")]:
        result = run_fox("--out", str(tmp_path / "out"), *args)
        assert result.returncode == 2
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        result = run_fox("--device", "cuda", "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and "no CUDA GPU" in result.stderr
