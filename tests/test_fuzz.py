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


@pytest.fixture(scope="module")
def tiny_adapters(default_weights, tmp_path_factory):
    """A tiny base with the default tokenizer, and a LoRA and a prompt-tuning adapter saved for it."""
    from tests.helpers import tiny_with_adapters

    return tiny_with_adapters(tmp_path_factory.mktemp("adapter_fuzz"), default_weights, ("lora", "prompt"))


def bad_adapter_files(saved):
    """{(file, how): its bad content} for one adapter directory."""
    import pickle

    from safetensors.torch import load_file
    from safetensors.torch import save as save_bytes

    config = (saved / "adapter_config.json").read_bytes()
    weights = (saved / "adapter_model.safetensors").read_bytes()
    tensors = load_file(saved / "adapter_model.safetensors")
    typed = json.loads(config)
    typed.update({key: "8" if isinstance(value, int) and not isinstance(value, bool) else 8
                  for key, value in typed.items() if key not in ("peft_type", "task_type")})
    planted = pickle.dumps({"a": 1}) + bytes(range(256))
    return {("adapter_config.json", "empty"): b"", ("adapter_config.json", "truncated"): config[:len(config) // 2],
            ("adapter_config.json", "binary"): planted,
            ("adapter_config.json", "wrong-typed"): json.dumps(typed).encode(),
            ("adapter_config.json", "a list"): b"[1, 2]",
            ("adapter_model.safetensors", "empty"): b"", ("adapter_model.safetensors", "binary"): planted,
            ("adapter_model.safetensors", "truncated"): weights[:len(weights) // 2],
            ("adapter_model.safetensors", "wrong-typed"): save_bytes({k: v.long() for k, v in tensors.items()}),
            ("adapter_model.safetensors", "wrong shapes"): save_bytes({k: v[..., :1].contiguous()
                                                                       for k, v in tensors.items()})}


def test_every_file_of_an_adapter_replaced_by_bad_content_gives_one_line(tiny_adapters, tmp_path, capsys):
    """adapter_config.json and adapter_model.safetensors of a LoRA and a prompt-tuning adapter, each in turn empty,
    truncated, binary, of the wrong types or shapes: load_adapter raises one BadInput line naming the file, and
    generate, merge and serve --adapter end with that line and exit code 2."""
    import shutil

    import minipeft
    from minipeft.cli import build_parser, main
    from minipeft.serve import start

    weights, saved = tiny_adapters
    model, _ = minipeft.load(weights, quantize="nf4")
    for method in ("lora", "prompt"):
        for (name, how), content in bad_adapter_files(saved / method).items():
            adapter = tmp_path / f"{method}-{name}-{how}"
            shutil.copytree(saved / method, adapter)
            (adapter / name).write_bytes(content)
            with pytest.raises(BadInput) as error:
                minipeft.load_adapter(model, adapter, name=f"{method}-{how}-{name}")
            assert name in str(error.value) and "\n" not in str(error.value), (method, name, how)
            for argv in (["generate", "--weights", str(weights), "--adapter", f"a={adapter}", "--prompt", "a:Hi",
                          "--max-new-tokens", "1"],
                         ["merge", "--weights", str(weights), "--adapter", str(adapter), "--out", str(tmp_path / "m")],
                         ["serve", "--weights", str(weights), "--adapter", f"a={adapter}", "--port", "0"]):
                with pytest.raises(SystemExit) as exit_code:
                    if argv[0] == "serve":  # start() alone: a good adapter would then serve until Ctrl-C
                        from minipeft.errors import run_cli
                        run_cli(lambda: start(build_parser().parse_args(argv)) and pytest.fail("it served"))
                    else:
                        main(argv)
                lines = capsys.readouterr().err.strip().splitlines()
                errors = [line for line in lines if line.startswith("error:")]
                assert exit_code.value.code == 2 and len(errors) == 1 and name in errors[0], (argv[0], name, how,
                                                                                             lines)
                assert not any("Traceback" in line for line in lines)
