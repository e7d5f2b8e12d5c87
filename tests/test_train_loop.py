"""Gradient accumulation weighs every labelled token the same: micro-batches of different lengths give the
gradient of the one big batch they make together."""

import contextlib

import torch
from torch.testing import assert_close

from minipeft import add_lora, load_model
from minipeft.train.batches import pad_batch
from minipeft.train.loop import accumulate_gradients
from tests.helpers import write_hf_checkpoint


def lora_gradients(weights_dir, run):
    torch.manual_seed(0)
    model = load_model(weights_dir)
    add_lora(model, ["q", "v", "down"], r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    run(model)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    write_hf_checkpoint(tmp_path)
    generator = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (5, 31, 12, 3)]
    micro_batches = [pad_batch(samples[:1], "cpu"), pad_batch(samples[1:3], "cpu"), pad_batch(samples[3:], "cpu")]

    def one_big_batch(model):
        ids, mask, labels = pad_batch(samples, "cpu")
        model.loss(ids, labels, attention_mask=mask).backward()

    def accumulated(model):
        loss, tokens = accumulate_gradients(model, micro_batches, contextlib.nullcontext)
        assert tokens == sum(map(len, samples))

    def mean_per_micro_batch(model):  # the old way: each micro-batch's mean, divided by their count
        for ids, mask, labels in micro_batches:
            (model.loss(ids, labels, attention_mask=mask) / len(micro_batches)).backward()

    reference = lora_gradients(tmp_path, one_big_batch)
    ours = lora_gradients(tmp_path, accumulated)
    for name in reference:
        assert_close(ours[name], reference[name], rtol=0, atol=1e-6)
    old = lora_gradients(tmp_path, mean_per_micro_batch)
    assert max((old[n] - reference[n]).abs().max() for n in reference) > 1e-3  # the test can tell them apart


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    from pathlib import Path

    from minipeft.train.loop import compute_dtype, native_bf16

    cpu = torch.device("cpu")
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
                .split(":")[1].split())
    assert native_bf16(cpu) == bool(flags & {"avx512_bf16", "amx_bf16"})  # the kernel's own view, and the CPU's
    assert compute_dtype("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert compute_dtype("fp32", cpu) == "fp32" and compute_dtype("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert compute_dtype("auto", cpu) == "bf16"


def test_the_token_count_is_the_one_the_loss_divides_by(tmp_path):
    """scored_tokens(model=...) is how many terms model.loss sums, their sum over their mean, for every way a
    position can be scored or not: padding, prepended prompts (their last predicts the first token), a packed
    row (a document's first token), a mixed batch (rows with and without prompts), tokens IAPT reads."""
    import minipeft
    from minipeft.train.batches import pack_rows
    from minipeft.train.loop import scored_tokens

    write_hf_checkpoint(tmp_path)
    generator = torch.Generator().manual_seed(4)
    samples = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (9, 4, 7)]
    padded = pad_batch(samples, "cpu")
    packed = pack_rows([samples[:2], samples[2:]], "cpu")
    cases = {"bare": (lambda m: None, [padded, packed]),
             "prompt": (lambda m: minipeft.add_prompt_tuning(m, num_prompts=3), [padded, packed]),
             "prefix": (lambda m: minipeft.add_prefix_tuning(m, num_prompts=3), [padded, packed]),
             "iapt": (lambda m: minipeft.add_iapt(m, num_prompts=2, r=4, instruction_tokens=3), [padded]),
             "mixed": (lambda m: (minipeft.add_prompt_tuning(m, num_prompts=3, name="fox"), minipeft.add_lora(
                 m, ["q"], r=2, name="code"), minipeft.set_adapter(m, ["fox", "code", None])), [padded])}
    for name, (add, batches) in cases.items():
        model = load_model(tmp_path)
        add(model)
        for ids, mask, labels, *documents in batches:
            documents = documents[0] if documents else None
            with torch.no_grad():
                total = model.loss(ids, labels, attention_mask=mask, documents=documents, reduction="sum")
                mean = model.loss(ids, labels, attention_mask=mask, documents=documents)
            count = scored_tokens(labels, documents, model=model, mask=mask)
            assert count == round((total / mean).item()), (name, documents is not None)
