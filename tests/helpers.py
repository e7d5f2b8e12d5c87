"""Helpers shared by the tests (fixtures live in conftest.py): checkpoints written by transformers itself,
a plain training loop, and train_code.py run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--seq-len", "48", "--batch", "1", "--accum", "2", "--warmup", "2", "--lr", "3e-3", "--new-tokens", "4"]


def write_hf_checkpoint(path, *, kv_heads=2, tied=False, sharded=False, seed=0, **overrides):
    """A random Llama checkpoint saved by transformers' own save_pretrained, in HF layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=kv_heads, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**{**shape, **overrides})
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size="60KB" if sharded else "10GB")
    return model


def tiny_with_tokenizer(path, default_weights, **overrides):
    """A random Llama of the default tokenizer's vocabulary, with its tokenizer files: text prompts work, and
    it loads in a moment."""
    import shutil

    write_hf_checkpoint(path, **{"vocab_size": 49152, "max_position_embeddings": 256, "eos_token_id": 2, **overrides})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(default_weights) / name, Path(path) / name)
    return Path(path)


def tiny_with_adapters(folder, default_weights, methods=("lora",)):
    """tiny_with_tokenizer in folder/tiny-llama, and trained-looking adapters for it saved in folder/adapters
    (a LoRA on q and v, r=4; prompt tuning, 4 prompts), one a method named."""
    import minipeft

    adds = {"lora": lambda m: minipeft.add_lora(m, ["q_proj", "v_proj"], r=4, name="lora"),
            "prompt": lambda m: minipeft.add_prompt_tuning(m, num_prompts=4, name="prompt")}
    weights = tiny_with_tokenizer(Path(folder) / "tiny-llama", default_weights)
    model, _ = minipeft.load(weights, quantize="nf4")
    for seed, method in enumerate(methods):
        trained_looking(model, adds[method], seed)
    minipeft.save_adapter(model, Path(folder) / "adapters")
    return weights, Path(folder) / "adapters"


def train_steps(model, optimizer, ids, steps):
    """A plain training loop on one batch; returns the losses."""
    losses = []
    for _ in range(steps):
        loss = model.loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def train_code(*args, **popen):
    """train_code.py in a subprocess with short settings; `popen=True` returns the running process."""
    command = [sys.executable, str(ROOT / "train_code.py"), *FAST, *args]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def losses(out):
    """The training losses a train_code.py run logged in OUT/metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_merges_as_peft_merges(ours, theirs, ids, adapter_key):
    """Ours equals peft's model before merging; merged, its logits stay and every base weight and bias equals
    peft's merge_and_unload (tensors whose names hold `adapter_key` are the adapter's own). Returns the logits."""
    from torch.testing import assert_close

    from minipeft import merge

    with torch.no_grad():
        unmerged = ours(ids)
        assert_close(unmerged, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
        merge(ours)
        assert_close(ours(ids), unmerged, rtol=0, atol=1e-5)
        merged_theirs = theirs.merge_and_unload().state_dict()
        for name, tensor in ours.state_dict().items():
            if adapter_key not in name:
                assert_close(tensor, merged_theirs[name.replace(".base_layer", "")], rtol=0, atol=1e-6, msg=name)
    return unmerged


def trained_looking(model, add, seed=0):
    """`add` a method to the model, then move every one of its tensors a little, as training would: an adapter
    whose outputs differ from the base's."""
    from minipeft.methods.freezing import adapter_parameters

    torch.manual_seed(seed)
    add(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model
