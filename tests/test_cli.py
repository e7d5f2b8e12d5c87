"""The `minipeft` command: generate serves several adapters in one mixed batch, merge writes a checkpoint that
transformers loads as it is (logits equal to the unmerged adapter), count works on the meta device."""

import json
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import load_adapter, load_model, save_adapter
from minipeft.methods.table import parameter_table
from minipeft.methods.freezing import adapter_parameters
from tests.helpers import ROOT, write_hf_checkpoint


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minipeft", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, input=stdin, timeout=600)


def trained_looking(model, add, seed=0):
    torch.manual_seed(seed)
    add(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


MERGEABLE = {
    "lora": lambda m: minipeft.add_lora(m, ["q", "v", "down"], r=4, dropout=0.1),  # off: the model is in eval
    "dora": lambda m: minipeft.add_lora(m, ["q", "o", "up"], r=4, use_dora=True),
    "ia3": lambda m: minipeft.add_ia3(m),
    "bitfit": lambda m: minipeft.add_bitfit(m, ["v", "gate"], norms=True),
}


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_export_loads_in_transformers_with_the_adapters_logits(tmp_path, method):
    from transformers import LlamaForCausalLM

    write_hf_checkpoint(tmp_path / "base")
    model = trained_looking(load_model(tmp_path / "base"), MERGEABLE[method])
    save_adapter(model, tmp_path / "adapter")
    result = run("merge", "--weights", tmp_path / "base", "--adapter", tmp_path / "adapter",
                 "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-2000:]
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(exported(input_ids=ids).logits, model(ids), rtol=0, atol=1e-5)


def test_merge_from_a_4bit_base_dequantizes_and_reports_the_error(tmp_path):
    from transformers import LlamaForCausalLM

    write_hf_checkpoint(tmp_path / "base")
    model = trained_looking(load_model(tmp_path / "base", quantize="nf4"), MERGEABLE["lora"])
    save_adapter(model, tmp_path / "adapter")
    result = run("merge", "--4bit", "--dtype", "bf16", "--weights", tmp_path / "base", "--adapter",
                 tmp_path / "adapter", "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-2000:]
    error = float(result.stdout.strip().rsplit(" ", 1)[-1])
    assert error < 1e-4, result.stdout
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert exported.dtype == torch.bfloat16 and json.loads((tmp_path / "merged" / "config.json").read_text())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():  # bf16 weights: within bf16's rounding of the 4-bit model with its adapter
        assert (exported.float()(input_ids=ids).logits - model(ids)).abs().max() < 0.05


def test_merge_refuses_what_cannot_be_merged_and_adapters_for_another_base(tmp_path):
    write_hf_checkpoint(tmp_path / "base")
    write_hf_checkpoint(tmp_path / "wider", hidden_size=96, num_attention_heads=4)
    prefix = load_model(tmp_path / "base")
    minipeft.add_prefix_tuning(prefix, 3)
    save_adapter(prefix, tmp_path / "prefix")
    wider = load_model(tmp_path / "wider")
    minipeft.add_lora(wider, ["q"])
    save_adapter(wider, tmp_path / "wider_lora")
    for adapter, needle in (("prefix", "PREFIX_TUNING adapter (LearnedPast) is not a change to a weight"),
                            ("wider_lora", "has shape")):
        result = run("merge", "--weights", tmp_path / "base", "--adapter", tmp_path / adapter, "--out", tmp_path / "x")
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_generate_serves_each_prompt_with_its_adapter_in_one_batch(default_weights, tmp_path):
    model, tokenizer = minipeft.load(default_weights)
    trained_looking(model, lambda m: minipeft.add_lora(m, ["q", "v"], r=4, name="code"), seed=1)
    trained_looking(model, lambda m: minipeft.add_prompt_tuning(m, 4, name="fox"), seed=2)
    save_adapter(model, tmp_path / "both")
    prompts = [("fox", "A quick brown fox"), ("code", "import"), (None, "Hello")]
    expected = []
    for name, text in prompts:
        minipeft.set_adapter(model, name)
        expected.append(text + tokenizer.decode(minipeft.generate(model, [tokenizer.encode(text)], 8)[0]))
    result = run("generate", "--weights", default_weights, "--adapter", f"fox={tmp_path / 'both' / 'fox'}",
                 "--adapter", f"code={tmp_path / 'both' / 'code'}", "--prompt", "fox:A quick brown fox",
                 "--prompts-file", "-", "--max-new-tokens", 8, stdin="code:import\n-:Hello\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "".join(f"[{name or '-'}] {text}\n" for (name, _), text in zip(prompts, expected))
    bad = run("generate", "--weights", default_weights, "--adapter", f"fox={tmp_path / 'both' / 'fox'}",
              "--prompt", "tea:Hello")
    assert bad.returncode == 2 and "NAME one of ['fox'] or '-'" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_count_on_the_meta_device_equals_the_table():
    result = run("count", "--config", "llama-7b", "--method", "lora", "--r", "8", "--targets", "q_proj,v_proj")
    assert result.returncode == 0, result.stderr
    expected = next(r["trainable_params"] for r in parameter_table()
                    if r["method"] == "LoRA, r = 8" and r["shape"] == "Llama-7B")
    assert f"trainable params: {expected:,} " in result.stdout
