"""merge, unmerge and disabled(), for a whole model: each asks the wrappers in it (the contract in
contract.py), so none keeps a list of methods."""

from ..errors import BadInput
from .named_adapters import wrappers


def merge(model) -> float:
    """Fold every change to a weight (LoRA, DoRA, IA3, BitFit) into the base, for inference; return the worst
    rounding error (0 unless the base is 4-bit). Learned prompts, a learned past and bottleneck adapters are
    not changes to a weight: they stay as they are, and still work."""
    names = list(getattr(model, "adapter_settings", {}))
    if len(names) > 1:
        raise BadInput(f"merge: the model holds adapters {names}; folding one into the base would change it "
                       f"under the others. delete_adapter the others first")
    found = [(name, m) for name, m in wrappers(model) if hasattr(m, "merge")]
    if any(name == "lm_head" for name, _ in found) and model.config.tie_word_embeddings:
        raise BadInput("merge: lm_head shares its weight with the input embedding (tie_word_embeddings); "
                       "merging its adapter would change the embedding too. Keep that adapter unmerged")
    return max((m.merge() for _, m in found), default=0.0)


def unmerge(model) -> float:
    """Take every method's tensors back out of the base weights; return the worst rounding error."""
    return max((m.unmerge() for _, m in wrappers(model) if hasattr(m, "unmerge")), default=0.0)


class disabled:
    """`with minipeft.disabled(model): ...` runs the bare frozen base, whatever methods are on."""

    def __init__(self, model):
        self.modules = [m for _, m in wrappers(model)]
        merged = [name for name, m in wrappers(model) if getattr(m, "merged", False)]
        if merged:
            raise BadInput(f"disabled: {merged[0]} is merged into its base weight; unmerge() first")

    def __enter__(self):
        self.was = [m.enabled for m in self.modules]
        for module in self.modules:
            module.enabled = False

    def __exit__(self, *exc):
        for module, was in zip(self.modules, self.was):
            module.enabled = was
