"""4-bit linears through bitsandbytes: the frozen base of QLoRA.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".

Each block of 64 consecutive weights is stored as 4-bit codes plus one absmax scale:

    w ≈ absmax(block) * codebook[code]        codebook: NF4 (normal-float, QLoRA's) or FP4

Double quantization also quantizes the absmax scales (0.5 -> 0.127 bits per weight). Matmuls run in
`compute_dtype` after dequantizing a weight on the fly, so a 7B base takes ~3.5 GB instead of 13.5. On
CPU a large weight is quantized and dequantized a block of rows at a time, so no full-precision copy
of a whole weight exists either.
The embeddings, the norms and lm_head are not quantized: they are small and sensitive. A 16-bit
checkpoint's embedding and lm_head stay 16-bit even under fp32 compute, and are widened a block at a
time as they are used (exact: every bf16 or fp16 number is an fp32 number): at 7B that is 0.5 GB less.

On CPU, minipeft decodes the 4-bit weights itself (`dequantize_4bit`): bitsandbytes' C++ kernel only where each
row is whole blocks of 64, the formula above in torch elsewhere. bitsandbytes 0.50's AVX512 kernel takes the
scale of row r, column c as absmax[r * (in // 64) + c // 64], which is right only when 64 divides `in`
(docs/bitsandbytes-avx512-dequantize.md).
"""

import contextlib
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

# bitsandbytes warns at import that the optional hub-downloaded `kernels` CPU gemm is missing; its
# built-in CPU path is used instead, which is what we want offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402

from ..errors import BadInput
from . import fast_gemv
from .loss import times_transposed

QUANT_TYPES = ("nf4", "fp4")
BLOCK = 64  # weights per absmax scale
NUMBERS_AT_A_TIME = 1 << 22  # on CPU, a 4-bit weight is quantized and dequantized about this many weights at a time
# The linears that go 4-bit, by their Hugging Face names.
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_linear(weight, quant_type="nf4", compute_dtype=torch.float32, double_quant=False, device="cpu",
                    bias=None):
    """A Linear4bit (bitsandbytes', below) holding `weight` (out, in), quantized on `device` from its
    values in `compute_dtype`; `bias` stays as given."""
    if quant_type not in QUANT_TYPES:
        raise BadInput(f"quantize: unknown quant type {quant_type!r}; expected one of {QUANT_TYPES}")
    out_features, in_features = weight.shape
    layer = Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                       compress_statistics=double_quant, quant_type=quant_type, device="meta")
    if torch.device(device).type == "cpu":
        packed, state = quantize_by_rows(weight, quant_type, compute_dtype, double_quant)
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCK,
                                         compress_statistics=double_quant, quant_type=quant_type, module=layer,
                                         bnb_quantized=True)
    else:
        layer.weight = bnb.nn.Params4bit(weight.detach().to(compute_dtype), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant, module=layer).to(device)  # .to() quantizes
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight on the first eval forward into a layout
    # that computes in bf16 whatever compute_dtype says, and rewrites the stored weight. Keep the
    # requested precision and a base that never changes.
    layer.support_avx512bf16_for_cpu = False
    layer.bias = bias  # full precision (attention_bias / mlp_bias checkpoints); None for Llama
    return layer


def quantize_by_rows(weight, quant_type, compute_dtype, double_quant):
    """bitsandbytes' quantize_4bit of `weight` in `compute_dtype`, about NUMBERS_AT_A_TIME weights at a time.

    Each block of 64 lies within one chunk of whole rows, so the codes and scales are the ones that the
    whole weight would get; but bitsandbytes' CPU temporaries (the weight in fp32, scaled, clamped,
    bucketed) stay a chunk's size: quantizing a 7B MLP weight whole holds 0.6 GB of them."""
    out_features, in_features = weight.shape
    rows = rows_at_a_time(in_features)
    parts = [bnb.functional.quantize_4bit(weight[start:start + rows].detach().to(compute_dtype), blocksize=BLOCK,
                                          quant_type=quant_type) for start in range(0, out_features, rows)]
    packed, absmax = torch.cat([p for p, _ in parts]), torch.cat([state.absmax for _, state in parts])
    common = dict(shape=weight.shape, dtype=compute_dtype, blocksize=BLOCK, code=parts[0][1].code,
                  quant_type=quant_type)
    if not double_quant:
        return packed, bnb.functional.QuantState(absmax=absmax, **common)
    offset = absmax.mean()  # as bitsandbytes does it: the scales, less their mean, quantized to 8 bits by 256
    quantized_absmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bnb.functional.QuantState(absmax=quantized_absmax, offset=offset, state2=state2, **common)


def rows_at_a_time(in_features):
    return max(NUMBERS_AT_A_TIME // in_features // BLOCK, 1) * BLOCK  # a multiple of 64 rows: whole blocks each


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit, except that on CPU the weight is decoded by `dequantize_4bit`, a block of
    about NUMBERS_AT_A_TIME numbers (whole rows) at a time, in the forward and again for the input gradient.

    bitsandbytes' CPU matmul dequantizes the whole weight to `compute_dtype` first (a 180 MB fp32 temporary
    for a 7B MLP weight, above everything else), through a kernel that is wrong for some widths on AVX512
    CPUs. CUDA takes bitsandbytes' own path unchanged.

    While generating, `kept` multiplies without decoding the weight again for every token (decoded_weights,
    below): the product that TimesRows makes, from the weight decoded once, or straight from its 4-bit codes."""
    kept = None  # x -> x @ W.T, or None for more rows than it takes; set by decoded_weights while generating

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        out = self.kept(x.to(self.compute_dtype)) if self.kept is not None and not torch.is_grad_enabled() else None
        if out is None:
            out = TimesRows.apply(x.to(self.compute_dtype), self)  # x @ W.T
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)


class TimesRows(torch.autograd.Function):
    """x @ W.T for a frozen 4-bit W, dequantized a block of rows at a time (W gets no gradient)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        parts = []
        for _, _, rows in dequantized_rows(layer):
            parts.append(x @ rows.T)
            del rows  # before the next block is dequantized: one block alive at a time, not two
        return torch.cat(parts, dim=-1)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = 0
        for start, stop, rows in dequantized_rows(ctx.layer):
            grad_x = grad_x + grad_out[..., start:stop] @ rows  # (..., in)
            del rows
        return grad_x, None


def dequantized_rows(layer, rows=None):
    """Yield (start, stop, W[start:stop]) for a 4-bit layer, about NUMBERS_AT_A_TIME numbers at a time, or
    `rows` rows. Both are multiples of 64 rows (or all of them), so a block of 64 never straddles two."""
    state = layer.weight.quant_state
    out_features, in_features = state.shape
    absmax = scales(state)
    packed = layer.weight.data.view(torch.uint8).view(-1)  # two 4-bit codes per byte, row-major
    rows = rows or rows_at_a_time(in_features)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        codes = packed[start * in_features // 2:(stop * in_features + 1) // 2]
        block_scales = absmax[start * in_features // BLOCK:-(-stop * in_features // BLOCK)]
        yield start, stop, dequantize_4bit(codes, block_scales, state.quant_type, (stop - start, in_features),
                                           state.dtype)


@contextlib.contextmanager
def decoded_weights(model, budget_mb: float, read_codes: bool = True):
    """Within the block, the 4-bit linears on CPU multiply a few rows at a time without decoding their weight
    again for each: from the 4-bit codes themselves, through fast_gemv's kernel (`read_codes`, where it is
    built, for rows of whole blocks in fp32 or bf16); otherwise from the weight decoded once in the compute
    dtype, those first in the model first, up to `budget_mb` megabytes (the others decode as they are used).
    Gradients never use it, and nothing of it outlives the block. Yields the megabytes it holds."""
    kept, budget = [], budget_mb * 2 ** 20
    try:
        for layer in model.modules():
            if not isinstance(layer, Linear4bit) or layer.weight.device.type != "cpu":
                continue
            layer.kept = fast_gemv.reader(layer, scales(layer.weight.quant_state)) if read_codes else None
            if layer.kept is None:  # decoded once instead, within the budget
                if layer.out_features * layer.in_features * layer.compute_dtype.itemsize > budget:
                    budget = 0  # this one and every later one decode as they are used
                    continue
                layer.kept = Decoded(dequantize(layer).to(layer.compute_dtype))
            kept.append(layer)
            budget -= layer.kept.nbytes
        yield sum(layer.kept.nbytes for layer in kept) / 2 ** 20
    finally:
        for layer in kept:
            layer.kept = None


class Decoded:
    """x @ W.T from a weight decoded once (what TimesRows computes, without decoding again)."""

    def __init__(self, weight):
        self.weight, self.nbytes = weight, weight.nbytes  # (out, in) in the compute dtype

    def __call__(self, x):
        return x @ self.weight.T


def scales(state) -> torch.Tensor:
    """The fp32 absmax of every block of 64 weights, in row-major order."""
    if state.nested:  # double quantization: the scales are 8-bit, by 256, around their mean
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def dequantize_4bit(packed, absmax, quant_type, shape, dtype) -> torch.Tensor:
    """w = absmax[block] * codebook[code] for the weights of `shape`, on CPU.

    bitsandbytes' C++ kernel where every row is whole blocks of 64 (there it is right on every CPU, and
    fast); the same formula in torch elsewhere, where its AVX512 path takes the wrong scales."""
    if shape[-1] % BLOCK == 0:
        return bitsandbytes_dequantize_4bit(packed, absmax, BLOCK, quant_type, shape, dtype)
    numbers = shape[0] * shape[1]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1)[:numbers]  # the high half-byte first
    values = bnb.functional.get_4bit_type(quant_type, packed.device)[codes.int()]  # (numbers,) in [-1, 1]
    blocks = -(-numbers // BLOCK)
    values = F.pad(values, (0, blocks * BLOCK - numbers)).view(blocks, BLOCK) * absmax[:blocks, None]
    return values.view(-1)[:numbers].view(shape).to(dtype)


bitsandbytes_dequantize_4bit = torch.ops.bitsandbytes.dequantize_4bit.default  # its C++ kernel, on CPU


def is_4bit(layer) -> bool:
    return isinstance(layer, bnb.nn.Linear4bit)


def dequantize(layer) -> torch.Tensor:
    """The (out, in) weight that a 4-bit layer really multiplies by."""
    state = layer.weight.quant_state
    if layer.weight.device.type != "cpu":
        return bnb.functional.dequantize_4bit(layer.weight.data, state)
    return torch.cat([rows for _, _, rows in dequantized_rows(layer, rows=state.shape[0])])


def misdecoded_by_bitsandbytes(in_features) -> bool:
    """Whether bitsandbytes' AVX512 CPU kernel decodes rows of `in_features` numbers with the wrong scales
    (measured: every multiple of 16 that 64 does not divide; other widths take its scalar path)."""
    return in_features % BLOCK != 0 and in_features % 16 == 0


def requantize_(layer, weight) -> float:
    """Store a new full-precision weight in a 4-bit layer; return the max abs rounding error it causes."""
    state = layer.weight.quant_state
    new = bnb.nn.Params4bit(weight.to(state.dtype), requires_grad=False, blocksize=state.blocksize,
                            compress_statistics=layer.weight.compress_statistics, quant_type=state.quant_type,
                            module=layer).to(weight.device)
    layer.weight = new
    return (dequantize(layer).float() - weight.float()).abs().max().item()


class WidenedEmbedding(nn.Embedding):
    """A frozen embedding stored in 16 bits whose rows come out in `compute_dtype`, exactly."""

    def __init__(self, weight, compute_dtype):
        super().__init__(*weight.shape, _weight=weight, _freeze=True)
        self.compute_dtype = compute_dtype

    def forward(self, input_ids):
        return F.embedding(input_ids, self.weight).to(self.compute_dtype)  # (B, T, D)


class WidenedLinear(nn.Linear):
    """A frozen bias-free linear stored in 16 bits, computing in its input's dtype, a block of rows at a time."""

    def __init__(self, weight):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = weight

    def forward(self, x):
        return times_transposed(x, self.weight)  # (..., out)
