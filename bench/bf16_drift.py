"""How far bf16 compute moves one QLoRA step from fp32, for minipeft and for transformers + peft + bitsandbytes,
on the same batch and the same adapter: the loss, and each stack's LoRA gradients against its own fp32 ones.

    .venv/bin/python bench/bf16_drift.py                                  # this CPU's bf16 (native where it has it)
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/bf16_drift.py          # oneDNN's AVX2 path: bf16 emulated

If minipeft's bf16 gradients are further from its fp32 ones than the peer's are from theirs, a step of minipeft's
bf16 path loses more than it must; if both are as far, the difference is the hardware's arithmetic. The batch is
real code (this interpreter's `json` and `email` packages), 2 x 256 tokens, every position labelled; LoRA r=8 on
q, k, v, o and the MLP (train_code.py's), no dropout, A and B random so that both get gradients.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minipeft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def code_batch(tokenizer, rows, length):
    import email
    import json as json_package

    files = sorted(Path(json_package.__file__).parent.glob("*.py")) + sorted(Path(email.__file__).parent.glob("*.py"))
    ids = tokenizer.encode("\n".join(f.read_text() for f in files))
    return torch.tensor(ids[:rows * length]).view(rows, length)


def minipeft_gradients(weights, adapter, ids, dtype):
    model, _ = minipeft.load(weights, quantize="nf4", dtype=dtype)
    minipeft.load_adapter(model, adapter)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    minipeft.enable_checkpointing(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model.loss(ids, labels=ids, reduction="sum")
    loss.backward()
    return loss.item(), {"base_model.model." + n: p.grad.float() for n, p in model.named_parameters()
                         if p.requires_grad}


def peer_gradients(weights, adapter, ids, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(weights, quantization_config=quantization, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss * ids[:, 1:].numel()  # a sum, as minipeft's
    loss.backward()
    return loss.item(), {n.replace(".default", ""): p.grad.float() for n, p in model.named_parameters()
                         if p.requires_grad}


def relative_error(ours, reference):
    num = sum((ours[n] - reference[n]).pow(2).sum() for n in reference)
    return (num / sum(reference[n].pow(2).sum() for n in reference)).sqrt().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="weights/smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = minipeft.load(args.weights, quantize="nf4")
    minipeft.add_lora(model, TARGETS, r=8, alpha=16)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    ids = code_batch(tokenizer, args.rows, args.seq)
    results = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "native_bf16": torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}
    with tempfile.TemporaryDirectory() as adapter:
        minipeft.save_adapter(model, adapter)
        del model
        grads = {}
        for stack, run in (("minipeft", minipeft_gradients), ("peer", peer_gradients)):
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                loss, grads[stack, name] = run(args.weights, adapter, ids, dtype)
                results[f"{stack} {name} loss per token"] = loss / ids[:, 1:].numel()
    for stack in ("minipeft", "peer"):
        results[f"{stack}: bf16 gradients against its fp32 ones"] = relative_error(grads[stack, "bf16"],
                                                                                   grads[stack, "fp32"])
        results[f"{stack}: bf16 gradients against the other's fp32 ones"] = relative_error(
            grads[stack, "bf16"], grads["peer" if stack == "minipeft" else "minipeft", "fp32"])
    results["fp32 gradients, minipeft against the peer"] = relative_error(grads["minipeft", "fp32"],
                                                                          grads["peer", "fp32"])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
