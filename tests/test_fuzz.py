"""Fuzzing the readers of files a user hands us: safetensors checkpoints and tokenizer files. Any exception
other than the one-line BadInput is a failure."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minipeft import BadInput, load_model, load_tokenizer
from tests.helpers import write_hf_checkpoint
from tests.test_tokenizer import write_llama3_style

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                        max_size=4), max_leaves=12)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def loads_or_refuses(call, *args):
    try:
        return call(*args)
    except BadInput as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz_weights")
    write_hf_checkpoint(directory, num_hidden_layers=1)
    return directory, (directory / "model.safetensors").read_bytes()


def header_of(data: bytes) -> dict:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length])


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 5000)), flips=st.lists(
    st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=6), cut=st.none() | st.integers(0, 10**9))
def test_fuzz_safetensors_bytes(checkpoint, length, flips, cut):
    """The header length, random bytes anywhere (header and data), and truncation."""
    directory, good = checkpoint
    data = bytearray(struct.pack("<Q", length) + good[8:]) if length % 3 == 0 else bytearray(good)
    for position, value in flips:
        data[position % len(data)] = value
    (directory / "model.safetensors").write_bytes(bytes(data[:cut % (len(data) + 1)] if cut is not None else data))
    loads_or_refuses(load_model, directory)


@FUZZ
@given(entry=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=JSON | st.sampled_from(
    ["F16", "I64", "BOOL", "F8_E4M3", "U8", [0, 10**12], [-1, 4], [64, 64, 2], [], [1 << 62, 1]]),
       metadata=st.none() | JSON)
def test_fuzz_safetensors_header(checkpoint, entry, value, metadata):
    """A JSON header with wrong dtypes, shapes, offsets or metadata, the data left as it was."""
    directory, good = checkpoint
    header = header_of(good)
    name = sorted(k for k in header if k != "__metadata__")[len(str(value)) % (len(header) - 1)]
    if entry is None:
        header[name] = value
    else:
        header[name][entry] = value
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    old_length = struct.unpack("<Q", good[:8])[0]
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + good[8 + old_length:])
    loads_or_refuses(load_model, directory)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    directory = write_llama3_style(tmp_path_factory.mktemp("fuzz_tokenizer"))
    return directory, json.loads((directory / "tokenizer.json").read_text())


PARTS = ["normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens", "model"]
MODEL_KEYS = ["type", "vocab", "merges", "ignore_merges", "byte_fallback", "dropout", "continuing_subword_prefix"]


@FUZZ
@given(part=st.sampled_from(PARTS), model_key=st.sampled_from(MODEL_KEYS), value=JSON | st.sampled_from(
    [{"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated"}, {"type": "Metaspace"},
     {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "nope"}}], "special_tokens": {}},
     [{"id": 5, "content": "<x>"}], {"Ġa": 0}, [["Ġ", "a"]], ["a b c"]]), raw=st.none() | st.binary(max_size=40),
       config=st.none() | JSON)
def test_fuzz_tokenizer_files(tokenizer_files, part, model_key, value, raw, config):
    directory, good = tokenizer_files
    spec = json.loads(json.dumps(good))
    if part == "model":
        spec["model"][model_key] = value
    else:
        spec[part] = value
    (directory / "tokenizer.json").write_bytes(raw if raw is not None else json.dumps(spec).encode())
    (directory / "tokenizer_config.json").write_text(json.dumps(config) if config is not None else "{}")
    tokenizer = loads_or_refuses(load_tokenizer, directory)
    if tokenizer is not None:
        ids = loads_or_refuses(tokenizer.encode, "Hello, world 2024!\n  <|eot_id|> ok")
        if ids is not None:
            loads_or_refuses(tokenizer.decode, ids)
