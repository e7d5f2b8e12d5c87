"""A trained task head beside any method, as peft writes `modules_to_save`: the module's name in the method's
config, and its whole weight under the module's own name.

    adapter_config.json   {..., "modules_to_save": ["lm_head"]}, or, for a classifier, {..., "task_type": "SEQ_CLS",
                          "modules_to_save": ["classifier", "score"]} (peft's names for a classifier; Llama's is score)
    adapter_model.safetensors: base_model.model.lm_head.weight (V, D), or base_model.model.score.weight (C, D)
"""

from ..errors import BadInput
from ..methods.placing import adapters_named
from ..methods.task_head import ClassificationHead, TaskHeadSettings, TrainedHead, add_task_head
from .peft import PREFIX, reported_against

HEADS = ("lm_head", "score")
UNUSED = ("classifier", "pre_classifier")  # what peft names a classifier in other architectures: no Llama module


def write_task_head(model, settings: TaskHeadSettings, name, config: dict, tensors: dict):
    """The method's config and tensors, with the head added."""
    head, = adapters_named(model, name, (TrainedHead, ClassificationHead)).values()
    saved = list(config.get("modules_to_save") or [])
    if settings.num_labels is None:
        return ({**config, "modules_to_save": saved + ["lm_head"]},
                {**tensors, f"{PREFIX}lm_head.weight": head.head.weight})
    return ({**config, "task_type": "SEQ_CLS", "modules_to_save": saved + ["classifier", "score"]},
            {**tensors, f"{PREFIX}score.weight": head.score.weight})


def split_task_head(config: dict, source) -> tuple[dict, list]:
    """(the config as its method reads it, the heads named in modules_to_save)."""
    saved = config.get("modules_to_save")
    if not isinstance(saved, list):
        return config, []
    heads = [m for m in saved if m in HEADS]
    if len(heads) > 1:
        raise BadInput(f"{source}: modules_to_save names {heads}; one head at a time (lm_head or score)")
    rest = [m for m in saved if m not in HEADS + UNUSED]
    return {**config, "modules_to_save": rest or None}, heads


def read_task_head(model, heads: list, tensors: dict, source, name) -> dict:
    """Add the head the file names; {tensor name in the file: the parameter to fill}."""
    if heads == ["lm_head"]:
        head = reported_against(source, add_task_head, model, None, name)
        return {f"{PREFIX}lm_head.weight": head.head.weight}
    weight = tensors.get(f"{PREFIX}score.weight")
    if weight is None or weight.dim() != 2:
        raise BadInput(f"{source}: modules_to_save names score, but the file has no 2-d {PREFIX}score.weight")
    head = reported_against(source, add_task_head, model, weight.shape[0], name)
    return {f"{PREFIX}score.weight": head.score.weight}
