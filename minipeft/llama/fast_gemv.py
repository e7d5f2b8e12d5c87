"""A product with a 4-bit weight that reads the weight as stored, for decoding a few tokens at a time.

Generating one token multiplies a handful of rows by every weight of the model, so the time goes into
reading weights from memory. Decoded to fp32 a weight is 8x the bytes of its 4-bit codes; the small C
kernel in kernels/gemv_4bit.c multiplies straight from the codes and the block scales, each weight decoded
in a register as quant.dequantize_4bit decodes it, and never stored:

    y[m, n] = sum_k  w[n, k] * x[m, k],    w[n, k] = absmax[n, k // 64] * codebook[code[n, k]]

(w rounded to bf16 under bf16 compute; sums in fp32): x @ dequantize_4bit(W).T, summed in another order.
Measured on a 2-core Intel Xeon with AMX: a token of the default model 1.9-2.1x faster than from weights kept decoded,
with no decoded copy held (bench/RESULTS.md). The C compiler that torch.compile uses builds it once per
machine (-march=native), into ~/.cache/minipeft; where none is found, generation keeps weights decoded
instead (quant.decoded_weights) and says so once.
"""

import ctypes
import hashlib
import os
import platform
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "kernels" / "gemv_4bit.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_library = None  # the loaded kernel, False once building it has failed


def library():
    """The kernel, built on first use; None where it cannot be built (said once, on stderr)."""
    global _library
    if _library is None:
        try:
            _library = load(build())
        except (OSError, subprocess.CalledProcessError) as error:
            detail = (getattr(error, "stderr", b"") or b"").decode(errors="replace").strip() or str(error)
            print(f"minipeft: the 4-bit kernel {SOURCE.name} could not be built ({detail.splitlines()[0]}); "
                  "generation keeps weights decoded instead", file=sys.stderr)
            _library = False
    return _library or None


CPUINFO = Path("/proc/cpuinfo")
CPU_LINES = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")


def cpu_identity() -> str:
    """What -march=native builds for: the CPU's model and feature flags (Linux x86 and Arm), else what the
    platform and, on macOS, sysctl say."""
    found = {}
    if CPUINFO.exists():
        for line in CPUINFO.read_text(errors="replace").splitlines():
            name = line.split(":")[0].strip()
            if name in CPU_LINES:
                found.setdefault(name, line.strip())
    if not found and sys.platform == "darwin":
        found["sysctl"] = run_quietly(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
                                       "hw.optional.arm64"])
    return "\n".join([platform.machine(), platform.processor(), *found.values()])


def run_quietly(command) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cache_key(command) -> str:
    """The source, the command, the compiler's version and the CPU: a build is reused only where all match."""
    version = run_quietly([command[0], "--version"]).splitlines()[:1]
    parts = [SOURCE.read_bytes().decode(), " ".join(command), *version, cpu_identity()]
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """~/.cache/minipeft, made 0700; refused (OSError) if it is a symlink or another user's, or others may write
    in it: a library loaded from there runs as this user."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minipeft"
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(cache)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{cache} is a symlink or not a directory; the kernel is not loaded from there")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{cache} belongs to another user or others may write in it; the kernel is not loaded "
                      f"from there")
    return cache


def build(extra_flags=()) -> Path:
    """Compile the kernel into the cache, atomically, unless this source was built for this CPU before.
    `extra_flags` (tests): e.g. -mno-avx512f builds the AVX2 path on a CPU that has both."""
    command = [os.environ.get("CC", "cc"), *FLAGS, *extra_flags]
    cache = cache_dir()
    target = cache / f"gemv_4bit-{cache_key(command)}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([*command, str(SOURCE), "-o", str(built)], check=True, capture_output=True)
            os.replace(built, target)
    return target


def load(path):
    lib = ctypes.CDLL(str(path))
    lib.gemv_4bit.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
    lib.gemv_4bit.restype = ctypes.c_int
    return lib


BF16 = {torch.float32: 0, torch.bfloat16: 1}  # the compute dtypes it serves: x, weights and out all in bf16, or none
MAX_ROWS = 16  # more rows than this make a matmul that gains from decoding the weight for all of them at once


def reader(layer, absmax):
    """A Reader for a 4-bit layer on CPU with its fp32 block scales, or None where the kernel does not serve it."""
    state = layer.weight.quant_state
    rows_are_whole_blocks = state.blocksize == 64 and state.shape[1] % 64 == 0
    served_dtype = layer.compute_dtype in BF16  # fp32 or bf16: no fp16 rounding in the kernel
    if not (rows_are_whole_blocks and served_dtype) or library() is None:
        return None
    return Reader(library(), layer.weight.data.view(torch.uint8).view(-1), absmax, state.code, state.shape,
                  layer.compute_dtype)


class Reader:
    """x @ W.T for one 4-bit weight, from its codes, for up to MAX_ROWS rows of x; None for more rows.
    Every size the C code relies on is checked here, before a pointer is passed."""

    def __init__(self, lib, packed, absmax, codebook, shape, dtype):
        N, K = shape
        tensors = {"codes": (packed, torch.uint8, N * K // 2), "absmax": (absmax, None, N * K // 64),
                   "codebook": (codebook, None, 16)}
        if dtype not in BF16 or not (N > 0 and K > 0 and K % 64 == 0):
            raise ValueError(f"fast_gemv: a ({N}, {K}) weight in {dtype}; the kernel takes K % 64 == 0, fp32 or bf16")
        for name, (tensor, kind, size) in tensors.items():
            if tensor.device.type != "cpu" or tensor.numel() != size or kind and tensor.dtype != kind:
                raise ValueError(f"fast_gemv: {name} has {tensor.numel()} {tensor.dtype} on {tensor.device}; "
                                 f"expected {size}{' ' + str(kind) if kind else ''} on cpu")
        self.lib, self.shape, self.dtype = lib, (N, K), dtype
        self.packed = packed.contiguous()  # (N * K / 2,) uint8: the layer's own storage, not a copy
        self.absmax = absmax.float().contiguous()  # (N * K / 64,)
        self.codebook = codebook.float().contiguous()  # (16,)
        self.nbytes = self.absmax.nbytes if self.absmax.data_ptr() != absmax.data_ptr() else 0  # what it adds
        self.pointers = [self.packed.data_ptr(), self.absmax.data_ptr(), self.codebook.data_ptr()]

    def __call__(self, x):
        N, K = self.shape
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dim() < 1 or x.shape[-1] != K:
            raise ValueError(f"fast_gemv: x of shape {tuple(getattr(x, 'shape', ()))} on "
                             f"{getattr(x, 'device', None)}; expected (..., {K}) on cpu")
        M = x.numel() // K
        if M > MAX_ROWS:
            return None
        if M == 0:
            return torch.empty(*x.shape[:-1], N, dtype=self.dtype)
        x = x.to(self.dtype).contiguous()
        out = torch.empty(*x.shape[:-1], N, dtype=self.dtype)
        failed = self.lib.gemv_4bit(M, N, K, x.data_ptr(), *self.pointers, out.data_ptr(), N, BF16[self.dtype])
        if failed:
            raise MemoryError(f"fast_gemv: the kernel failed ({'bad sizes' if failed == -1 else 'out of memory'})")
        return out
