"""Load a Hugging Face-layout Llama checkpoint, tensor by tensor, into full precision or 4-bit.

    config.json ──► LlamaConfig ──► Llama on the meta device (shapes only, no memory)
    *.safetensors ──► one tensor at a time ──► check name and shape ──► quantize or cast ──► into the model

Peak memory stays near the final model plus one tensor: a 4-bit model never exists in full precision.
"""

import ctypes
import json
import math
import struct
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from ..errors import BadInput
from ..files import write_atomically
from ..progress import Progress
from .config import LlamaConfig
from .model import Llama
from .quant import QUANTIZED_LINEARS, WidenedEmbedding, WidenedLinear, misdecoded_by_bitsandbytes, quantize_linear
from .tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed, not learned; older checkpoints store it
WIDENED = ("model.embed_tokens.weight", "lm_head.weight")  # kept 16-bit beside a 4-bit base (quant.py)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "weights" / "smollm2-135m-instruct"  # the embedded default model
PREPARE_COMMAND = "python -m minipeft.tools.default_model"  # builds it there (make weights)


def set_malloc_mmap_threshold(size: int):
    """Allocations above `size` get their own mmap from glibc, handed back to the OS when freed.

    While loading, a small threshold (1 MiB) keeps the large temporaries of quantization, freed between
    small long-lived 4-bit tensors, from being stranded in the heap: measured here, 0.5 GB of a 0.15 GB
    load on some runs. Afterwards a larger one (8 MiB) lets training and generation reuse heap memory
    instead of page-faulting a fresh mmap for every temporary: 3x slower dequantization otherwise."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to set


def build_model(config: LlamaConfig, device="meta") -> Llama:
    """The model with uninitialised weights: on "meta" it costs no memory, for shape and count checks."""
    with torch.device(device):
        return Llama(config)


def safetensors_files(weights_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: one model.safetensors, or the shards an index lists."""
    index = weights_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadInput(f"{index}: expected JSON with a 'weight_map' of tensor name -> shard file ({e!r})")
        for shard in shards:
            if not (weights_dir / shard).is_file():
                raise BadInput(f"{index}: names shard {shard!r}, which is not in {weights_dir}")
        return [weights_dir / shard for shard in shards]
    if (weights_dir / "model.safetensors").is_file():
        return [weights_dir / "model.safetensors"]
    raise BadInput(f"{weights_dir}: no model.safetensors or model.safetensors.index.json found")


def tensor_bytes(files) -> int:
    """The bytes of tensor data in safetensors files: each file less its 8-byte length and JSON header."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            header = f.read(8)
        total += path.stat().st_size - 8 - (struct.unpack("<Q", header)[0] if len(header) == 8 else 0)
    return total


def iterate_tensors(files):
    """Yield (name, tensor) one at a time; only the tensor in hand is in memory.

    safetensors checks each file's header (names, dtypes, shapes, offsets within the file). Each tensor's
    bytes are then read into fresh memory of its own: through safetensors' memory map, the file's pages
    of a tensor would count in resident memory beside its copy (0.26 GB more for a 7B lm_head)."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
            with open(path, "rb") as f:
                header_length = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_length))
                for name in names:
                    yield name, read_tensor(f, path, name, header[name], 8 + header_length)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{path}: not a readable safetensors file ({e})") from None


def read_tensor(f, path, name, entry, data_start) -> torch.Tensor:
    """One tensor of an open safetensors file, read (not mapped) into a new tensor."""
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise BadInput(f"{path}: tensor {name} has dtype {entry['dtype']}; expected one of "
                       f"{', '.join(SAFETENSORS_DTYPES)}")
    begin, end = entry["data_offsets"]
    shape = entry["shape"]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise BadInput(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} of {entry['dtype']}")
    data = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(memoryview(data.numpy())) != end - begin:
        raise BadInput(f"{path}: tensor {name} is cut short (the file ends before its last byte)")
    return data.view(dtype).reshape(shape)


def read_named_tensor(weights_dir, name: str) -> torch.Tensor:
    """One tensor of a checkpoint, read alone from the file that holds it (the vocabulary, for instance)."""
    for path in safetensors_files(Path(weights_dir)):
        try:
            with open(path, "rb") as f:
                header_length = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_length))
                if name in header:
                    return read_tensor(f, path, name, header[name], 8 + header_length)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise BadInput(f"{path}: not a readable safetensors file ({e})") from None
    raise BadInput(f"{weights_dir}: no tensor named {name} in its safetensors files")


def set_tensor(model: nn.Module, name: str, value: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def load_model(weights_dir, quantize=None, dtype=torch.float32, device="cpu", double_quant=False,
               progress=False) -> Llama:
    """Build the Llama described by `weights_dir`/config.json and stream its weights in.

    Args:
        quantize: None for full precision, "nf4" or "fp4" for 4-bit linears (the norms stay in `dtype`; the
            embedding and lm_head too, unless the checkpoint has them in 16 bits and `dtype` is fp32: then
            they stay 16-bit and are widened exactly as they are used).
        dtype: parameter dtype, and the compute dtype of 4-bit linears.
        progress: print the bytes read and the time left (minipeft/progress.py): True for stdout, or a stream.
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise BadInput(f"{weights_dir}: weights directory not found")
    if dtype not in DTYPES.values():
        raise BadInput(f"dtype: unsupported {dtype}; expected one of {', '.join(DTYPES)}")
    if quantize not in (None, "nf4", "fp4"):
        raise BadInput(f"quantize: expected None, 'nf4' or 'fp4', got {quantize!r}")
    config = LlamaConfig.from_json(weights_dir / "config.json")
    files = safetensors_files(weights_dir)
    set_malloc_mmap_threshold(1 << 20)
    model = build_model(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    seen, extra = set(), []
    misdecoded = {}  # {in_features: linear names} that bitsandbytes' AVX512 CPU kernel would decode wrongly
    shown = Progress("loading weights" + (f" into {quantize.upper()}" if quantize else ""), tensor_bytes(files),
                     stream=None if progress is True else progress) if progress else None

    for name, tensor in iterate_tensors(files):
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name not in expected:
            extra.append(name)
            continue
        if tensor.shape != expected[name]:
            raise BadInput(f"{weights_dir}: tensor {name} has shape {tuple(tensor.shape)}, "
                           f"config.json implies {tuple(expected[name])}")
        module_name = name.rsplit(".", 2)[-2]
        if quantize and module_name in QUANTIZED_LINEARS and name.endswith(".weight"):
            parent, child = name.removesuffix(".weight").rsplit(".", 1)
            bias = model.get_submodule(parent).get_submodule(child).bias  # loaded already, still to come, or None
            layer = quantize_linear(tensor, quantize, dtype, double_quant, device, bias)
            if misdecoded_by_bitsandbytes(layer.in_features):
                misdecoded.setdefault(layer.in_features, set()).add(child)
            setattr(model.get_submodule(parent), child, layer)
        elif (quantize and name in WIDENED and dtype == torch.float32
              and tensor.dtype in (torch.bfloat16, torch.float16)):
            weight = nn.Parameter(tensor.to(device=device), requires_grad=False)  # stays 16-bit
            if name == "lm_head.weight":
                model.lm_head = WidenedLinear(weight)
            else:
                model.model.embed_tokens, model.model.compute_dtype = WidenedEmbedding(weight, dtype), dtype
        else:  # full-precision tensors, and the biases of 4-bit linears
            set_tensor(model, name, tensor.to(device=device, dtype=dtype))
        seen.add(name)
        if shown:
            shown.advance(tensor.numel() * tensor.element_size())
        del tensor

    set_malloc_mmap_threshold(8 << 20)
    if shown:
        shown.close()
    if misdecoded and torch.device(device).type == "cpu":
        widths = ", ".join(f"{width} ({', '.join(sorted(names))})" for width, names in sorted(misdecoded.items()))
        warnings.warn(f"{weights_dir}: 4-bit rows of {widths} numbers are not whole blocks of 64: bitsandbytes' "
                      f"AVX512 CPU kernel decodes them with the wrong scales, so minipeft decodes them itself")
    missing = sorted(set(expected) - seen)
    if missing or extra:
        raise BadInput(f"{weights_dir}: tensors do not match config.json: "
                       f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                       f"extra {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if config.tie_word_embeddings:
        if isinstance(model.model.embed_tokens, WidenedEmbedding):
            model.lm_head = WidenedLinear(model.model.embed_tokens.weight)
        model.lm_head.weight = model.model.embed_tokens.weight
    model.loaded_as = {"quantize": quantize, "double_quant": bool(quantize and double_quant),
                       "dtype": str(dtype).removeprefix("torch.")}  # saved with its adapters (formats/)
    return model.eval()


def load(weights_dir, quantize=None, dtype=torch.float32, device="cpu", double_quant=False, progress=False):
    """`model, tokenizer = minipeft.load(weights_dir)`: the one call a user needs."""
    device = check_device(device)
    model = load_model(weights_dir, quantize, dtype, device, double_quant, progress)
    tokenizer = load_tokenizer(weights_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise BadInput(f"{weights_dir}: tokenizer has {tokenizer.vocab_size} tokens but config.json "
                       f"vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise BadInput(f"device: {device!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device: {device} requested but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"device: {device} is not supported; expected cpu or cuda")
    return device


def write_checkpoint(out, tensors: dict, config: dict, weights_dir, dtype: torch.dtype):
    """A Hugging Face-layout checkpoint in the new directory `out`, as this loader reads one: `tensors` (Hugging
    Face names) in `dtype` as model.safetensors, `config` as config.json with its dtype set, and the tokenizer
    files of `weights_dir`; each file written atomically. (minipeft merge, and train_code.py --full.)"""
    import shutil

    out, weights_dir = Path(out), Path(weights_dir)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "model.safetensors", save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    config = {**config, "torch_dtype" if "torch_dtype" in config else "dtype": name}
    write_atomically(out / "config.json", json.dumps(config, indent=2).encode())
    for file in TOKENIZER_FILES:
        if (weights_dir / file).is_file():
            shutil.copy(weights_dir / file, out / file)


def save_model(model, out, weights_dir):
    """Every tensor of a fully trained `model` (no methods on it), in float32, as a checkpoint with the config
    and tokenizer of the base it was loaded from (train_code.py --full)."""
    config = json.loads((Path(weights_dir) / "config.json").read_text())
    write_checkpoint(out, dict(model.named_parameters()), config, weights_dir, torch.float32)
