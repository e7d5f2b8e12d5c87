"""The CUDA path of what the tests prove on CPU, on checkpoints transformers writes (run it on a GPU).

    python bench/cuda_check.py --device cuda      # on a GPU: prints one JSON line per check
    python bench/cuda_check.py --device cpu       # anywhere (tested)

Checks: logits against transformers for rope llama3 + biases + GQA; NF4 against bitsandbytes'
dequantization; gradients with and without checkpointing (LoRA with dropout, and a learned past)
under bf16 autocast; every method (tests/test_every_method.py) on NF4 under bf16 autocast, with and
without checkpointing; an interrupted run resumed from checkpoint.safetensors, with the CUDA RNG state.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minipeft  # noqa: E402
from minipeft.methods.lora import lora_layers  # noqa: E402
from minipeft.train.batches import Batches  # noqa: E402
from minipeft.train.run_state import load_checkpoint, save_checkpoint  # noqa: E402
from tests.helpers import write_hf_checkpoint  # noqa: E402
from tests.test_every_method import METHODS, add_trained_looking  # noqa: E402

VARIANT = dict(rope_theta=500000.0, attention_bias=True, mlp_bias=True, num_key_value_heads=1,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16})


def report(check, value, bound):
    print(json.dumps({"check": check, "value": value, "bound": bound, "ok": value <= bound}), flush=True)
    return value <= bound


def lora_gradients(path, device, checkpointing, learned_past=False):
    torch.manual_seed(0)
    model = minipeft.load_model(path, quantize="nf4", device=device).train()
    minipeft.add_lora(model, ["q", "k", "v", "o", "gate", "up", "down"], r=4, dropout=0.2)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    if learned_past:
        shape = (2, 1, 3, model.config.head_dim)  # layers, kv heads, P, head_dim
        past = torch.nn.Parameter(torch.randn(shape, device=device))
        model.model.learned_past = lambda batch: ([k[None].expand(batch, -1, -1, -1) for k in past],) * 2
    minipeft.enable_checkpointing(model, checkpointing)
    ids = torch.randint(0, 256, (2, 24), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        model.loss(ids, ids).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad] + ([past.grad] if learned_past else [])
    return grads, torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def method_gradients(path, device, method, checkpointing):
    model = add_trained_looking(minipeft.load_model(path, quantize="nf4", device=device), method).train()
    minipeft.enable_checkpointing(model, checkpointing)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        model.loss(ids, ids).backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


def resumed_run(path, device, workdir):
    def setup():
        torch.manual_seed(1)
        model = minipeft.load_model(path, quantize="nf4", device=device).train()
        minipeft.add_lora(model, ["q", "v"], r=4, dropout=0.3)
        minipeft.enable_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        samples = [torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
        return model, optimizer, scheduler, Batches(samples, 2, seed=0)

    def step(model, optimizer, batches):
        ids = torch.tensor(batches.next(), device=device)
        loss = model.loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    model, optimizer, scheduler, batches = setup()
    straight = [step(model, optimizer, batches) for _ in range(6)]
    model, optimizer, scheduler, batches = setup()
    first = [step(model, optimizer, batches) for _ in range(3)]
    save_checkpoint(workdir / "checkpoint.safetensors", model, optimizer, scheduler, batches, device, step=3)
    model, optimizer, scheduler, batches = setup()
    load_checkpoint(workdir / "checkpoint.safetensors", model, optimizer, scheduler, batches, device)
    return straight, first + [step(model, optimizer, batches) for _ in range(3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = minipeft.llama.loader.check_device(parser.parse_args().device)
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__}), flush=True)
    ok = True
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "weights"
        reference = write_hf_checkpoint(path, **VARIANT).to(device)
        ids = torch.randint(0, 256, (2, 40), device=device)
        with torch.no_grad():
            ours = minipeft.load_model(path, device=device)(ids)
            ok &= report("fp32 logits vs transformers (llama3 rope, biases, GQA)",
                         (ours - reference(ids).logits).abs().max().item(), 1e-4)
            quantized = minipeft.load_model(path, quantize="nf4", device=device)
            import bitsandbytes as bnb

            decoded = minipeft.load_model(path, device=device)
            for name, layer in quantized.named_modules():
                if isinstance(layer, bnb.nn.Linear4bit):
                    decoded.get_submodule(name).weight.data = minipeft.llama.quant.dequantize(layer)
            ok &= report("nf4 logits vs bitsandbytes' dequantization",
                         (quantized(ids) - decoded(ids)).abs().max().item(),
                         1e-4)
        for learned_past in (False, True):
            plain, plain_rng, plain_cuda_rng = lora_gradients(path, device, False, learned_past)
            ckpt, ckpt_rng, ckpt_cuda_rng = lora_gradients(path, device, True, learned_past)
            worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(plain, ckpt))
            what = f"{'learned past + ' if learned_past else ''}LoRA dropout"
            ok &= report(f"bf16 gradients, checkpointing vs not ({what})",
                         worst, 1e-6)
            same_rng = torch.equal(plain_rng, ckpt_rng) and (plain_cuda_rng is None or torch.equal(plain_cuda_rng,
                                                                                                   ckpt_cuda_rng))
            ok &= report("RNG state after backward differs", float(not same_rng), 0.0)
        for method in METHODS:
            plain, ckpt = (method_gradients(path, device, method, checkpointing) for checkpointing in (False, True))
            worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(plain, ckpt))
            ok &= report(f"{method}: bf16 NF4 gradients, checkpointing vs not", worst, 1e-6)
        straight, resumed = resumed_run(path, device, Path(workdir))
        ok &= report("resumed losses vs straight run (max abs)",
                     max(abs(a - b) for a, b in zip(straight, resumed)), 0.0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
