"""4-bit decoding against the formula written out here: w = absmax[block] * codebook[code], one absmax per
64 consecutive weights of the row-major weight, two codes per byte (the high half first).

bitsandbytes 0.50's AVX512 CPU kernel takes the scale of row r, column c as absmax[r * (in // 64) + c // 64],
right only where 64 divides `in` (docs/bitsandbytes-avx512-dequantize.md). minipeft uses that kernel only
there; `avx512_kernel_as_measured` stands in for it so that an AVX2 CPU checks the choice too."""

import warnings

import pytest
import torch
from torch.testing import assert_close

from minipeft import load_model
from minipeft.llama import quant
from tests.helpers import write_hf_checkpoint

# QLoRA's NF4 (Dettmers et al. 2023, appendix E) and bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits,
# scaled to [-1, 1]), index = code
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
FP4 = [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
       -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25]
CODEBOOK = {"nf4": torch.tensor(NF4), "fp4": torch.tensor(FP4)}

# widths: multiples of 16 that 64 does not divide (the AVX512 kernel's wrong ones), odd and even others, whole blocks
SHAPES = [(197, 96), (64, 160), (5, 32), (3, 48), (130, 100), (4, 66), (7, 2), (9, 7), (200, 64), (3, 4096)]


def codes_of(layer):
    """The 4-bit code of every weight, row-major: two per byte, the high half-byte first."""
    packed = layer.weight.data.view(torch.uint8).view(-1)
    codes = torch.empty(2 * packed.numel(), dtype=torch.long)
    codes[0::2], codes[1::2] = packed // 16, packed % 16
    return codes[:layer.weight.quant_state.shape.numel()]


def absmax_of(layer):
    """One fp32 scale per block of 64; with double quantization, 8-bit codes of (scale - mean) by 256."""
    state = layer.weight.quant_state
    if not state.nested:
        return state.absmax
    index = torch.arange(state.absmax.numel())
    return state.state2.code[state.absmax.long()] * state.state2.absmax[index // 256] + state.offset


def reference_weight(layer):
    """The weight a 4-bit layer stands for, by the formula alone."""
    out_features, in_features = layer.weight.quant_state.shape
    codebook = CODEBOOK[layer.weight.quant_state.quant_type]
    block = torch.arange(out_features * in_features) // 64  # of the flat, row-major weight
    return (codebook[codes_of(layer)] * absmax_of(layer)[block]).view(out_features, in_features)


def avx512_kernel_as_measured(packed, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes 0.50.2's dequantize_4bit on an AVX512 CPU: rows of a multiple of 16 numbers go through
    its vector path, which indexes the scales as if every row began a new block (equal to the real kernel
    bit for bit on an AVX512 CPU: test below). Other widths take its scalar path, which is right."""
    rows, width = shape
    codes = torch.stack([packed // 16, packed % 16], -1).view(-1)[:rows * width].long().view(rows, width)
    if width % 16 == 0:
        block = torch.arange(rows)[:, None] * (width // blocksize) + torch.arange(width)[None] // blocksize
    else:
        block = (torch.arange(rows * width) // blocksize).view(rows, width)
    return (CODEBOOK[quant_type][codes] * absmax[block]).to(dtype)


def test_the_codebooks_are_bitsandbytes():
    import bitsandbytes as bnb

    for quant_type, codebook in CODEBOOK.items():
        assert_close(bnb.functional.get_4bit_type(quant_type, "cpu"), codebook, rtol=0, atol=1e-8)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantization_scales_are_each_blocks_absmax(shape):
    weight = torch.randn(*shape) * 0.02
    for quant_type in CODEBOOK:
        layer = quant.quantize_linear(weight, quant_type)
        flat = torch.nn.functional.pad(weight.reshape(-1), (0, -weight.numel() % 64)).view(-1, 64)
        assert_close(layer.weight.quant_state.absmax, flat.abs().amax(1), rtol=0, atol=0)
        # each weight got its nearest code: within half the widest gap of the codebook, times its scale
        scale = absmax_of(layer)[torch.arange(weight.numel()) // 64].view(shape)
        error = (reference_weight(layer) - weight).abs() / scale
        assert error.max() <= (0.5 * CODEBOOK[quant_type].sort().values.diff().max()) + 1e-6


@pytest.mark.parametrize("kernel", ["this-cpu", "avx512-as-measured"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_4bit_decoding_equals_the_formula(monkeypatch, shape, kernel):
    """dequantize (whole) and dequantized_rows (by rows) equal the formula, NF4 and FP4, with and without double
    quantization, whatever bitsandbytes' kernel does at widths where minipeft does not use it; so do the
    forward and the input gradient of the 4-bit linear."""
    if kernel == "avx512-as-measured":
        monkeypatch.setattr(quant, "bitsandbytes_dequantize_4bit", avx512_kernel_as_measured)
    weight = torch.randn(*shape) * 0.02
    for quant_type in CODEBOOK:
        for double_quant in (False, True):
            layer = quant.quantize_linear(weight, quant_type, torch.float32, double_quant)
            expected = reference_weight(layer)
            assert (expected - weight).abs().max() < 0.02 * 4  # near the weight: the scales are right (N(0, .02))
            assert_close(quant.dequantize(layer), expected, rtol=0, atol=0)
            by_rows = list(quant.dequantized_rows(layer, rows=64))
            assert len(by_rows) == -(-shape[0] // 64)
            assert_close(torch.cat([rows for _, _, rows in by_rows]), expected, rtol=0, atol=0)
            x = torch.randn(2, 3, shape[1], requires_grad=True)
            ours = layer(x)
            grad_out = torch.randn_like(ours)
            (grad,) = torch.autograd.grad(ours, x, grad_out)
            assert_close(ours, x @ expected.T, rtol=1e-5, atol=1e-6)
            assert_close(grad, grad_out @ expected, rtol=1e-5, atol=1e-6)


def test_the_stand_in_is_the_kernel_on_this_cpu():
    """On an AVX512 CPU the stand-in equals bitsandbytes' kernel bit for bit, wrong widths included; elsewhere the
    kernel is right at every width (the stand-in's bug is the AVX512 path's alone)."""
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    for shape in SHAPES:
        for quant_type in CODEBOOK:
            layer = quant.quantize_linear(torch.randn(*shape) * 0.02, quant_type)
            state = layer.weight.quant_state
            kernel = quant.bitsandbytes_dequantize_4bit(layer.weight.data.view(-1), state.absmax, 64, quant_type,
                                                        tuple(shape), torch.float32)
            expected = avx512_kernel_as_measured(layer.weight.data.view(-1), state.absmax, 64, quant_type,
                                                 tuple(shape), torch.float32) if avx512 else reference_weight(layer)
            assert_close(kernel, expected, rtol=0, atol=0)


def test_a_checkpoint_at_such_widths_loads_right_and_says_so(tmp_path, monkeypatch):
    """A 4-bit model whose rows are 96 and 160 numbers long: one warning line at load naming the widths, and the
    logits of transformers' Llama given the formula's weights, with the AVX512 kernel's stand-in in place."""
    monkeypatch.setattr(quant, "bitsandbytes_dequantize_4bit", avx512_kernel_as_measured)
    reference = write_hf_checkpoint(tmp_path, hidden_size=96, intermediate_size=160, num_attention_heads=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(tmp_path, quantize="nf4")
    lines = [str(w.message) for w in caught if "64" in str(w.message)]
    assert len(lines) == 1 and "96 (down_proj" not in lines[0]
    assert "96 (gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" in lines[0] and "160 (down_proj)" in lines[0]
    with torch.no_grad():
        for name, module in model.named_modules():
            if quant.is_4bit(module):
                reference.get_submodule(name).weight.copy_(reference_weight(module))
        ids = torch.randint(0, 256, (2, 7))
        assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path)  # full precision: nothing to say


def test_weights_kept_decoded_while_generating_give_the_same_numbers(tmp_path):
    """quant.decoded_weights(read_codes=False) keeps each 4-bit weight decoded, as the formula above decodes it,
    within its budget, in model order; the logits and the greedy tokens are those of decoding every weight at
    each use; gradients never use the kept weights, and nothing is kept after the block."""
    import minipeft

    write_hf_checkpoint(tmp_path, intermediate_size=200)  # the MLP's 4-bit weights are rows of 200: the torch path
    model = load_model(tmp_path, quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, quant.Linear4bit)]
    sizes = [m.out_features * m.in_features * 4 for m in layers]
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        plain = model(ids)
    fingerprint = minipeft.base_fingerprint(model)
    budget = (sizes[0] + sizes[1] + sizes[2] // 2) / 2 ** 20  # the first two fit, the third does not
    with quant.decoded_weights(model, budget, read_codes=False) as kept:
        assert kept == (sizes[0] + sizes[1]) / 2 ** 20
        assert [m.kept is not None for m in layers] == [True, True] + [False] * (len(layers) - 2)
        for layer in layers[:2]:
            assert torch.equal(layer.kept.weight, reference_weight(layer))
    assert sizes[1] < sizes[0]
    with quant.decoded_weights(model, sizes[1] / 2 ** 20, read_codes=False) as kept:
        assert kept == 0  # the first does not fit: none after it is kept either, though the second would fit
    with quant.decoded_weights(model, 1024, read_codes=False):
        assert all(m.kept is not None for m in layers)
        with torch.no_grad():
            assert torch.equal(model(ids), plain)
        decoded = [m.kept.weight for m in layers]
        for m in layers:
            m.kept.weight = torch.zeros_like(m.kept.weight)
        with torch.no_grad():
            assert not torch.equal(model(ids), plain)  # generation reads the kept weights
        with torch.enable_grad():
            assert torch.equal(model(ids), plain)  # the training path decodes as it goes
        for m, weight in zip(layers, decoded):
            m.kept.weight = weight
    assert all(m.kept is None for m in layers)
    prompts = [ids[0].tolist(), ids[1, :4].tolist()]
    assert minipeft.generate(model, prompts, 8, eos_id=-1, read_codes=False) == minipeft.generate(
        model, prompts, 8, eos_id=-1, weight_cache_mb=0, read_codes=False)
    assert minipeft.base_fingerprint(model) == fingerprint
