"""What a soft prompt means (Lester et al.): each learned vector's nearest vocabulary tokens by cosine, written
out here row by row; a prompt started from vocabulary rows is nearest to them; `minipeft nearest` reads only
the vocabulary and the adapter, and refuses an adapter that learns no vectors in the embedding space."""

import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.testing import assert_close

import minipeft
from minipeft.methods.prompt_tuning import nearest_tokens
from tests.helpers import ROOT


def test_nearest_tokens_equal_cosine_similarity_row_by_row():
    generator = torch.Generator().manual_seed(0)
    prompts, vocabulary = torch.randn(4, 16, generator=generator), torch.randn(50, 16, generator=generator)
    cosine, ids = nearest_tokens(prompts, vocabulary, k=3)
    for row, prompt in enumerate(prompts):
        every = torch.stack([F.cosine_similarity(prompt, token, dim=0) for token in vocabulary])  # (50,)
        order = sorted(range(50), key=lambda t: -every[t].item())[:3]
        assert ids[row].tolist() == order
        assert_close(cosine[row], every[order], rtol=0, atol=1e-6)


def run(*args):
    return subprocess.run([sys.executable, "-m", "minipeft", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_a_prompt_started_from_vocabulary_rows_is_nearest_to_them(default_weights, tmp_path):
    model, tokenizer = minipeft.load(default_weights)
    minipeft.add_prompt_tuning(model, num_prompts=4, init="vocab", seed=7)
    minipeft.save_adapter(model, tmp_path / "prompt")
    vocab_size = model.model.embed_tokens.weight.shape[0]
    started_from = torch.randint(0, vocab_size, (4,), generator=torch.Generator().manual_seed(7))  # init="vocab"
    result = run("nearest", "--weights", default_weights, "--adapter", tmp_path / "prompt", "--k", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = result.stdout.strip().splitlines()[1:]
    assert len(rows) == 4
    for row, token in zip(rows, started_from.tolist()):
        assert row.strip().split("  ")[1] == f"{tokenizer.decode([token])!r} 1.00", row

    minipeft.add_lora(model, ["q"], name="lora")
    minipeft.delete_adapter(model, "default")
    minipeft.save_adapter(model, tmp_path / "lora")
    refused = run("nearest", "--weights", default_weights, "--adapter", tmp_path / "lora" / "lora")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "a LORA adapter learns no vectors in the token embedding space" in refused.stderr
