"""What a new user meets in the first hour: every input checked before the base loads, runs that can be
extended, shortened or made quieter, schedules that reach the learning rate asked for, and progress on the
long phases."""

import json

import pytest
import torch

import minipeft
from minipeft import progress
from minipeft.train.loop import heldout_loss
from tests.helpers import losses, train_code


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_missing_data_file_is_refused_before_the_base_loads(default_weights, tmp_path):
    result = train_code("--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and str(tmp_path / "missing.jsonl") in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert "loading weights" not in result.stdout + result.stderr and not (tmp_path / "out").exists()


def test_a_warmup_longer_than_the_run_is_cut_and_said(default_weights, code_data, tmp_path):
    """Asked for 10 warmup steps in a 3-step run, the rate still reaches --lr (3e-3), and one line says so."""
    result = train_code("--data", str(code_data), "--out", str(tmp_path), "--max-steps", "3", "--warmup", "10",
                        "--heldout-max", "0", "--no-samples")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("note: --warmup 10 is longer than --max-steps 3, so the learning rate would never reach --lr: warming "
            "up over 3 steps instead") in result.stdout
    assert max(r["lr"] for r in records(tmp_path)) == pytest.approx(3e-3)


def test_held_out_scoring_and_samples_can_be_skipped(default_weights, code_data, tmp_path):
    result = train_code("--data", str(code_data), "--out", str(tmp_path), "--max-steps", "1", "--heldout-max", "0",
                        "--no-samples")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["heldout_loss_before"] is None and report["heldout_loss_after"] is None
    assert report["heldout_samples"] == 0 and not (tmp_path / "samples.md").exists()
    assert "samples.md" not in result.stdout.strip().splitlines()[-1]


def test_resume_extends_a_run_and_names_both_values_when_it_refuses(default_weights, code_data, tmp_path):
    common = ["--data", str(code_data), "--out", str(tmp_path), "--heldout-max", "4", "--no-samples"]
    first = train_code(*common, "--max-steps", "2", "--save-every", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    shorter = train_code(*common, "--max-steps", "1", "--resume")
    assert shorter.returncode == 2 and ("--resume: --max-steps 1 is below the checkpoint's step 2 (its run had "
                                        "--max-steps 2); give at least 2") in shorter.stderr, shorter.stderr
    other_lr = train_code(*common, "--max-steps", "4", "--resume", "--lr", "1e-3")
    assert other_lr.returncode == 2 and "--lr (0.003 in the checkpoint, 0.001 here) differ" in other_lr.stderr
    longer = train_code(*common, "--max-steps", "4", "--resume")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert ("note: --max-steps 4 instead of the checkpoint's 2: from step 2 the learning rate follows the schedule "
            "of a 4-step run") in longer.stdout
    assert len(losses(tmp_path)) == 4 and json.loads((tmp_path / "report.json").read_text())["steps"] == 4
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]


def test_held_out_scoring_and_generation_show_progress(tmp_path, monkeypatch, capsys):
    from tests.helpers import write_hf_checkpoint

    monkeypatch.setattr(progress.Progress, "QUIET_UNDER", 0.0)
    write_hf_checkpoint(tmp_path / "base")
    model = minipeft.load_model(tmp_path / "base")
    samples = [list(range(1, 12))] * 20
    loss = heldout_loss(model, samples, torch.device("cpu"), batch_size=8, progress="held-out loss")
    shown = capsys.readouterr().out
    assert loss > 0 and "held-out loss: 3 / 3 batches (100%)" in shown, shown
    minipeft.generate(model, [[1, 2, 3]], 5, progress="samples")
    assert "samples: 5 / 5 tokens (100%)" in capsys.readouterr().out


def test_the_readme_reaches_the_command_counts_as_its_table_and_names_its_machines(capsys):
    import re
    import sys
    from pathlib import Path

    from minipeft.cli import main

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and "`.venv/bin/minipeft`" in readme
    assert (Path(sys.executable).parent / "minipeft").is_file()  # where `pip install -e .` puts the command
    assert re.findall(r"\bthis\b[^.\n]{0,30}\b(?:machine|CPU)\b", readme) == []  # the machine is named instead
    counted = {}
    for targets in ("q_proj,v_proj", None):
        main(["count", "--config", "llama-7b", "--method", "dora", "--r", "8", *(["--targets", targets] if targets
                                                                                  else [])])
        counted[targets] = re.search(r"trainable params: ([\d,]+)", capsys.readouterr().out).group(1)
    assert "minipeft count --config llama-7b --method dora --r 8 --targets q_proj,v_proj   # the table's DoRA row" \
        in readme
    assert re.search(rf"\| DoRA, r = 8 \| [^|]+ \| {counted['q_proj,v_proj']} \(", readme)  # the Llama-7B column
    assert f"({counted[None]} for\nDoRA r=8 at Llama-7B)" in readme
