"""Bottleneck adapters' file: minipeft's own, in peft's layout, since peft has no bottleneck adapters (and says
so when it is given this file, by its unknown peft_type).

    adapter_config.json   {"peft_type": "BOTTLENECK", "format": ..., "placement": "houlsby" | "pfeiffer",
                           "bottleneck_size": m, "non_linearity": "relu" | "gelu" | "silu" | "tanh"}
    adapter_model.safetensors, per wrapped layer:
        base_model.model.<layer name>.adapter_down.weight (m, D), .adapter_down.bias (m,)
        base_model.model.<layer name>.adapter_up.weight (D, m), .adapter_up.bias (D,)
"""

from ..errors import require
from ..methods.bottleneck import BottleneckAdapter, BottleneckSettings, add_bottleneck_adapters
from ..methods.placing import adapters_named
from .peft import PREFIX, Format, Keys, reported_against, settings_of

FORMAT = "minipeft bottleneck adapters (Houlsby/Pfeiffer); peft cannot read this file"
BOTTLENECK_KEYS = Keys(read=("placement", "bottleneck_size", "non_linearity"), not_math=("format",))


def write_bottleneck(model, settings: BottleneckSettings, name):
    config = {"peft_type": "BOTTLENECK", "format": FORMAT, "placement": settings.placement,
              "bottleneck_size": settings.bottleneck_size, "non_linearity": settings.non_linearity}
    return config, {f"{PREFIX}{slot}.{tensor_name}": module.get_parameter(tensor_name)
                    for slot, module in adapters_named(model, name, BottleneckAdapter).items()
                    for tensor_name in module.trainable_names}


def read_bottleneck(model, config, source, name):
    placement = require(config, "placement", str, source)
    size = require(config, "bottleneck_size", int, source, 1, model.config.hidden_size)
    non_linearity = require(config, "non_linearity", str, source)
    reported_against(source, add_bottleneck_adapters, model, size, placement, non_linearity, name)
    return write_bottleneck(model, settings_of(model, name, BottleneckSettings), name)[1]


BOTTLENECK = Format("BOTTLENECK", BottleneckSettings, BOTTLENECK_KEYS, write_bottleneck, read_bottleneck)
