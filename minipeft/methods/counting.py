"""Counting: trainable and total numbers, 4-bit weights counted as the weights they encode."""


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
