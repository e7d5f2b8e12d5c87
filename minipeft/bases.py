"""Which base to load under a set of adapters, for `minipeft generate`, `merge` and `serve` alike.

An adapter's file says how its base was loaded while it trained (4-bit or not, the compute dtype:
formats.trained_base); the base is loaded the same way, so an adapter answers as it did in training. A
base written by `minipeft merge` says which adapters it already holds (config.json's "minipeft_merged"):
one of them is refused, as applying it again would add its change a second time.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from . import formats
from .errors import BadInput
from .llama.config import LlamaConfig
from .llama.loader import build_model, load

MERGED_KEY = "minipeft_merged"  # config.json: [{"peft_type", "sha256" of adapter_model.safetensors}, ...]


def parse_adapters(specs) -> dict:
    """--adapter NAME=PATH (or just PATH, for "default") -> {name: path}."""
    adapters = {}
    for spec in specs or []:
        name, _, path = spec.rpartition("=") if "=" in spec else ("default", "", spec)
        if not name or name == "-" or name in adapters:
            raise BadInput(f"--adapter {spec!r}: expected NAME=PATH with a new name (not '-')")
        adapters[name] = Path(path)
    return adapters


def describe_base(base: dict) -> str:
    if not base["quantize"]:
        return f"the full-precision base ({base['dtype']})"
    double = " with double quantization" if base["double_quant"] else ""
    return f"the {base['quantize'].upper()} base{double} ({base['dtype']} compute)"


def base_for(adapters: dict, four_bit) -> dict:
    """How to load the base: as the adapters were trained on it (their files say how), unless --4bit or
    --no-4bit says otherwise, which is said in one line. Adapters trained on differently quantized bases need
    that choice; adapters that differ only in compute dtype are served in float32, said in one line."""
    recorded = {name: formats.trained_base(path) for name, path in adapters.items()}
    known = {name: base for name, base in recorded.items() if base}
    quantized = {(base["quantize"], base["double_quant"]) for base in known.values()}
    if len(quantized) > 1 and four_bit is None:
        trained = "; ".join(f"{name} on {describe_base(base)}" for name, base in known.items())
        raise BadInput(f"--adapter: the adapters were trained on different bases ({trained}); choose one "
                       f"with --4bit or --no-4bit, or serve them separately")
    # Without adapters: NF4, in generate as in serve (whose tune panel trains on it), so both answer alike;
    # adapters whose files do not say (peft's own): full precision.
    base = next(iter(known.values()), {"quantize": None if adapters else "nf4", "double_quant": False,
                                       "dtype": "float32"})
    if len({base["dtype"] for base in known.values()}) > 1:
        lower = {name: b["dtype"] for name, b in known.items() if b["dtype"] != "float32"}
        base = {**base, "dtype": "float32"}
        print(f"note: {', '.join(f'{n} trained with {d} compute' for n, d in lower.items())}, the rest with float32: "
              f"serving all in float32, so {', '.join(lower)} may answer slightly otherwise than in training",
              file=sys.stderr)
    if four_bit is not None and bool(base["quantize"]) != four_bit:
        asked = {"quantize": "nf4" if four_bit else None, "double_quant": False, "dtype": base["dtype"]}
        if known:
            print(f"note: {'--4bit' if four_bit else '--no-4bit'} loads {describe_base(asked)}, but the adapter "
                  f"was trained on {describe_base(base)}: its outputs will differ from training", file=sys.stderr)
        base = asked
    return base


def load_base(weights, base: dict, device="cpu"):
    return load(weights, quantize=base["quantize"], dtype=getattr(torch, base["dtype"]), device=device,
                double_quant=base["double_quant"], progress=sys.stderr)  # stdout is the answers alone




def adapter_digest(directory) -> str:
    """sha256 of an adapter's tensor file: the same adapter, wherever it was copied to."""
    path = Path(directory) / formats.WEIGHTS_FILE
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror or e})") from None


def merged_into(weights) -> list[dict]:
    """The adapters a base written by `minipeft merge` already holds (none for any other base)."""
    path = Path(weights) / "config.json"
    try:
        merged = json.loads(path.read_text()).get(MERGED_KEY, [])
    except (OSError, ValueError, AttributeError):
        return []  # the loader reports an unreadable config.json, by name
    if not isinstance(merged, list) or not all(isinstance(m, dict) and isinstance(m.get("sha256"), str)
                                               for m in merged):
        raise BadInput(f"{path}: key {MERGED_KEY!r} should be a list of {{'peft_type', 'sha256'}}, got {merged!r}")
    return merged


def refuse_merged(weights, adapters: dict):
    """Refuse, before the base loads, an adapter that `minipeft merge` already folded into these weights."""
    folded = {m["sha256"] for m in merged_into(weights)}
    for name, path in adapters.items():
        if folded and adapter_digest(path) in folded:
            raise BadInput(f"adapter {name!r} ({path}) is already merged into the base {Path(weights).name} (its "
                           f"config.json's {MERGED_KEY!r}); applying it again would add its change twice: use the "
                           f"original base, or leave the adapter out")


def check_adapters(weights, adapters: dict) -> dict:
    """Each adapter put on the base built on the meta device (only config.json is read), so that an adapter
    that does not fit, or was merged into these weights already, is refused before a long load. Returns the
    model with them on it: {name: its wrappers} can be asked what they are."""
    refuse_merged(weights, adapters)
    model = build_model(LlamaConfig.from_json(Path(weights) / "config.json"))
    for name, path in adapters.items():
        formats.load_adapter(model, path, name=name)
    return model
