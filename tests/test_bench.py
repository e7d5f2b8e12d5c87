"""The 7B-shape benchmark script runs end to end on CPU at a small shape, for both stacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_shape_benchmark_runs_both_stacks_on_cpu(tmp_path, method):
    """A bf16 checkpoint under fp32 compute, as bench/shape7b.py runs the 7B shape on CPU."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "shape7b.py"), "--shape", "small", "--device", "cpu",
                             "--dtype", "fp32", "--checkpoint-dtype", "bf16", "--method", method, "--batches", "1x64",
                             "--steps", "1", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["stack"] for r in rows] == ["minipeft", "peer"]
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["peak_memory_mb"] >= row["load_peak_memory_mb"] > 0
    # Same random checkpoint, and LoRA's B = 0 (prompts: each side's own sample of vocabulary rows):
    # both stacks start from about the same loss.
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 0.05 * rows[1]["loss"]


def test_cuda_check_script_passes_on_cpu():
    """bench/cuda_check.py (run on a GPU by hand) checks the same things on CPU, so it cannot rot."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_check.py"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"check"')]
    from tests.test_every_method import METHODS

    assert result.returncode == 0 and len(rows) == 7 + len(METHODS) and all(row["ok"] for row in rows), (
        result.stdout + result.stderr)
