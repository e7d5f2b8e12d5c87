"""LN tuning: train only the normalisation layers; every weight matrix stays frozen.

Zhao et al. 2024, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning" (ICLR 2024):
tuning the LayerNorms of each attention block suffices to adapt a language model to a new domain; its
"LayerNorm-simple" trains them alone, 0.004% of a 7B model. Llama's norms are RMSNorms, with a gain and no bias:

    y = x / sqrt(mean(x²) + eps) * g        g (D,) trained, starting at the base's gain

    x ─► the frozen norm's computation, with a trained copy of its gain g in place of the frozen one ─► y

The wrapper is BitFit's trained gain (bitfit.NormWithLearnedGain: LN tuning is that half of BitFit, alone).
It trains D numbers a norm, (2 L + 1) D in all: (2 x 32 + 1) x 4096 = 266,240 on Llama-7B (0.004% of 6.7B).
merge() copies g into the base norm. peft's LN tuning keeps a trained copy of the whole norm module; on an
RMSNorm that is the same gain, so the two compute the same.

On disk (peft's layout, method LN_TUNING): adapter_config.json {"peft_type": "LN_TUNING", "target_modules"} and per
trained norm base_model.model.<norm name>.ln_tuning_layers.weight (D,).
"""

from dataclasses import dataclass, field

from ..errors import BadInput
from .bitfit import NormWithLearnedGain
from .contract import attach, innermost, target_matches

NORMS = ("input_layernorm", "post_attention_layernorm", "norm")  # peft's Llama default: every norm


@dataclass
class LNTuningSettings:
    """What add_ln_tuning was asked for: what its adapter file is written from (formats/peft.py)."""
    targets: list = field(default_factory=list)


def add_ln_tuning(model, targets=NORMS, name="default") -> int:
    """Give every norm that `targets` names a trained gain. Returns how many.

    Args:
        targets: norm names or name suffixes, or one regex the whole name must match (peft's rule); the
            default is every norm of the model (peft's for Llama).
        name: the adapter these belong to.
    """
    norms = [slot for slot, m in model.named_modules() if hasattr(innermost(m), "eps")
             and not slot.endswith(".base_norm") and target_matches(slot, targets)]  # a wrapped norm: its slot
    if not norms:
        raise BadInput(f"targets: {targets!r} matches no norm in the model")
    attach(model, name, LNTuningSettings(sorted(norms) if isinstance(targets, str) else list(targets)), norms,
           lambda slot, base: NormWithLearnedGain(base))
    return len(norms)
