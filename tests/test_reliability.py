"""Bad input gets a one-line error that names the thing; killed runs lose nothing; the base never changes."""

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import minipeft
from minipeft import BadInput, load, load_adapter, load_model, save_adapter
from minipeft.llama.config import LlamaConfig
from minipeft.train.reporting import prepare_output_dir
from minipeft.train.run_state import CHECKPOINT_FILE, read_checkpoint
from tests.helpers import losses, train_code, train_steps, write_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def expect_error(match, call, *args, **kwargs):
    with pytest.raises(BadInput) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message and match in message, message
    return message


# ---- weights ---------------------------------------------------------------------------------------------

@pytest.fixture()
def checkpoint(tmp_path):
    write_hf_checkpoint(tmp_path / "ok")
    return tmp_path / "ok"


def test_weights_directory_and_files(tmp_path, checkpoint):
    expect_error("weights directory not found", load_model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    shutil.copy(checkpoint / "config.json", tmp_path / "empty")
    expect_error("no model.safetensors", load_model, tmp_path / "empty")


def test_truncated_and_corrupt_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error("model.safetensors: not a readable safetensors file", load_model, checkpoint)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + data[100:])
    expect_error("model.safetensors: not a readable safetensors file", load_model, checkpoint)
    path.write_bytes(b"")
    expect_error("model.safetensors: not a readable safetensors file", load_model, checkpoint)


def test_index_names_a_missing_shard(tmp_path):
    write_hf_checkpoint(tmp_path, sharded=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    expect_error(f"names shard {shard!r}", load_model, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    expect_error("weight_map", load_model, tmp_path)


def test_missing_extra_and_misshaped_tensors(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, path)
    expect_error("missing ['model.layers.1.mlp.up_proj.weight']", load_model, checkpoint)
    save_file({**tensors, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}, path)
    expect_error("extra ['model.layers.9.mlp.up_proj.weight']", load_model, checkpoint)
    save_file({**tensors, "model.norm.weight": torch.ones(65)}, path)
    expect_error("model.norm.weight has shape (65,), config.json implies (64,)", load_model, checkpoint)


def test_config_problems(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text("{oops")
    expect_error("config.json: not valid JSON", load_model, checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    expect_error("missing key 'hidden_size'", load_model, checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}))
    expect_error("'num_hidden_layers' should be int", load_model, checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"],
                                                          "model_type": "gpt2"}))
    expect_error("unsupported architecture", load_model, checkpoint)
    (checkpoint / "config.json").unlink()
    expect_error("config.json not found", load_model, checkpoint)


def test_unsupported_dtype_quantization_and_device(checkpoint):
    expect_error("dtype: unsupported", load_model, checkpoint, dtype=torch.int8)
    expect_error("quantize: expected None, 'nf4' or 'fp4'", load_model, checkpoint, quantize="int3")
    expect_error("not a device name", load, checkpoint, device="gpu7")
    if not torch.cuda.is_available():
        expect_error("no CUDA GPU is available; use --device cpu", load, checkpoint, device="cuda")


# ---- tokenizer ---------------------------------------------------------------------------------------------

def test_tokenizer_missing_unreadable_or_too_big(checkpoint, default_weights):
    expect_error("no tokenizer.json or tokenizer.model", load, checkpoint)
    (checkpoint / "tokenizer.model").write_bytes(b"definitely not a protobuf")
    expect_error("tokenizer.model: not a readable sentencepiece model", load, checkpoint)
    (checkpoint / "tokenizer.model").unlink()
    shutil.copy(default_weights / "tokenizer.json", checkpoint)  # 49,152 tokens for a 256-row embedding
    expect_error("tokenizer has 49152 tokens but config.json vocab_size is 256", load, checkpoint)


# ---- adapter files -----------------------------------------------------------------------------------------

@pytest.fixture()
def lora_dir(tmp_path, checkpoint):
    model = load_model(checkpoint)
    minipeft.add_lora(model, ["q_proj", "v_proj"], r=4)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def rewrite_config(directory, **changes):
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def test_adapter_config_problems(lora_dir, checkpoint):
    (lora_dir / "adapter_config.json").write_text("{]")
    expect_error("adapter_config.json: not valid JSON", load_adapter, load_model(checkpoint), lora_dir)
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8}))
    expect_error("key 'r' should be int", load_adapter, load_model(checkpoint), lora_dir)
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "target_modules": ["k_proj"]}))
    expect_error("peft_type 'OFT' is not supported", load_adapter, load_model(checkpoint), lora_dir)
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    expect_error("tensors do not fit the base model: missing", load_adapter, load_model(checkpoint), lora_dir)


def test_adapter_that_does_not_fit_the_base(lora_dir, checkpoint, tmp_path):
    rewrite_config(lora_dir, r=4, target_modules=["q_proj", "v_proj", "c_attn"])
    expect_error("target_modules ['q_proj', 'v_proj', 'c_attn'] are not all modules", load_adapter,
                 load_model(checkpoint), lora_dir)
    rewrite_config(lora_dir, target_modules=["q_proj", "v_proj"], r=6)
    expect_error("has shape (4, 64), the base model needs (6, 64)", load_adapter, load_model(checkpoint), lora_dir)
    wider = tmp_path / "wider"
    write_hf_checkpoint(wider, hidden_size=96, num_attention_heads=4)
    rewrite_config(lora_dir, r=4)
    expect_error("the base model needs (4, 96)", load_adapter, load_model(wider), lora_dir)
    (lora_dir / "adapter_model.safetensors").write_bytes(b"garbage")
    expect_error("adapter_model.safetensors: not a readable safetensors file", load_adapter,
                 load_model(checkpoint), lora_dir)
    shutil.rmtree(lora_dir)
    expect_error("adapter_config.json: not found", load_adapter, load_model(checkpoint), lora_dir)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                        max_size=4), max_leaves=12)
LORA_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "rank_pattern", "alpha_pattern",
             "num_virtual_tokens"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations=st.dictionaries(st.sampled_from(LORA_KEYS), JSON | st.sampled_from(
    ["LORA", "PROMPT_TUNING", ["q_proj"], "v_proj", 0, -3, 10**12, 0.5, float("nan")]), max_size=5),
       drop=st.lists(st.sampled_from(LORA_KEYS), max_size=3), raw=st.none() | st.binary(max_size=64))
def test_fuzz_adapter_loader(tmp_path_factory, mutations, drop, raw):
    """Mutated configs and random bytes: a BadInput, or a loaded adapter; never anything else."""
    directory = tmp_path_factory.mktemp("fuzz")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "lora_dropout": 0.0}
    config.update(mutations)
    for key in drop:
        config.pop(key, None)
    (directory / "adapter_config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    tensors = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.zeros(shape)
               for i in range(2) for ab, shape in (("A", (2, 64)), ("B", (64, 2)))}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    model = minipeft.build_model(TINY, device="cpu")
    try:
        load_adapter(model, directory)
    except BadInput as e:
        assert "\n" not in str(e)


TINY = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


@pytest.mark.filterwarnings("ignore:.*are not Llama config keys")  # random keys: the warning is expected
@settings(max_examples=300, deadline=None)
@given(config=st.dictionaries(st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size",
                                               "rms_norm_eps", "rope_theta", "tie_word_embeddings", "architectures",
                                               "model_type", "eos_token_id"]) | st.text(max_size=5), JSON,
                              max_size=10) | JSON)
def test_fuzz_config_loader(config):
    try:
        LlamaConfig.from_dict(config)
    except BadInput as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzz_config_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_bytes(data)
    try:
        LlamaConfig.from_json(path)
    except BadInput as e:
        assert "\n" not in str(e)


# ---- the scripts: exit code 2, one line, no traceback ---------------------------------------------------------

@pytest.mark.parametrize("script,args,needle", [
    ("train_code.py", ["--r", "0"], "--r: expected a value > 0"),
    ("train_code.py", ["--max-steps", "-5"], "--max-steps"),
    ("train_code.py", ["--data", "/no/such/corpus.jsonl"], "--data /no/such/corpus.jsonl: no such file"),
    ("train_code.py", ["--resume", "--out", "{tmp}/fresh"], "--resume: no checkpoint"),
    ("train_fox.py", ["--weights", "{tmp}"], "no config.json"),
    ("train_fox.py", ["--out", "{tmp}/file/sub"], "cannot write there"),
])
def test_scripts_report_user_errors_in_one_line(default_weights, tmp_path, script, args, needle):
    (tmp_path / "file").write_text("a file, not a directory")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_no_room_to_write_is_an_error_before_training(tmp_path):
    expect_error("MiB free, the run needs", prepare_output_dir, tmp_path, need_bytes=2**60)


def test_sequences_longer_than_the_context_are_cut_with_a_warning(tmp_path, default_weights, code_data):
    """A model whose context (32 tokens) is shorter than --seq-len: samples are cut, with a warning."""
    write_hf_checkpoint(tmp_path / "short", vocab_size=49152, max_position_embeddings=32)
    shutil.copy(default_weights / "tokenizer.json", tmp_path / "short")
    result = train_code("--weights", str(tmp_path / "short"), "--data", str(code_data), "--out", str(tmp_path / "o"),
                        "--max-steps", "1", "--seq-len", "256")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--seq-len 256 is beyond the model's context of 32 tokens" in result.stdout
    assert "samples longer than 32 tokens were truncated" in result.stdout


# ---- faults ------------------------------------------------------------------------------------------------

def test_kill_9_at_random_points_loses_nothing(default_weights, code_data, tmp_path):
    """Several kill -9 rounds; each --resume goes on from the last complete checkpoint; the final adapter
    equals an uninterrupted run's."""
    common = ["--data", str(code_data), "--max-steps", "10", "--save-every", "1"]
    straight = train_code(*common, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    out, rng, kills, resumed_from = tmp_path / "killed", random.Random(1), 0, []

    def checkpoint_step():
        return read_checkpoint(out / CHECKPOINT_FILE)[0]["step"] if (out / CHECKPOINT_FILE).is_file() else 0

    while True:
        start = checkpoint_step()
        resume = ["--resume"] if start else []
        process = train_code(*common, "--out", str(out), *resume, popen=True)
        if kills < 3:
            while process.poll() is None and checkpoint_step() <= start:  # at least one new checkpoint first
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))  # then anywhere: mid-step, mid-write, between steps
            assert process.poll() is None, "the run ended before it could be killed"
            process.send_signal(signal.SIGKILL)
            kills += 1
            stdout, _ = process.communicate()
            assert checkpoint_step() > start  # what a kill leaves is always a complete, newer checkpoint
        else:
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-2000:]
        if resume:
            resumed_from.append(int(re.search(r"resumed at step (\d+)", stdout).group(1)))
        if kills == 3 and process.returncode == 0:
            break
    assert len(resumed_from) == 3 and all(step > 0 for step in resumed_from), resumed_from
    print(f"{kills} kill -9 rounds, then a clean finish")
    assert losses(out) == losses(tmp_path / "straight")
    final, reference = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, tmp_path / "straight"))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(default_weights, code_data, tmp_path):
    result = train_code("--data", str(code_data), "--out", str(tmp_path), "--max-steps", "6", "--save-every", "1",
                        "--lr", "1e30", "--warmup", "1")
    assert result.returncode == 2
    assert "loss became" in result.stderr and "at step 2;" in result.stderr and "Traceback" not in result.stderr
    state, tensors = read_checkpoint(tmp_path / CHECKPOINT_FILE)  # the last good one, step 1, stays
    trainable = [t for name, t in tensors.items() if name.startswith("trainable/")]
    assert state["step"] == 1 and trainable and all(torch.isfinite(t).all() for t in trainable)


def test_default_model_preparation_is_idempotent_and_redoes_a_half_conversion(tmp_path):
    from minipeft.tools.default_model import prepare

    target = tmp_path / "smollm2"
    partial = tmp_path / "smollm2.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")  # left by an interrupted conversion
    prepare(target)
    assert not partial.exists()
    assert load_file(target / "model.safetensors")["model.norm.weight"].shape == (576,)
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    start = time.time()
    prepare(target)  # the second run reuses it
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp and time.time() - start < 1


# ---- the frozen base ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", ["nf4", None])
def test_base_bit_identical_to_the_checkpoint_after_fox_and_code_style_training(default_weights, quantize):
    fresh = minipeft.base_fingerprint(load_model(default_weights, quantize=quantize))
    model, tokenizer = load(default_weights, quantize=quantize)
    prompts = minipeft.add_prompt_tuning(model, num_prompts=4)
    minipeft.add_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, dropout=0.1)
    minipeft.enable_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n")])
    model.train()
    train_steps(model, optimizer, ids, 3)
    assert prompts.learned_prompts.grad is None  # set_to_none by zero_grad: it did train
    assert minipeft.base_fingerprint(model) == fresh


def test_loading_an_adapter_leaves_the_base_until_merge(default_weights, tmp_path):
    from minipeft.llama.quant import dequantize

    model, _ = load(default_weights, quantize="nf4")
    minipeft.add_lora(model, ["q_proj", "k_proj", "v_proj"], r=8)
    with torch.no_grad():
        for layer in minipeft.methods.lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.02)
    save_adapter(model, tmp_path / "adapter")

    base, _ = load(default_weights, quantize="nf4")
    fresh = minipeft.base_fingerprint(base)
    original = {n: dequantize(m).clone() for n, m in base.named_modules() if n.endswith("q_proj")}
    load_adapter(base, tmp_path / "adapter")
    assert minipeft.base_fingerprint(base) == fresh
    merge_error = minipeft.merge(base)
    assert minipeft.base_fingerprint(base) != fresh
    unmerge_error = minipeft.unmerge(base)
    restored = {n.removesuffix(".base_layer"): dequantize(m) for n, m in base.named_modules()
                if n.endswith("q_proj.base_layer")}
    drift = max((restored[n] - original[n]).abs().max().item() for n in original)
    print(f"4-bit merge error {merge_error:.4f}, unmerge error {unmerge_error:.4f}, weight drift {drift:.4f}")
    assert drift <= merge_error + unmerge_error + 1e-6  # back within the measured rounding
