"""Training checkpoints hold no pickle, and --resume refuses what it cannot honour, by name."""

import json
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors_bytes

from minipeft import BadInput
from minipeft.train.run_state import CHECKPOINT_FILE, changed_settings, read_checkpoint
from tests.helpers import FAST, ROOT, train_code

sys.path.insert(0, str(ROOT))
import train_code as train_code_script  # noqa: E402


@pytest.fixture(scope="module")
def finished_run(default_weights, code_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train_code("--data", str(code_data), "--out", str(out), "--max-steps", "2", "--save-every", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


class WritesAFile:
    """Unpickling this creates a file: what a planted checkpoint would do to a loader that unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def resume_with(finished_run, tmp_path, data: bytes, code_data, *extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / CHECKPOINT_FILE).write_bytes(data)
    return train_code("--data", str(code_data), "--out", str(out), "--max-steps", "2", "--resume", *extra)


def test_a_planted_pickle_is_refused_and_never_runs(finished_run, tmp_path, code_data):
    marker = tmp_path / "pwned"
    for payload in (pickle.dumps(WritesAFile(marker)), _torch_save(WritesAFile(marker))):
        result = resume_with(finished_run, tmp_path, payload, code_data)
        assert result.returncode == 2 and "not a readable training checkpoint" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not marker.exists()


def _torch_save(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_bad_checkpoint_files_get_one_line(finished_run, tmp_path):
    good = (finished_run / CHECKPOINT_FILE).read_bytes()
    not_state = save_safetensors_bytes({"x": torch.zeros(1)}, metadata={"format": "minipeft-run-state-1",
                                                                         "state": "[1, 2, 3]"})
    cases = {"random bytes": bytes(range(256)) * 40, "truncated": good[:len(good) // 2], "empty": b"",
             "non-dict state": not_state, "no state": save_safetensors_bytes({"x": torch.zeros(1)})}
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(BadInput) as error:
            read_checkpoint(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), name


def test_a_checkpoint_of_another_run_is_refused_by_name(finished_run, tmp_path, code_data):
    data = (finished_run / CHECKPOINT_FILE).read_bytes()
    for flags, named in ((["--r", "4"], "--r"), (["--no-4bit"], "--no-4bit"), (["--lr", "1e-3"], "--lr"),
                         (["--accum", "3"],
                          "the micro-batches per step, processes x --accum (2 in the checkpoint, 3 here)")):
        result = resume_with(finished_run, tmp_path, data, code_data, *flags)
        assert result.returncode == 2, result.stderr[-500:]
        assert result.stderr.startswith(f"error: --resume: {named}") and len(result.stderr.strip().splitlines()) == 1


FREE_ON_RESUME = ("out", "resume", "save_every", "new_tokens", "no_samples")  # where files go, and the samples shown


def test_every_setting_that_changes_the_result_is_compared():
    """Each train_code.py option is either compared on --resume or listed as free; each compared one is named."""
    options = {action.dest for action in train_code_script.build_parser()._actions if action.dest != "help"}
    compared, free = set(train_code_script.RESUME_MUST_MATCH), set(FREE_ON_RESUME)
    grow = set(train_code_script.RESUME_MAY_GROW)  # --max-steps: a resume may go further (test_everyday.py)
    assert options == compared | free | grow | {"accum"} and not compared & free  # --accum: as processes x --accum
    assert not grow & (compared | free)
    saved = {key: f"value of {key}" for key in compared} | {"base_fingerprint": "abc", "micro_batches_per_step": 4}
    for key in saved:
        changed = changed_settings(saved, {**saved, key: "something else"})
        assert len(changed) == 1 and (key.replace("_", "-") in changed[0] or "base weights" in changed[0]
                                      or "--accum" in changed[0]), key


def test_a_changed_base_is_refused(tmp_path, code_data, default_weights):
    """Same flags and the same --weights path, but other numbers in its safetensors: the fingerprint tells."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights, out = tmp_path / "weights", tmp_path / "out"
    shutil.copytree(default_weights, weights)
    common = ["--weights", str(weights), "--data", str(code_data), "--out", str(out), "--max-steps", "1"]
    first = train_code(*common)
    assert first.returncode == 0, first.stderr[-1000:]
    tensors = load_file(weights / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, weights / "model.safetensors")
    result = train_code(*common, "--resume")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --resume: the base weights (their fingerprint) differ"), result.stderr


def test_no_pickle_on_files_from_outside():
    """No torch.load, pickle or weights_only=False anywhere in the package or the scripts."""
    sources = [*Path(ROOT / "minipeft").rglob("*.py"), ROOT / "train_fox.py", ROOT / "train_code.py"]
    pattern = re.compile(r"torch\.load\(|\bpickle\b|weights_only\s*=\s*False|numpy\.load\(|np\.load\(")
    offending = [f"{path}:{number}" for path in sources
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offending == []


def run_files(finished_run):
    good = {name: (finished_run / name).read_bytes() for name in (CHECKPOINT_FILE, "metrics.jsonl")}
    state, _ = read_checkpoint(finished_run / CHECKPOINT_FILE)
    wrong_state = save_safetensors_bytes({"x": torch.zeros(1)}, metadata={
        "format": "minipeft-run-state-1", "state": json.dumps({**state, "step": "2"})})
    planted = pickle.dumps(WritesAFile("/nonexistent/planted"))
    return {(CHECKPOINT_FILE, "empty"): b"", (CHECKPOINT_FILE, "truncated"): good[CHECKPOINT_FILE][:5000],
            (CHECKPOINT_FILE, "binary"): planted + bytes(range(256)), (CHECKPOINT_FILE, "wrong-typed"): wrong_state,
            ("metrics.jsonl", "empty"): b"", ("metrics.jsonl", "truncated"): good["metrics.jsonl"][:40],
            ("metrics.jsonl", "binary"): planted, ("metrics.jsonl", "wrong-typed"): b'[1, 2]\n{"step": "1"}\n'}


def test_every_file_of_a_run_replaced_by_bad_content_gives_one_line(finished_run, tmp_path, code_data, monkeypatch,
                                                                    capsys):
    """checkpoint.safetensors and metrics.jsonl, each in turn empty, truncated, binary (a pickle) or of the
    wrong types: --resume ends with one line naming the file and exit code 2, before the base loads. (report.json,
    samples.md and loss.png are written, never read.)"""
    from minipeft.errors import run_cli

    for (name, how), content in run_files(finished_run).items():
        out = tmp_path / f"{name}-{how}"
        out.mkdir()
        for kept in (CHECKPOINT_FILE, "metrics.jsonl"):
            (out / kept).write_bytes((finished_run / kept).read_bytes())
        (out / name).write_bytes(content)
        monkeypatch.setattr(sys, "argv", ["train_code.py", "--data", str(code_data), "--out", str(out),
                                          "--max-steps", "2", "--resume", *FAST])
        monkeypatch.setattr(train_code_script.minipeft, "load", lambda *a, **k: pytest.fail("the base loaded"))
        with pytest.raises(SystemExit) as exit_code:
            run_cli(train_code_script.main)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_code.value.code == 2 and len(lines) == 1 and name in lines[0], (name, how, lines)
