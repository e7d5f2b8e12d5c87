"""The PEFT methods by name, each with settings and learning rates that work: what `--method` picks in
train_fox.py, train_code.py and bench/methods.py. Only the method changes; the training loop stays one loop.

A flag that the chosen method does not read is refused by name, so nothing the user asked for is ignored.
"""

from dataclasses import dataclass
from typing import Callable

from ..errors import BadInput
from ..methods.bitfit import BLOCK_LINEARS, add_bitfit
from ..methods.bottleneck import add_bottleneck_adapters
from ..methods.ia3 import add_ia3
from ..methods.lopt import add_lopt
from ..methods.lora import add_lora
from ..methods.prefix_tuning import add_prefix_tuning
from ..methods.prompt_tuning import add_prompt_tuning
from .reporting import check_positive

LORA_TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class Choice:
    add: Callable  # (model, settings, seed) -> None
    settings: dict  # the flags this method reads, with their defaults
    lr: dict  # task -> AdamW learning rate, found by bench/methods.py


def lora(model, s, seed, use_dora=False):
    add_lora(model, s["targets"].split(","), r=s["r"], alpha=s["alpha"], dropout=s["dropout"], use_dora=use_dora)


LORA_SETTINGS = {"targets": LORA_TARGETS, "r": 8, "alpha": 16, "dropout": 0.05}
CHOICES = {
    "lora": Choice(lora, LORA_SETTINGS, {"code": 1e-3, "fox": 1e-2}),
    "dora": Choice(lambda m, s, seed: lora(m, s, seed, use_dora=True), LORA_SETTINGS, {"code": 1e-3, "fox": 1e-2}),
    "ia3": Choice(lambda m, s, seed: add_ia3(m, s["targets"].split(",")), {"targets": "k_proj,v_proj,down_proj"},
                  {"code": 1e-2, "fox": 5e-2}),
    "bitfit": Choice(lambda m, s, seed: add_bitfit(m, s["targets"].split(","), norms=True),
                     {"targets": ",".join(BLOCK_LINEARS)}, {"code": 3e-3, "fox": 1e-2}),
    "bottleneck": Choice(lambda m, s, seed: add_bottleneck_adapters(m, s["bottleneck_size"], s["placement"]),
                         {"bottleneck_size": 64, "placement": "houlsby"}, {"code": 1e-3, "fox": 1e-2}),
    "prefix": Choice(lambda m, s, seed: add_prefix_tuning(m, s["num_prompts"], s["projection_hidden"], seed=seed),
                     {"num_prompts": 16, "projection_hidden": None}, {"code": 1e-2, "fox": 1e-2}),
    "prompt": Choice(lambda m, s, seed: add_prompt_tuning(m, s["num_prompts"], init="vocab", seed=seed),
                     {"num_prompts": 16}, {"code": 1e-2, "fox": 1e-2}),
    "lopt": Choice(lambda m, s, seed: add_lopt(m, s["num_prompts"], s["r"], seed=seed),
                   {"num_prompts": 16, "r": 4}, {"code": 1e-2, "fox": 1e-2}),
}
FLAG_HELP = {"r": "rank: of LoRA's B A, or of LoPT's prompt matrix U V",
             "alpha": "LoRA alpha; the update is scaled by alpha / r",
             "dropout": "LoRA dropout", "targets": "comma-separated linears to wrap",
             "num_prompts": "learned positions in front of the text (or of every layer's keys and values)",
             "projection_hidden": "prefix tuning's reparameterisation MLP width (None: no MLP)",
             "bottleneck_size": "bottleneck adapters' width m",
             "placement": "houlsby (after attention and MLP) or pfeiffer (after the MLP)"}
FLAGS = {"r": int, "alpha": float, "dropout": float, "targets": str, "num_prompts": int, "projection_hidden": int,
         "bottleneck_size": int, "placement": str}


def add_method_arguments(parser, default_method):
    """--method and every method's own flags; --help shows which methods read each, and their defaults."""
    parser.add_argument("--method", default=default_method, choices=list(CHOICES),
                        help="the PEFT method (default: %(default)s)")
    for flag, kind in FLAGS.items():
        by_default = {}  # default value -> the methods that have it
        for name, choice in CHOICES.items():
            if flag in choice.settings:
                by_default.setdefault(choice.settings[flag], []).append(name)
        defaults = "; ".join(f"{', '.join(names)}: {value}" for value, names in by_default.items())
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                            help=f"{FLAG_HELP[flag]} (default for {defaults})")


def choose_method(model, args, task: str):
    """Put args.method on the model; fill args with the settings and learning rate it used. Returns them."""
    choice = CHOICES[args.method]
    unread = [flag for flag in FLAGS if getattr(args, flag) is not None and flag not in choice.settings]
    if unread:
        raise BadInput(f"--{unread[0].replace('_', '-')}: --method {args.method} does not use it; it reads "
                       f"{', '.join('--' + f.replace('_', '-') for f in choice.settings)}")
    settings = {flag: getattr(args, flag) if getattr(args, flag) is not None else default
                for flag, default in choice.settings.items()}
    positive = ("r", "alpha", "num_prompts", "projection_hidden", "bottleneck_size")
    check_positive(**{flag: value for flag, value in settings.items() if flag in positive and value is not None})
    for flag, value in settings.items():
        setattr(args, flag, value)
    if args.lr is None:
        args.lr = choice.lr[task]
    choice.add(model, settings, args.seed)
    return settings
