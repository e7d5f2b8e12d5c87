"""Behaviours the README promises, each pinned by a test that fails when it breaks."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import minipeft
from minipeft import KVCache, add_lora, enable_checkpointing, load_model, merge
from minipeft.llama.generate import choose_next
from minipeft.llama.loss import linear_cross_entropy
from minipeft.llama.quant import WidenedLinear
from minipeft.methods.lora import lora_layers
from minipeft.train.batches import Batches
from minipeft.train.data import Filters, load_corpus
from minipeft.train.loop import warmup_cosine
from tests.helpers import ROOT, write_hf_checkpoint


@pytest.fixture()
def tiny(tmp_path):
    return write_hf_checkpoint(tmp_path), tmp_path


def randomized_lora(model, **kwargs):
    add_lora(model, ["q", "k", "v", "o", "gate", "up", "down"], r=4, **kwargs)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)


@pytest.mark.parametrize("padded", [False, True])
def test_cached_forward_continues_with_chunks_of_several_tokens(tiny, padded):
    _, path = tiny
    model = load_model(path)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0 if padded else 1  # left padding in the second row
    cache = KVCache(model.config.num_hidden_layers)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        pieces = [model(ids[:, :4], attention_mask=mask[:, :4], cache=cache),
                  model(ids[:, 4:9], cache=cache), model(ids[:, 9:], cache=cache)]
    real = mask.bool()
    assert_close(torch.cat(pieces, dim=1)[real], full[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_fused_cross_entropy_over_several_chunks(dtype, atol):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(300, 16, generator=generator).to(dtype)
    targets = torch.randint(0, 300, (50,), generator=generator)
    ours = linear_cross_entropy(hidden, weight, targets, chunk_size=7)  # 8 chunks, the last one short
    (grad,) = torch.autograd.grad(ours * 0.5, hidden)
    reference_hidden = hidden.detach().float().requires_grad_()
    reference = F.cross_entropy(reference_hidden @ weight.float().t(), targets, reduction="sum")
    (reference_grad,) = torch.autograd.grad(reference * 0.5, reference_hidden)
    assert grad.dtype == dtype
    assert_close(ours.float(), reference, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)  # a sum of 50
    assert_close(grad.float(), reference_grad, rtol=0, atol=atol)


def test_fused_cross_entropy_under_autocast_takes_bf16_logits_like_a_plain_lm_head():
    """Under bf16 autocast a plain lm_head's matmul runs in bf16; the fused loss must do the same (its
    matmul writes into reused memory, which autocast does not cast by itself)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=generator).requires_grad_()
    weight = torch.randn(300, 16, generator=generator)
    targets = torch.randint(0, 300, (40,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets, chunk_size=16)
        reference = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    in_fp32 = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    assert_close(ours, reference, rtol=1e-6, atol=0)
    assert (ours - in_fp32).abs() > 1e-3  # bf16 logits really differ from fp32 ones here


def test_a_16bit_lm_head_under_autocast_computes_as_a_plain_one():
    """A bf16 lm_head kept beside fp32 compute (quant.WidenedLinear) gives, under bf16 autocast, what an
    autocast matmul gives: bf16 logits."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(300, 16, generator=generator).bfloat16(), requires_grad=False)
    hidden = torch.randn(5, 16, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = WidenedLinear(weight)(hidden)
        reference = hidden @ weight.float().t()
    assert ours.dtype == reference.dtype == torch.bfloat16
    assert_close(ours, reference, rtol=0, atol=0)


def test_plain_loss_path_when_lm_head_has_an_adapter(tiny):
    _, path = tiny
    model = load_model(path)
    add_lora(model, ["lm_head", "q"], r=4)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    loss = model.loss(ids, labels)
    grads = torch.autograd.grad(loss, [model.lm_head.lora_A.weight, model.lm_head.lora_B.weight])
    logits = model(ids)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    reference_grads = torch.autograd.grad(reference, [model.lm_head.lora_A.weight, model.lm_head.lora_B.weight])
    assert_close(loss, reference, rtol=0, atol=1e-6)
    for ours, theirs in zip(grads, reference_grads):
        assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_checkpointed_backward_leaves_the_rng_where_the_plain_one_does(tiny):
    """Dropout masks later in the run do not depend on whether checkpointing is on."""
    _, path = tiny

    def state_after_backward(checkpointing):
        torch.manual_seed(0)
        model = load_model(path).train()
        randomized_lora(model, dropout=0.3)
        enable_checkpointing(model, checkpointing)
        ids = torch.randint(0, 256, (2, 8))
        model.loss(ids, ids).backward()
        return torch.get_rng_state(), torch.rand(3)

    plain, checkpointed = state_after_backward(False), state_after_backward(True)
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])


def test_recompute_under_bf16_autocast_on_cpu(tiny):
    _, path = tiny

    def gradients(checkpointing):
        torch.manual_seed(0)
        model = load_model(path)
        randomized_lora(model)
        enable_checkpointing(model, checkpointing)
        ids = torch.randint(0, 256, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(ids, ids)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    for name in plain:  # bit-equal: the recompute runs the same bf16 kernels as the forward did
        assert torch.equal(plain[name], checkpointed[name]), name


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_merge_requantizes_with_the_same_settings(tiny, quant_type, double_quant):
    _, path = tiny
    torch.manual_seed(0)
    quantized = load_model(path, quantize=quant_type, double_quant=double_quant)
    randomized_lora(quantized)
    full = load_model(path)
    randomized_lora(full)
    with torch.no_grad():
        for (_, ours), (_, theirs) in zip(lora_layers(quantized).items(), lora_layers(full).items()):
            theirs.lora_A.weight.copy_(ours.lora_A.weight)
            theirs.lora_B.weight.copy_(ours.lora_B.weight)
    merge(quantized), merge(full)
    for layer in lora_layers(quantized).values():
        weight = layer.base_layer.weight
        assert weight.quant_type == quant_type and weight.quant_state.nested == double_quant
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        error = (quantized(ids) - full(ids)).abs().max().item()
    print(f"{quant_type} merged vs fp32 merged: logits max abs diff {error:.3f}")
    assert error < 0.5


def test_lora_dropout_is_on_in_training_and_off_in_eval_as_in_peft(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    reference, path = tiny
    ours = load_model(path)
    add_lora(ours, ["q", "v", "down"], r=4, dropout=0.5)
    theirs = get_peft_model(reference, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.5,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
            their_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A.weight)
            their_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B.weight)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        logits = {}
        for mode in ("train", "eval"):
            getattr(ours, mode)(), getattr(theirs, mode)()
            torch.manual_seed(7)
            mine = ours(ids)
            torch.manual_seed(7)
            logits[mode] = theirs(input_ids=ids).logits
            assert_close(mine, logits[mode], rtol=0, atol=1e-5)
        assert (logits["train"] - logits["eval"]).abs().max() > 1e-3  # dropout really acted in training


def test_train_code_trains_in_train_mode_and_evaluates_in_eval_mode(default_weights, code_data, tmp_path,
                                                                    monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train_code

    seen = []
    original = minipeft.Llama.loss

    def recording_loss(self, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), self.training))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(minipeft.Llama, "loss", recording_loss)
    monkeypatch.setattr(sys, "argv", ["train_code.py", "--data", str(code_data), "--out", str(tmp_path),
                                      "--max-steps", "2", "--seq-len", "32", "--accum", "1", "--new-tokens", "2"])
    train_code.main()
    training, evaluating = [m for grad, m in seen if grad], [m for grad, m in seen if not grad]
    assert training and all(training) and evaluating and not any(evaluating)


def test_temperature_scales_the_distribution_as_transformers_does():
    from transformers import TemperatureLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([choose_next(logits, 0.5, 1.0, generator) for _ in range(20000)])
    frequencies = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    expected = torch.softmax(TemperatureLogitsWarper(0.5)(None, logits.clone()), -1)[0]
    assert_close(frequencies, expected, rtol=0, atol=0.015)
    assert abs(expected[0].item() - torch.softmax(logits, -1)[0, 0].item()) > 0.2  # T=0.5 really differs from T=1


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_top_p_keeps_exactly_transformers_nucleus(top_p):
    from transformers import TopPLogitsWarper

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=generator) * 3
    logits[0] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * 46))  # a nucleus edge at 0.8 exactly
    kept = TopPLogitsWarper(top_p)(None, logits.clone()) > -float("inf")
    draws = torch.stack([choose_next(logits, 1.0, top_p, generator) for _ in range(300)])  # (300, 64)
    sampled = torch.zeros_like(kept)
    sampled.scatter_(1, draws.t(), True)
    assert not (sampled & ~kept).any()  # never outside the nucleus
    small = kept.sum(-1) <= 4  # and, where the nucleus is small, every member turns up
    assert torch.equal(sampled[small], kept[small])


def test_warmup_cosine_values():
    values = [warmup_cosine(step, warmup=4, total=12) for step in range(14)]
    expected = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(1, 9)] + [0.0, 0.0]
    assert_close(torch.tensor(values[:4] + values[4:]), torch.tensor(expected[:4] + [1.0] + expected[4:-1]),
                 rtol=0, atol=1e-12)


def test_each_epoch_is_shuffled_anew_and_the_same_on_every_run():
    batches = Batches(list(range(10)), batch_size=5, seed=3)
    epochs = [batches.next() + batches.next() for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = Batches(list(range(10)), batch_size=5, seed=3, epoch=1, cursor=5)
    assert again.next() == epochs[1][5:]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"content": text, "path": f"f{i}.py"}) + "\n" for i, text in enumerate(texts)))
    return path


def test_data_filters_at_their_thresholds(tmp_path):
    def line(length):
        return "x" * length

    just = {  # (kept, dropped) around each threshold
        "mean line": ("\n".join([line(100)] * 3), "\n".join([line(101)] * 3)),
        "longest line": (line(1000) + "\n" + "\n".join([line(10)] * 20),
                         line(1001) + "\n" + "\n".join([line(10)] * 20)),
        "alphanumeric": ("a" * 25 + " " * 75, "a" * 24 + " " * 76),
    }
    texts = [kept for kept, _ in just.values()] + [dropped for _, dropped in just.values()]
    corpus = load_corpus([write_jsonl(tmp_path / "d.jsonl", texts)], Filters(max_chars=0), heldout_percent=50)
    kept = {text for _, text in corpus.train + corpus.heldout}
    assert kept == {k for k, _ in just.values()}
    assert corpus.counts["mean line too long"] == corpus.counts["longest line too long"] == 1
    assert corpus.counts["too few alphanumeric"] == 1


def test_auto_generated_markers_in_any_case_in_the_first_lines_and_dedup_across_sources(tmp_path):
    body = "\n".join(f"value_{i} = {i}" for i in range(30))
    marked = [f"# AUTO-GENERATED file\n{body}", f"#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n\n\n"
              f"# This file was Automatically Generated\n{body}1", f"# Autogenerated\n{body}2"]
    late = "\n" * 5 + f"# auto-generated below the first five lines\n{body}3"
    plain = [f"{body}{i}x" for i in range(6)]
    first = write_jsonl(tmp_path / "a.jsonl", marked + [late] + plain)
    second = write_jsonl(tmp_path / "b.jsonl", plain[:3] + [plain[0]])  # the same files again, from another source
    corpus = load_corpus([first, second], Filters(max_chars=0), heldout_percent=50)
    assert corpus.counts["auto-generated"] == 3 and corpus.counts["duplicate"] == 4
    assert corpus.counts["kept"] == 7  # the six plain files and the one marked too late to count
