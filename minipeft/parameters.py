"""Which numbers train, and how many: the "<1% of the weights" claim of PEFT, made visible.

The base model is frozen: only tensors that a PEFT mechanism added (named `lora_A`, `lora_B`,
`learned_prompts`) ever get requires_grad=True.
"""

import hashlib

import torch

PEFT_PARAMETER_NAMES = ("lora_A", "lora_B", "learned_prompts")


def is_peft_parameter(name: str) -> bool:
    return any(part in PEFT_PARAMETER_NAMES for part in name.split("."))


def freeze_base(model):
    """requires_grad=False on every tensor that is not a PEFT tensor."""
    for name, parameter in model.named_parameters():
        if not is_peft_parameter(name):
            parameter.requires_grad_(False)


def real_numel(parameter) -> int:
    """Numbers a tensor stands for: a 4-bit weight packs two per uint8 byte, counted as (out x in)."""
    quant_state = getattr(parameter, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


def count_parameters(model, verbose=False) -> dict:
    """Trainable and total numbers (4-bit weights counted as the weights they encode)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(real_numel(p) for p in model.parameters())
    report = {"trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total}
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable: {report['trainable_percent']:.4f}%")
    return report


def base_fingerprint(model) -> dict[str, str]:
    """sha256 of every base tensor (4-bit ones as stored, with their scales): to prove they never change."""
    digests = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if is_peft_parameter(name):
            continue
        parts = [tensor]
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            parts += [quant_state.absmax] + ([quant_state.state2.absmax] if quant_state.nested else [])
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests[name.replace(".base_layer", "").replace(".word_embeddings", "")] = digest.hexdigest()
    return digests
