"""peft's adapter files, for every method peft has: the config keys minipeft honours or refuses, and the names
of the tensors. The method files know nothing of this; they record what they were asked for (a small settings
dataclass) and hold the modules whose tensors are written here.

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors    base_model.model.<layer name>.lora_A.weight (r, in), ...

Every key of a config is read (it changes the math, so it is honoured), is one that changes nothing once the
adapter is trained, or is refused unless it has the value that changes nothing: never silently ignored. A key
peft adds later is accepted only while it is unset. The keys every peft config has are listed once (COMMON);
each method's entry below is a small table of its own keys and two functions, write and read.
"""

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import BadInput, refuse_unhonoured, require, require_mapping
from ..methods.bitfit import BitFitSettings, LinearWithLearnedBias, NormWithLearnedGain, add_bitfit
from ..methods.dora import DoRALayer, add_dora
from ..methods.ia3 import IA3Layer, IA3Settings, add_ia3
from ..methods.ln_tuning import LNTuningSettings, add_ln_tuning
from ..methods.loha import LoHaLayer, LoHaSettings, add_loha
from ..methods.lokr import LoKrLayer, LoKrSettings, add_lokr
from ..methods.lora import LoRALayer, LoRASettings, add_lora
from ..methods.prefix_tuning import LearnedPast, PrefixTuningSettings, add_prefix_tuning
from ..methods.p_tuning import ENCODERS, PTuningSettings
from ..methods.prompt_tuning import (PromptsInFront, PromptTuningSettings, WordEmbeddingsWithLearnedPrompts,
                                     add_prompt_tuning)
from ..methods.vera import VeRALayer, VeRASettings, add_vera
from ..methods.placing import adapters_named, linear_names, pattern_value, target_matches

PREFIX = "base_model.model."  # in front of every layer name in peft's tensor names
COMMON = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
          "inference_mode")  # in every peft config; none changes the math of a trained adapter


@dataclass(frozen=True)
class Keys:
    """One method's config keys: read (honoured), not_math (no effect once trained, beside COMMON), and
    only_default {key: the one value minipeft accepts}."""
    read: tuple
    not_math: tuple = ()
    only_default: dict = field(default_factory=dict)

    def check(self, config: dict, source):
        refuse_unhonoured(config, self.read, COMMON + self.not_math, self.only_default, source)


@dataclass(frozen=True)
class Format:
    """How one method's adapter is written and read. write(model, settings, name) -> (config, tensors);
    read(model, config, source, name) adds the method to the model as the config says and returns
    {tensor name in the file: the parameter to fill}."""
    peft_type: str
    settings: type  # the method's settings dataclass: what its add_... function was asked for
    keys: Keys
    write: Callable
    read: Callable


def settings_of(model, name: str, kind: type):
    return model.adapter_settings[name][kind]


def reported_against(source, add, *args, what="{e}"):
    """add(*args), a BadInput from it reported against the file: `what` formats its message."""
    try:
        return add(*args)
    except (BadInput, re.error) as e:
        raise BadInput(f"{source}: " + what.replace("{e}", str(e))) from None


# ---- LoRA (and DoRA: use_dora) --------------------------------------------------------------------------

LORA_KEYS = Keys(
    read=("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
          "use_dora", "init_lora_weights"),
    not_math=("loftq_config", "eva_config", "corda_config", "astra_config", "lora_ga_config", "runtime_config",
              "megatron_core", "qalora_group_size"),
    only_default={"bias": "none", "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
                  "ensure_weight_tying": False, "exclude_modules": None, "modules_to_save": None,
                  "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
                  "target_parameters": None, "trainable_token_indices": None, "megatron_config": None,
                  "velora_config": None, "alora_invocation_tokens": None, "monteclora_config": None,
                  "use_bdlora": None, "arrow_config": None, "kasa_config": None})


# peft's initialisations that leave the base as it was: B A starts at zero, or A and B start elsewhere but
# nothing is subtracted from W. The others (pissa, olora, corda, astra, loftq, lora_ga) move part of W into A and B
# and train against W - B0 A0 (or a re-quantised W): their file is right only on that changed base, so it is
# refused; peft converts it to a plain LoRA file (save_pretrained's path_initial_model_for_weight_conversion).
INITS_KEEPING_THE_BASE = (True, False, "gaussian", "eva", "orthogonal", "nora", "mica")


def lora_patterns(settings, layers: dict) -> tuple[dict, dict]:
    """rank_pattern and alpha_pattern for the file (LoRA's, LoHa's): the first add_X's, and each layer's own r and
    alpha by its full name where those patterns do not give it (a later add_X's)."""
    ranks, alphas = dict(settings.rank_pattern), dict(settings.alpha_pattern)
    for slot, layer in layers.items():
        if pattern_value(ranks, slot, settings.r) != layer.r:
            ranks = {slot: layer.r, **ranks}
        if pattern_value(alphas, slot, settings.alpha) != layer.alpha:
            alphas = {slot: layer.alpha, **alphas}
    return ranks, alphas


def write_lora(model, settings: LoRASettings, name):
    layers = adapters_named(model, name, LoRALayer)
    rank_pattern, alpha_pattern = lora_patterns(settings, layers)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.alpha,
              "target_modules": settings.targets, "lora_dropout": settings.dropout, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "use_rslora": settings.use_rslora, "use_dora": settings.use_dora}
    tensors = {}
    for slot, layer in layers.items():
        tensors[f"{PREFIX}{slot}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PREFIX}{slot}.lora_B.weight"] = layer.lora_B.weight
        if isinstance(layer, DoRALayer):
            tensors[f"{PREFIX}{slot}.lora_magnitude_vector"] = layer.lora_magnitude_vector.weight
    return config, tensors


def read_lora(model, config, source, name):
    r, alpha, ranks, alphas = ranks_and_alphas(model, config, source, "lora_alpha")
    dropout = require(config, "lora_dropout", (int, float), source, 0, 0.999, default=0.0)
    use_rslora = require(config, "use_rslora", bool, source, default=False)
    use_dora = require(config, "use_dora", bool, source, default=False)
    init = config.get("init_lora_weights", True)
    if init not in INITS_KEEPING_THE_BASE or init in (0, 1) and not isinstance(init, bool):
        raise BadInput(f"{source}: key 'init_lora_weights' is {init!r}: this adapter is right only on the base its "
                       "initialisation changed; save it with peft's path_initial_model_for_weight_conversion to "
                       "get a plain LoRA file")
    targets = target_modules(config, source)
    reported_against(source, add_dora if use_dora else add_lora, model, targets, r, alpha, dropout, ranks, alphas,
                     use_rslora, name,
                     what=f"target_modules {targets!r} are not all modules of this model (" + "{e})")
    return write_lora(model, settings_of(model, name, LoRASettings), name)[1]


def target_modules(config, source):
    """A config's target_modules: a regex or a list of module names."""
    targets = require(config, "target_modules", (list, str), source)
    named_by_list = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (named_by_list or isinstance(targets, str)):
        raise BadInput(f"{source}: target_modules should be a regex or a list of module names, got {targets!r}")
    return targets


def ranks_and_alphas(model, config, source, alpha_key):
    """r, alpha (config[alpha_key]), rank_pattern and alpha_pattern of a low-rank method's config."""
    shape = model.config
    largest = max(shape.hidden_size, shape.intermediate_size, shape.vocab_size)
    return (require(config, "r", int, source, 1, largest), require(config, alpha_key, (int, float), source, -1e9, 1e9),
            require_mapping(config, "rank_pattern", int, source, largest),
            require_mapping(config, "alpha_pattern", (int, float), source, 1e9))


# ---- LoHa -------------------------------------------------------------------------------------------------

LOHA_KEYS = Keys(read=("r", "alpha", "target_modules", "rank_pattern", "alpha_pattern"),
                 not_math=("init_weights", "use_effective_conv2d"),  # the latter: convolutions only
                 only_default={"rank_dropout": 0.0, "module_dropout": 0.0, "exclude_modules": None,
                               "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None})


def write_loha(model, settings: LoHaSettings, name):
    layers = adapters_named(model, name, LoHaLayer)
    rank_pattern, alpha_pattern = lora_patterns(settings, layers)
    config = {"peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": settings.r, "alpha": settings.alpha,
              "target_modules": settings.targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True,
              "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None}
    return config, {f"{PREFIX}{slot}.{tensor}": getattr(layer, tensor)
                    for slot, layer in layers.items() for tensor in LoHaLayer.trainable_names}


def read_loha(model, config, source, name):
    r, alpha, ranks, alphas = ranks_and_alphas(model, config, source, "alpha")
    targets = target_modules(config, source)
    reported_against(source, add_loha, model, targets, r, alpha, ranks, alphas, name,
                     what=f"target_modules {targets!r} are not all modules of this model (" + "{e})")
    return write_loha(model, settings_of(model, name, LoHaSettings), name)[1]


# ---- prompt tuning ----------------------------------------------------------------------------------------

PROMPT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # minipeft's -> prompt_tuning_init
PROMPT_TUNING_KEYS = Keys(
    read=("num_virtual_tokens", "token_dim", "num_transformer_submodules", "prompt_tuning_init",
          "prompt_tuning_init_text"),
    not_math=("num_attention_heads", "num_layers", "tokenizer_name_or_path", "tokenizer_kwargs"),
    only_default={"modules_to_save": None})


def write_prompt_tuning(model, settings: PromptTuningSettings, name):
    shape = model.config
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": settings.num_prompts,
              "token_dim": shape.hidden_size, "num_transformer_submodules": 1,
              "num_attention_heads": shape.num_attention_heads, "num_layers": shape.num_hidden_layers,
              "prompt_tuning_init": PROMPT_INITS[settings.init], "prompt_tuning_init_text": settings.init_text}
    wrapper, = adapters_named(model, name, WordEmbeddingsWithLearnedPrompts).values()
    return config, {"prompt_embeddings": wrapper.learned_prompts}


def read_prompt_tuning(model, config, source, name):
    hidden = model.config.hidden_size
    require(config, "token_dim", int, source, hidden, hidden, default=hidden)  # the vectors live in the embedding
    require(config, "num_transformer_submodules", int, source, 1, 1, default=1)  # decoder-only: one stack
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
    init = {peft: ours for ours, peft in PROMPT_INITS.items()}.get(config.get("prompt_tuning_init"), "random")
    wrapper = add_prompt_tuning(model, num_prompts, init="random", name=name)  # the file's values replace these
    model.adapter_settings[name][PromptTuningSettings] = PromptTuningSettings(num_prompts, init,
                                                                              config.get("prompt_tuning_init_text"))
    return {"prompt_embeddings": wrapper.learned_prompts}


# ---- P-tuning ---------------------------------------------------------------------------------------------

P_TUNING_KEYS = Keys(
    read=("num_virtual_tokens", "token_dim", "num_transformer_submodules", "encoder_reparameterization_type",
          "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"),
    not_math=("num_attention_heads", "num_layers"),
    only_default={"modules_to_save": None})


def write_p_tuning(model, settings: PTuningSettings, name):
    """The prompts as the encoder makes them now (or as a file gave them), as peft saves them."""
    shape = model.config
    config = {"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": settings.num_prompts,
              "token_dim": shape.hidden_size, "num_transformer_submodules": 1,
              "num_attention_heads": shape.num_attention_heads, "num_layers": shape.num_hidden_layers,
              "encoder_reparameterization_type": settings.encoder, "encoder_hidden_size": settings.hidden,
              "encoder_num_layers": settings.lstm_layers, "encoder_dropout": settings.lstm_dropout}
    wrapper, = adapters_named(model, name, PromptsInFront).values()
    return config, {"prompt_embeddings": wrapper.prompts()}


def read_p_tuning(model, config, source, name):
    """A file holds the encoder's output, so it loads as prompts to use directly, as peft loads it."""
    hidden = model.config.hidden_size
    require(config, "token_dim", int, source, hidden, hidden, default=hidden)
    require(config, "num_transformer_submodules", int, source, 1, 1, default=1)
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, model.config.max_position_embeddings)
    encoder = require(config, "encoder_reparameterization_type", str, source, default="MLP")
    if encoder not in ENCODERS:
        raise BadInput(f"{source}: key 'encoder_reparameterization_type' is {encoder!r}; expected one of {ENCODERS}")
    settings = PTuningSettings(num_prompts, encoder,
                               require(config, "encoder_hidden_size", int, source, 1, 1 << 20, default=hidden),
                               require(config, "encoder_num_layers", int, source, 1, 64, default=2),
                               require(config, "encoder_dropout", (int, float), source, 0, 0.999, default=0.0))
    wrapper = add_prompt_tuning(model, num_prompts, init="random", name=name)  # the file's values replace these
    del model.adapter_settings[name][PromptTuningSettings]  # an adapter of P-tuning, its encoder left behind
    model.adapter_settings[name][PTuningSettings] = settings
    return {"prompt_embeddings": wrapper.learned_prompts}


# ---- prefix tuning ----------------------------------------------------------------------------------------

PREFIX_TUNING_KEYS = Keys(
    read=("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules",
          "prefix_projection", "encoder_hidden_size"),
    not_math=("init_weights",),
    only_default={"modules_to_save": None})


def write_prefix_tuning(model, settings: PrefixTuningSettings, name):
    """For Llama's grouped-query heads, token_dim is kv_dim and num_attention_heads the KV heads."""
    shape = model.config
    kv_dim = shape.num_key_value_heads * shape.head_dim
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": settings.num_prompts,
              "token_dim": kv_dim, "num_transformer_submodules": 1, "num_attention_heads": shape.num_key_value_heads,
              "num_layers": shape.num_hidden_layers, "prefix_projection": bool(settings.projection_hidden),
              "encoder_hidden_size": settings.projection_hidden or kv_dim,
              "init_weights": "zero" if settings.init == "zero" else None}
    past, = adapters_named(model, name, LearnedPast).values()
    return config, {"prompt_embeddings": past.prompt_embeddings()}


def read_prefix_tuning(model, config, source, name):
    """A file trained with a projection holds the MLP's output, so it loads as keys and values to use (and to
    train further) directly, as peft does when it loads one for inference."""
    shape = model.config
    kv_heads, kv_dim = shape.num_key_value_heads, shape.num_key_value_heads * shape.head_dim
    require(config, "token_dim", int, source, kv_dim, kv_dim)  # num_key_value_heads x head_dim of this base
    require(config, "num_attention_heads", int, source, kv_heads, kv_heads)
    require(config, "num_layers", int, source, shape.num_hidden_layers, shape.num_hidden_layers)
    require(config, "num_transformer_submodules", int, source, 1, 1, default=1)
    require(config, "prefix_projection", bool, source, default=False)
    require(config, "encoder_hidden_size", int, source, 1, 1 << 20, default=kv_dim)
    num_prompts = require(config, "num_virtual_tokens", int, source, 1, shape.max_position_embeddings)
    past = add_prefix_tuning(model, num_prompts, init="zero", name=name)  # the file's values replace these
    return {"prompt_embeddings": past.embedding.weight}


# ---- LoKr -------------------------------------------------------------------------------------------------

LOKR_KEYS = Keys(read=("r", "alpha", "target_modules", "rank_pattern", "alpha_pattern", "decompose_both",
                       "decompose_factor"),
                 not_math=("init_weights", "use_effective_conv2d", "rank_dropout_scale"),  # conv only; dropout's
                 only_default={"rank_dropout": 0.0, "module_dropout": 0.0, "exclude_modules": None,
                               "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None})


def write_lokr(model, settings: LoKrSettings, name):
    layers = adapters_named(model, name, LoKrLayer)
    rank_pattern, alpha_pattern = lora_patterns(settings, layers)
    config = {"peft_type": "LOKR", "task_type": "CAUSAL_LM", "r": settings.r, "alpha": settings.alpha,
              "target_modules": settings.targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "decompose_both": settings.decompose_both, "decompose_factor": settings.decompose_factor,
              "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False, "use_effective_conv2d": False,
              "init_weights": True, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
              "modules_to_save": None}
    return config, {f"{PREFIX}{slot}.{tensor}": getattr(layer, tensor)
                    for slot, layer in layers.items() for tensor in layer.trainable_names}


def read_lokr(model, config, source, name):
    r, alpha, ranks, alphas = ranks_and_alphas(model, config, source, "alpha")
    decompose_both = require(config, "decompose_both", bool, source, default=False)
    factor = require(config, "decompose_factor", int, source, -1, 1 << 20, default=-1)
    targets = target_modules(config, source)
    reported_against(source, add_lokr, model, targets, r, alpha, decompose_both, factor, ranks, alphas, True, name,
                     what=f"target_modules {targets!r} are not all modules of this model (" + "{e})")
    return write_lokr(model, settings_of(model, name, LoKrSettings), name)[1]


# ---- VeRA -------------------------------------------------------------------------------------------------

VERA_KEYS = Keys(read=("r", "target_modules", "projection_prng_key", "save_projection", "d_initial"),
                 not_math=("init_weights",),
                 only_default={"vera_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                               "layers_to_transform": None, "layers_pattern": None})


def write_vera(model, settings: VeRASettings, name):
    layers = adapters_named(model, name, VeRALayer)
    config = {"peft_type": "VERA", "task_type": "CAUSAL_LM", "r": settings.r, "target_modules": settings.targets,
              "projection_prng_key": settings.key, "save_projection": settings.save_projection,
              "d_initial": settings.d_initial, "vera_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
              "modules_to_save": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
    tensors = {f"{PREFIX}{slot}.{tensor}": getattr(layer, tensor)
               for slot, layer in layers.items() for tensor in VeRALayer.trainable_names}
    if settings.save_projection:  # else the file holds only the seed of the pair
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = next(iter(layers.values())).shared_pair
    return config, tensors


def read_vera(model, config, source, name):
    shape = model.config
    r = require(config, "r", int, source, 1, max(shape.hidden_size, shape.intermediate_size))
    key = require(config, "projection_prng_key", int, source, 0, (1 << 63) - 1, default=0)
    save_projection = require(config, "save_projection", bool, source, default=True)
    d_initial = require(config, "d_initial", (int, float), source, -1e9, 1e9, default=0.1)
    targets = target_modules(config, source)
    reported_against(source, add_vera, model, targets, r, key, d_initial, save_projection, name,
                     what=f"target_modules {targets!r} do not fit this model (" + "{e})")
    return write_vera(model, settings_of(model, name, VeRASettings), name)[1]


# ---- IA3 --------------------------------------------------------------------------------------------------

IA3_KEYS = Keys(read=("target_modules", "feedforward_modules"), not_math=("init_ia3_weights",),
                only_default={"fan_in_fan_out": False, "modules_to_save": None, "exclude_modules": None})


def write_ia3(model, settings: IA3Settings, name):
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": settings.targets,
              "feedforward_modules": settings.feedforward, "fan_in_fan_out": False, "modules_to_save": None,
              "init_ia3_weights": True}
    layers = adapters_named(model, name, IA3Layer)
    return config, {f"{PREFIX}{slot}.ia3_l": layer.ia3_l for slot, layer in layers.items()}


def read_ia3(model, config, source, name):
    targets = require(config, "target_modules", (list, str), source)
    feedforward = require(config, "feedforward_modules", (list, str), source, default=[])
    if isinstance(feedforward, str):  # a regex in peft: the wrapped names it matches
        feedforward = [n for n in linear_names(model) if target_matches(n, feedforward)]
    reported_against(source, add_ia3, model, targets, feedforward, name,
                     what=f"target_modules {targets!r} do not fit this model (" + "{e})")
    return write_ia3(model, settings_of(model, name, IA3Settings), name)[1]


# ---- BitFit (peft's BEFT) ---------------------------------------------------------------------------------

BITFIT_KEYS = Keys(read=("target_modules", "modules_to_save"), not_math=("init_weights",))


def write_bitfit(model, settings: BitFitSettings, name):
    """The norms' trained gains are written as peft's modules_to_save writes a module: <norm name>.weight."""
    config = {"peft_type": "BEFT", "task_type": "CAUSAL_LM", "target_modules": settings.targets,
              "modules_to_save": settings.norms, "init_weights": True}
    biases = {f"{PREFIX}{slot}.beft_bias": m.beft_bias
              for slot, m in adapters_named(model, name, LinearWithLearnedBias).items()}
    gains = {f"{PREFIX}{slot}.weight": m.weight for slot, m in adapters_named(model, name, NormWithLearnedGain).items()}
    return config, {**biases, **gains}


def read_bitfit(model, config, source, name):
    targets = require(config, "target_modules", (list, str), source)
    norms = require(config, "modules_to_save", list, source) if config.get("modules_to_save") is not None else None
    reported_against(source, add_bitfit, model, targets, norms, name)
    return write_bitfit(model, settings_of(model, name, BitFitSettings), name)[1]


# ---- LN tuning --------------------------------------------------------------------------------------------

LN_TUNING_KEYS = Keys(read=("target_modules",), only_default={"exclude_modules": None, "modules_to_save": None})


def write_ln_tuning(model, settings: LNTuningSettings, name):
    config = {"peft_type": "LN_TUNING", "task_type": "CAUSAL_LM", "target_modules": settings.targets,
              "exclude_modules": None, "modules_to_save": None}
    gains = adapters_named(model, name, NormWithLearnedGain)
    return config, {f"{PREFIX}{slot}.ln_tuning_layers.weight": m.weight for slot, m in gains.items()}


def read_ln_tuning(model, config, source, name):
    targets = target_modules(config, source)
    reported_against(source, add_ln_tuning, model, targets, name)
    return write_ln_tuning(model, settings_of(model, name, LNTuningSettings), name)[1]


FORMATS = [Format("LORA", LoRASettings, LORA_KEYS, write_lora, read_lora),
           Format("PROMPT_TUNING", PromptTuningSettings, PROMPT_TUNING_KEYS, write_prompt_tuning, read_prompt_tuning),
           Format("P_TUNING", PTuningSettings, P_TUNING_KEYS, write_p_tuning, read_p_tuning),
           Format("PREFIX_TUNING", PrefixTuningSettings, PREFIX_TUNING_KEYS, write_prefix_tuning, read_prefix_tuning),
           Format("LOHA", LoHaSettings, LOHA_KEYS, write_loha, read_loha),
           Format("LOKR", LoKrSettings, LOKR_KEYS, write_lokr, read_lokr),
           Format("VERA", VeRASettings, VERA_KEYS, write_vera, read_vera),
           Format("IA3", IA3Settings, IA3_KEYS, write_ia3, read_ia3),
           Format("BEFT", BitFitSettings, BITFIT_KEYS, write_bitfit, read_bitfit),
           Format("LN_TUNING", LNTuningSettings, LN_TUNING_KEYS, write_ln_tuning, read_ln_tuning)]
