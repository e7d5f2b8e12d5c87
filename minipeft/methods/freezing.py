"""Freezing: every tensor of the model is frozen but those a method's wrappers declare as trainable
(`trainable_names`, the contract in contract.py); only adapters that serve some row of the batch train."""

from .named_adapters import route, wrappers


def adapter_parameters(model) -> dict:
    """{full name: parameter} of every tensor that a method trains."""
    found = {}
    for name, module in wrappers(model):
        for tensor_name in module.trainable_names:
            found[f"{name}.{tensor_name}" if name else tensor_name] = module.get_parameter(tensor_name)
    return found


def adapter_state(model) -> dict:
    """{full name: tensor} of every tensor that a method changes without training it (`kept_names`)."""
    return {f"{name}.{kept}" if name else kept: module.get_buffer(kept)
            for name, module in wrappers(model) for kept in module.kept_names}


def freeze_base(model):
    """requires_grad=False on every tensor that no wrapper declares as trainable; new wrappers take the
    model's mode (a LoRA dropout added to a model in eval mode stays off); then `route`."""
    trainable = {id(p) for p in adapter_parameters(model).values()}
    for parameter in model.parameters():
        if id(parameter) not in trainable:
            parameter.requires_grad_(False)
    for _, module in wrappers(model):
        module.train(model.training)
    route(model)
