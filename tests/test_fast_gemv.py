"""The 4-bit kernel of generation (llama/fast_gemv.py, kernels/gemv_4bit.c) against the formula.

Each of its three paths (AVX512, AVX2, plain C) is built and checked on this CPU where the CPU runs it:
multiplied by rows of the identity it must give back every weight bit for bit, as the formula decodes it
(rounded to bf16 under bf16 compute); by random rows, x @ W.T up to the order of the sums.
"""

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft.llama import fast_gemv, quant
from tests.helpers import write_hf_checkpoint
from tests.test_4bit_decoding import reference_weight

CPU_FLAGS = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                 "").split()
PATHS = {"avx512": [], "avx2": ["-mno-avx512f"], "plain C": ["-mno-avx512f", "-mno-avx2"]}
RUNS_HERE = {"avx512": "avx512f" in CPU_FLAGS, "avx2": "avx2" in CPU_FLAGS and "fma" in CPU_FLAGS, "plain C": True}


def built(path):
    if not RUNS_HERE[path]:
        pytest.skip(f"this CPU cannot run the {path} path")  # the other machine kind of CI runs it
    return fast_gemv.load(fast_gemv.build(PATHS[path]))


def four_bit(out_features, in_features, quant_type="nf4", double_quant=False, dtype=torch.float32, seed=0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quant.quantize_linear(weight, quant_type, dtype, double_quant)


def reader(lib, layer):
    return fast_gemv.Reader(lib, layer.weight.data.view(torch.uint8).view(-1), quant.scales(layer.weight.quant_state),
                            layer.weight.quant_state.code, layer.weight.quant_state.shape, layer.compute_dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_identity_rows_give_back_every_weight_exactly(path, dtype, quant_type, double_quant):
    layer = four_bit(40, 192, quant_type, double_quant, dtype)
    read = reader(built(path), layer)
    expected = reference_weight(layer).to(dtype)  # (out, in): the formula, in the compute dtype
    columns = []
    for start in range(0, 192, 16):  # up to 16 rows a call: four at a time, then one
        rows = torch.eye(192)[start:start + 16].to(dtype)
        columns.append(read(rows))  # (16, out): row k is column k of W
    assert torch.equal(torch.cat(columns).T, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
def test_random_rows_give_x_times_w(path, rows):
    layer = four_bit(96, 576)
    read = reader(built(path), layer)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(1))
    assert_close(read(x), x @ reference_weight(layer).T, rtol=0, atol=2e-5)  # another order of the fp32 sums
    bf16 = four_bit(96, 576, dtype=torch.bfloat16)
    out = reader(built(path), bf16)(x.bfloat16())  # bf16 in, bf16 out, sums in fp32
    expected = (x.bfloat16().float() @ reference_weight(bf16).bfloat16().float().T).bfloat16()
    assert out.dtype == torch.bfloat16
    one_rounding = 2 ** -7 * expected.float().abs().max().item()  # bf16 keeps 8 significant bits
    assert_close(out.float(), expected.float(), rtol=0, atol=one_rounding)


def test_it_takes_at_most_max_rows_and_whole_blocks():
    layer = four_bit(8, 128)
    read = reader(fast_gemv.library(), layer)
    assert read(torch.randn(fast_gemv.MAX_ROWS + 1, 128)) is None  # a prefill: decoded for all rows at once
    assert read(torch.randn(2, 3, 128)).shape == (2, 3, 8)
    assert fast_gemv.reader(four_bit(8, 96), torch.ones(12)) is None  # rows of 96: not whole blocks of 64
    assert fast_gemv.reader(four_bit(8, 128, dtype=torch.float16), torch.ones(16)) is None  # no fp16 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_reads_the_codes_and_matches_decoded_weights(tmp_path, monkeypatch, dtype):
    """In decoded_weights, every 4-bit linear of rows of whole blocks reads its codes; logits equal those of the
    weights decoded once, to the order of the sums; greedy tokens are the same; gradients never use it; the
    base stays bit-identical."""
    write_hf_checkpoint(tmp_path, hidden_size=128, intermediate_size=192)
    model = minipeft.load_model(tmp_path, quantize="nf4", dtype=dtype)
    layers = [m for m in model.modules() if isinstance(m, quant.Linear4bit)]
    ids = torch.randint(3, 256, (2, 5))
    fingerprint = minipeft.base_fingerprint(model)
    with torch.enable_grad():
        plain = model(ids)[:, -1:]
    with quant.decoded_weights(model, 1024, read_codes=False), torch.no_grad():
        decoded = model(ids[:, -1:])
    calls = []
    kernel = fast_gemv.Reader.__call__
    monkeypatch.setattr(fast_gemv.Reader, "__call__", lambda self, x: calls.append(self) or kernel(self, x))
    with quant.decoded_weights(model, 1024) as held:
        assert all(isinstance(m.kept, fast_gemv.Reader) for m in layers) and held == 0  # no copy of any weight
        with torch.no_grad():
            read = model(ids[:, -1:])
        assert calls == [m.kept for m in layers]  # each linear, once, through the kernel
        assert_close(read, decoded, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.05)
        with torch.enable_grad():
            assert torch.equal(model(ids)[:, -1:], plain)  # the training path decodes as it goes
    prompts = [ids[0].tolist(), ids[1, :3].tolist()]
    assert minipeft.generate(model, prompts, 8, eos_id=-1) == minipeft.generate(model, prompts, 8, eos_id=-1,
                                                                                read_codes=False)
    assert all(m.kept is None for m in layers)
    assert minipeft.base_fingerprint(model) == fingerprint


def test_without_a_compiler_generation_keeps_weights_decoded_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fast_gemv, "_library", None)
    layer = four_bit(8, 128)
    with quant.decoded_weights(layer, 1024):
        assert isinstance(layer.kept, quant.Decoded)
    with quant.decoded_weights(layer, 1024):  # said once
        assert isinstance(layer.kept, quant.Decoded)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "gemv_4bit.c could not be built" in lines[0] and "no-such-compiler" in lines[0]


def test_the_kernel_checks_every_size_before_a_pointer_is_passed():
    """x of width 96 against K = 64 once wrote past the output; codes or scales of the wrong size, rows that are
    not whole blocks, a tensor on another device: each refused in Python, the C code never called."""
    layer = four_bit(8, 128)
    state = layer.weight.quant_state
    codes, absmax = layer.weight.data.view(torch.uint8).view(-1), quant.scales(state)
    calls = []
    fake = type("Lib", (), {"gemv_4bit": lambda self, *a: calls.append(a) or 0})()
    read = fast_gemv.Reader(fake, codes, absmax, state.code, state.shape, torch.float32)
    for x in (torch.randn(1, 96), torch.randn(1, 192), torch.randn(128)[:0], "x"):
        with pytest.raises(ValueError, match="expected"):
            read(x)
    for wrong in (dict(packed=codes[:-1]), dict(absmax=absmax[:-1]), dict(codebook=state.code[:8]),
                  dict(packed=codes.view(torch.int8)), dict(shape=(8, 96)), dict(shape=(8, 130)),
                  dict(dtype=torch.float16)):
        settings = dict(lib=fake, packed=codes, absmax=absmax, codebook=state.code, shape=state.shape,
                        dtype=torch.float32) | wrong
        with pytest.raises(ValueError, match="fast_gemv"):
            fast_gemv.Reader(**settings)
    assert calls == []
    assert read(torch.randn(1, 128)) is not None and len(calls) == 1
    lib = fast_gemv.library()  # and the C code checks again what it relies on
    out = torch.empty(1, 8)
    assert lib.gemv_4bit(1, 8, 96, torch.randn(96).data_ptr(), codes.data_ptr(), absmax.data_ptr(),
                         state.code.data_ptr(), out.data_ptr(), 8, 0) == -1


def test_a_build_is_reused_only_for_the_same_cpu_compiler_and_source(tmp_path, monkeypatch):
    """The cache key holds the CPU's model and flags (a build for another CPU is never reused), the compiler's
    version, and works where /proc/cpuinfo has no flags line (Arm: Features)."""
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(fast_gemv, "CPUINFO", info)
    compiler = tmp_path / "cc"
    key = lambda: fast_gemv.cache_key([str(compiler), *fast_gemv.FLAGS])
    compiler.write_text("#!/bin/sh\necho 'cc 12.2.0'\n")
    compiler.chmod(0o755)
    keys = {}
    for name, text in [("x86", "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n"),
                       ("x86 other flags", "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f\n"),
                       ("x86 other model", "model name\t: Intel Xeon\nflags\t\t: fpu avx2 fma\n"),
                       ("arm", "Features\t: fp asimd\nCPU part\t: 0xd0c\n"),
                       ("arm other", "Features\t: fp asimd sve\nCPU part\t: 0xd0c\n")]:
        info.write_text(text)
        keys[name] = key()
    assert len(set(keys.values())) == len(keys), keys
    info.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n")
    assert key() == keys["x86"]  # the same machine: the same build
    compiler.write_text("#!/bin/sh\necho 'cc 13.1.0'\n")
    assert key() != keys["x86"]


def test_the_cache_directory_is_private_and_never_a_symlink(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    made = fast_gemv.cache_dir()
    assert made.stat().st_mode & 0o777 == 0o700
    made.chmod(0o777)
    with pytest.raises(OSError, match="others may write"):
        fast_gemv.cache_dir()
    made.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    made.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="symlink"):
        fast_gemv.cache_dir()


ASAN_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
from minipeft.llama import fast_gemv
from tests.test_fast_gemv import four_bit, reader
from tests.test_4bit_decoding import reference_weight
lib = fast_gemv.load({library!r})
for dtype in (torch.float32, torch.bfloat16):
    for rows in (1, 4, 5, 16):
        layer = four_bit(40, 192, dtype=dtype)
        x = torch.randn(rows, 192).to(dtype)
        out = reader(lib, layer)(x).float()
        expected = x.float() @ reference_weight(layer).to(dtype).float().T
        assert torch.allclose(out, expected, atol=0.05 if dtype == torch.bfloat16 else 1e-4), (dtype, rows)
print("clean")
"""


def test_the_kernel_runs_clean_under_address_sanitizer(tmp_path, monkeypatch):
    """Built once with -fsanitize=address (where the compiler has it) and run on every row count it takes:
    any read or write outside the tensors it was given ends the run with the sanitizer's report."""
    import shutil
    import subprocess
    import sys

    library_of = lambda name: subprocess.run(["cc", f"-print-file-name={name}"], capture_output=True,
                                             text=True).stdout.strip()
    runtime = library_of("libasan.so")
    if not shutil.which("cc") or not Path(runtime).is_file():
        pytest.skip("this compiler has no AddressSanitizer")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library = fast_gemv.build(["-fsanitize=address", "-fno-omit-frame-pointer", "-mno-avx512f"])
    root = str(Path(__file__).resolve().parent.parent)
    env = {"LD_PRELOAD": f"{runtime} {library_of('libstdc++.so.6')}",  # torch throws C++ exceptions as it loads
           "ASAN_OPTIONS": "detect_leaks=0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", ASAN_CHECK.format(root=root, library=str(library))], env=env,
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr[-3000:]
