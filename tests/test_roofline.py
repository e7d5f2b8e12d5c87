"""bench/roofline.py's count of a QLoRA step's arithmetic equals torch's own FLOP formulas, applied to every
matmul and attention call that one real training step makes (with checkpointing: the recompute too)."""

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

import minipeft
from tests.helpers import ROOT, write_hf_checkpoint

sys.path.insert(0, str(ROOT / "bench"))
from roofline import qlora_step_flops  # noqa: E402

aten = torch.ops.aten
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu:  # (q, k, v, ...) on CPU
             lambda q, k, v, *rest, **kw: sdpa_flop_count(q.shape, k.shape, v.shape),
             aten._scaled_dot_product_flash_attention_for_cpu_backward:  # (grad_out, q, k, v, ...)
             lambda g, q, k, v, *rest, **kw: sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)}


class CountFlops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total, self.uncounted = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if packet in ATTENTION:
            self.total += ATTENTION[packet](*args)
        elif packet in flop_registry:
            self.total += flop_registry[packet](*args, **(kwargs or {}), out_val=out)
        elif any(word in str(packet) for word in ("mm", "attention", "linear", "conv")):
            self.uncounted.add(str(packet))
        return out


def test_step_flops_match_torch_formulas(tmp_path):
    write_hf_checkpoint(tmp_path, kv_heads=2)
    model = minipeft.load_model(tmp_path)
    minipeft.add_lora(model, ["q_proj", "k_proj", "v_proj"], r=8)
    minipeft.enable_checkpointing(model)
    model.train()
    ids = torch.randint(0, 256, (2, 32))
    with CountFlops() as counter:
        model.loss(ids, ids).backward()
    assert not counter.uncounted
    assert qlora_step_flops(model.config, batch=2, seq=32, r=8)["total"] == counter.total


def test_the_step_roof_times_the_counted_arithmetic(default_weights):
    """bench/shape_roof.py times each matmul and attention call of the step alone: what it times is what
    roofline.py counts, but LoRA's rank-r matmuls."""
    from shape_roof import step_parts

    config = minipeft.LlamaConfig.from_json(default_weights / "config.json")
    counted = qlora_step_flops(config, batch=4, seq=256, r=8)
    timed = sum(flops * runs for _, _, flops, runs in step_parts(config, 4, 256, torch.float32))
    assert timed == counted["total"] - counted["lora"]
