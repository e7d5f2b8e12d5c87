"""The `minipeft` command: generate serves several adapters in one mixed batch, merge writes a checkpoint that
transformers loads as it is (logits equal to the unmerged adapter), count works on the meta device."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import minipeft
from minipeft import formats, load_adapter, load_model, save_adapter
from minipeft.llama.chat import chat_ids
from minipeft.tools.methods_table import parameter_table
from minipeft.methods.freezing import adapter_parameters
from tests.helpers import ROOT, trained_looking, write_hf_checkpoint


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minipeft", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, input=stdin, timeout=600)


MERGEABLE = {
    "lora": lambda m: minipeft.add_lora(m, ["q", "v", "down"], r=4, dropout=0.1),  # off: the model is in eval
    "dora": lambda m: minipeft.add_dora(m, ["q", "o", "up"], r=4),
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
    for weights_there in (True, False):  # refused before the weights are read: the same without them
        if not weights_there:
            (tmp_path / "base" / "model.safetensors").unlink()
        for adapter, needle in (("prefix", "PREFIX_TUNING adapter (LearnedPast) is not a change to a weight"),
                                ("wider_lora", "has shape")):
            result = run("merge", "--weights", tmp_path / "base", "--adapter", tmp_path / adapter,
                         "--out", tmp_path / "x")
            assert result.returncode == 2 and needle in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1


def test_an_adapter_merged_into_a_base_is_refused_on_it_and_files_follow_the_umask(tmp_path):
    import os
    import stat

    write_hf_checkpoint(tmp_path / "base")
    model = trained_looking(load_model(tmp_path / "base"), MERGEABLE["lora"])
    save_adapter(model, tmp_path / "adapter")
    shutil.copytree(tmp_path / "adapter", tmp_path / "copy")  # the same adapter, elsewhere
    old = os.umask(0o027)
    try:
        assert run("merge", "--weights", tmp_path / "base", "--adapter", tmp_path / "adapter",
                   "--out", tmp_path / "merged").returncode == 0
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "merged" / name).stat().st_mode) == 0o640, name  # 0666 less the umask
    recorded = json.loads((tmp_path / "merged" / "config.json").read_text())["minipeft_merged"]
    assert [m["peft_type"] for m in recorded] == ["LORA"]
    (tmp_path / "merged" / "model.safetensors").rename(tmp_path / "merged.safetensors")  # refused before it is read
    for args in (["generate", "--adapter", f"code={tmp_path / 'copy'}", "--prompt", "code:hi"],
                 ["merge", "--adapter", tmp_path / "copy", "--out", tmp_path / "twice"],
                 ["serve", "--adapter", f"code={tmp_path / 'copy'}", "--port", "0"]):
        result = run(*args, "--weights", tmp_path / "merged")
        assert result.returncode == 2, (args, result.stderr)
        assert "is already merged into the base merged" in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    other = trained_looking(load_model(tmp_path / "base"), MERGEABLE["ia3"])  # another adapter is not refused
    save_adapter(other, tmp_path / "other")
    (tmp_path / "merged.safetensors").rename(tmp_path / "merged" / "model.safetensors")
    result = run("merge", "--weights", tmp_path / "merged", "--adapter", tmp_path / "other", "--out", tmp_path / "both")
    assert result.returncode == 0, result.stderr[-2000:]
    both = json.loads((tmp_path / "both" / "config.json").read_text())["minipeft_merged"]
    assert [m["peft_type"] for m in both] == ["LORA", "IA3"] and both[0] == recorded[0]


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`minipeft nearest ... | head -1`: no BrokenPipeError traceback (10 MB of lines, far past a pipe's buffer)."""
    code = "from minipeft.errors import run_cli; run_cli(lambda: [print('x' * 99) for _ in range(100_000)])"
    result = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.stdout == "x" * 99 + "\n" and result.stderr == ""


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


# ---- the base an adapter was trained on travels with it ------------------------------------------------------

def test_an_adapter_file_says_how_its_base_was_loaded_and_peft_still_reads_it(tmp_path):
    from peft.utils import load_peft_weights
    from safetensors import safe_open

    write_hf_checkpoint(tmp_path / "base")
    model = trained_looking(load_model(tmp_path / "base", quantize="nf4", double_quant=True), MERGEABLE["lora"])
    save_adapter(model, tmp_path / "adapter")
    assert formats.trained_base(tmp_path / "adapter") == {"quantize": "nf4", "double_quant": True,
                                                          "dtype": "float32"}
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "minipeft_base_quantize": "nf4",
                                "minipeft_base_double_quant": "true", "minipeft_base_dtype": "float32"}
    from_peft = load_peft_weights(str(tmp_path / "adapter"))
    assert {k: v.shape for k, v in from_peft.items()} == {
        f"base_model.model.{name}": p.shape for name, p in adapter_parameters(model).items()}
    plain = trained_looking(load_model(tmp_path / "base"), MERGEABLE["ia3"])
    save_adapter(plain, tmp_path / "plain")
    assert formats.trained_base(tmp_path / "plain") == {"quantize": None, "double_quant": False, "dtype": "float32"}


def test_generate_serves_an_adapter_on_the_base_it_was_trained_on(default_weights, tmp_path):
    """Trained on NF4: generate loads NF4 unless told otherwise, and says so in one line when it is."""
    answers = {}
    for four_bit in (True, False):
        model, tokenizer = minipeft.load(default_weights, quantize="nf4" if four_bit else None)
        if four_bit:
            trained_looking(model, lambda m: minipeft.add_lora(m, ["q", "v", "down"], r=8), seed=3)
            save_adapter(model, tmp_path / "adapter")
        else:  # the same tensors on the full-precision base
            load_adapter(model, tmp_path / "adapter")
        answers[four_bit] = tokenizer.decode(minipeft.generate(model, [tokenizer.encode("The fox")], 12)[0])
    assert answers[True] != answers[False]  # the base matters, so the test can tell which one was used
    as_trained = run("generate", "--weights", default_weights, "--adapter", tmp_path / "adapter",
                     "--prompt", "default:The fox", "--max-new-tokens", 12)
    assert as_trained.returncode == 0, as_trained.stderr
    assert as_trained.stdout == f"[default] The fox{answers[True]}\n"
    assert "note:" not in as_trained.stderr
    overridden = run("generate", "--weights", default_weights, "--adapter", tmp_path / "adapter", "--no-4bit",
                     "--prompt", "default:The fox", "--max-new-tokens", 12)
    assert overridden.returncode == 0 and overridden.stdout == f"[default] The fox{answers[False]}\n"
    notes = [line for line in overridden.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: --no-4bit loads the full-precision base (float32), but the adapter was trained on the "
                     "NF4 base (float32 compute): its outputs will differ from training"]


def test_merge_defaults_to_the_base_the_adapter_was_trained_on(tmp_path):
    from transformers import LlamaForCausalLM

    write_hf_checkpoint(tmp_path / "base")
    model = trained_looking(load_model(tmp_path / "base", quantize="nf4"), MERGEABLE["lora"])
    save_adapter(model, tmp_path / "adapter")
    result = run("merge", "--weights", tmp_path / "base", "--adapter", tmp_path / "adapter", "--out", tmp_path / "m")
    assert result.returncode == 0 and "into the NF4 base (float32 compute)" in result.stdout, result.stderr[-2000:]
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():  # fp32 export of the dequantized NF4 weights plus the fold: the trained model's logits
        assert (exported(input_ids=ids).logits - model(ids)).abs().max() < 1e-4
        full = load_model(tmp_path / "base")
        load_adapter(full, tmp_path / "adapter")
        assert (full(ids) - model(ids)).abs().max() > 1e-2  # the full-precision base would have been different


def test_adapters_trained_on_different_bases_need_a_choice(tmp_path):
    write_hf_checkpoint(tmp_path / "base")
    save_adapter(trained_looking(load_model(tmp_path / "base", quantize="nf4"), MERGEABLE["lora"]), tmp_path / "a")
    save_adapter(trained_looking(load_model(tmp_path / "base"), MERGEABLE["lora"]), tmp_path / "b")
    result = run("generate", "--weights", tmp_path / "base", "--adapter", f"a={tmp_path / 'a'}",
                 "--adapter", f"b={tmp_path / 'b'}", "--prompt", "a:x")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "a on the NF4 base (float32 compute); b on the full-precision base (float32)" in result.stderr


# ---- arguments: every mistake is one line and exit code 2 ------------------------------------------------------

def test_a_prompt_for_the_bare_base_is_a_value_not_a_flag():
    from minipeft.cli import build_parser, prompts_as_values

    argv = prompts_as_values(["generate", "--prompt", "-:Hello", "--prompt", "--x", "--max-new-tokens", "4"])
    assert argv == ["generate", "--prompt=-:Hello", "--prompt=--x", "--max-new-tokens", "4"]
    assert build_parser().parse_args(argv).prompt == ["-:Hello", "--x"]


def test_a_missing_prompts_file_is_one_line(tmp_path):
    result = run("generate", "--prompts-file", tmp_path / "missing.txt")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: --prompts-file {tmp_path / 'missing.txt'}: No such file or directory"


def test_chat_wraps_the_prompt_in_the_template_and_stops_at_the_end_of_the_turn(default_weights):
    model, tokenizer = minipeft.load(default_weights, quantize="nf4")  # a bare base: NF4, as serve loads it
    ids = chat_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    answer = tokenizer.decode(minipeft.generate(model, [ids], 24)[0])
    result = run("generate", "--weights", default_weights, "--chat", "--prompt", "-:What is the capital of France?",
                 "--max-new-tokens", 24)
    assert result.returncode == 0 and result.stdout == f"[-] What is the capital of France? -> {answer}\n"
    assert "Paris" in answer and "<|im_end|>" not in answer


TOKENS = ["generate", "merge", "count", "--weights", "--adapter", "--prompt", "--prompts-file", "--max-new-tokens",
          "--temperature", "--top-p", "--seed", "--device", "--out", "--dtype", "--config", "--method", "--r",
          "--4bit", "--no-4bit", "--chat", "-", "-:x", "x:y", "0", "-1", "nan", "1e9", "cuda:7", "bf16", "lora",
          "/nonexistent", "a=b", "", "--"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS) | st.text(max_size=6), max_size=7))
def test_fuzzed_command_lines_end_in_one_line_or_succeed(argv):
    """Any command line ends with exit code 0, or 2 and one line on stderr: never a traceback. Weights are
    never found, so nothing long runs."""
    import contextlib
    import io

    from minipeft.cli import main

    argv = [a if a != "/nonexistent" else "/nonexistent/weights" for a in argv]
    if argv and argv[0] in ("generate", "merge"):
        argv = [*argv, "--weights", "/nonexistent/weights"]
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code or 0
    lines = [line for line in stderr.getvalue().splitlines() if not line.startswith(("note:", "loading"))]
    assert code in (0, 2), (argv, code, stderr.getvalue())
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, stderr.getvalue())


def test_a_bf16_trained_adapter_merges_and_serves_beside_an_fp32_one(tmp_path, capsys):
    """train_code.py computes in bf16 on CPUs with AVX512-BF16 (train_fox.py in fp32): the merge of such an adapter
    dequantizes the NF4 base it trained on and computes in fp32; served beside an fp32-trained adapter, both run
    in fp32, said in one line."""
    from transformers import LlamaForCausalLM

    write_hf_checkpoint(tmp_path / "base")
    bf16 = trained_looking(load_model(tmp_path / "base", quantize="nf4", dtype=torch.bfloat16), MERGEABLE["lora"])
    save_adapter(bf16, tmp_path / "code")
    assert formats.trained_base(tmp_path / "code")["dtype"] == "bfloat16"
    merged = run("merge", "--weights", tmp_path / "base", "--adapter", tmp_path / "code", "--out", tmp_path / "m")
    assert merged.returncode == 0 and "into the NF4 base (bfloat16 compute)" in merged.stdout, merged.stderr[-2000:]
    assert float(merged.stdout.strip().rsplit(" ", 1)[-1]) < 1e-4  # the fold itself, in fp32
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        as_trained = bf16(ids).float()
    with torch.no_grad():
        assert (exported(input_ids=ids).logits - as_trained).abs().max() < 0.1  # bf16 compute's rounding only

    save_adapter(trained_looking(load_model(tmp_path / "base", quantize="nf4"), MERGEABLE["ia3"]), tmp_path / "fox")
    from minipeft.cli import base_for

    capsys.readouterr()  # what came before
    assert base_for({"fox": tmp_path / "fox", "code": tmp_path / "code"}, None) == {
        "quantize": "nf4", "double_quant": False, "dtype": "float32"}
    assert capsys.readouterr().err.splitlines() == [
        "note: code trained with bfloat16 compute, the rest with float32: serving all in float32, so code may "
        "answer slightly otherwise than in training"]
