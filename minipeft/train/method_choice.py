"""The PEFT methods by name, each with settings and learning rates that work: what `--method` picks in
train_fox.py, train_code.py and bench/methods.py. Only the method changes; the training loop stays one loop.

A flag that the chosen method does not read is refused by name, so nothing the user asked for is ignored.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BadInput
from ..llama.quant import decoded_weights
from ..methods.alora import add_alora, reallocate
from ..methods.bitfit import BLOCK_LINEARS, add_bitfit
from ..methods.bottleneck import add_bottleneck_adapters
from ..methods.dora import add_dora
from ..methods.ept import add_ept
from ..methods.ia3 import add_ia3
from ..methods.iapt import add_iapt
from ..methods.ln_tuning import NORMS, add_ln_tuning
from ..methods.loha import add_loha
from ..methods.lokr import add_lokr
from ..methods.lopt import add_lopt
from ..methods.lora import add_lora
from ..methods.p_tuning import add_p_tuning
from ..methods.prefix_tuning import add_prefix_tuning
from ..methods.vera import add_vera
from ..methods.prompt_tuning import add_prompt_tuning
from .reporting import check_positive

LORA_TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class Choice:
    add: Callable  # (model, settings, seed, adapter name) -> None
    settings: dict  # the flags this method reads, with their defaults
    lr: dict  # task -> AdamW learning rate, found by bench/methods.py


def lora(model, s, seed, name, add=add_lora):
    add(model, s["targets"].split(","), r=s["r"], alpha=s["alpha"], dropout=s["dropout"], name=name)


# dropout 0, as peft's LoraConfig: on CPU a dropout mask's random numbers took a quarter of `make code`'s step (0.6 of
# 2.5 s), and without them its held-out loss came out 2.1866 against 2.1877 (bench/RESULTS.md).
LORA_SETTINGS = {"targets": LORA_TARGETS, "r": 8, "alpha": 16, "dropout": 0.0}
CHOICES = {  # add(model, settings, seed, name): `name` is the adapter's (named_adapters.py)
    "lora": Choice(lora, LORA_SETTINGS, {"code": 1e-3, "fox": 1e-2}),
    "dora": Choice(lambda m, s, seed, name: lora(m, s, seed, name, add=add_dora), LORA_SETTINGS,
                   {"code": 1e-3, "fox": 1e-2}),
    "loha": Choice(lambda m, s, seed, name: add_loha(m, s["targets"].split(","), s["r"], s["alpha"], name=name),
                   {"targets": LORA_TARGETS, "r": 8, "alpha": 16}, {"code": 1e-3, "fox": 1e-2}),
    "lokr": Choice(lambda m, s, seed, name: add_lokr(m, s["targets"].split(","), s["r"], s["alpha"], name=name),
                   {"targets": LORA_TARGETS, "r": 8, "alpha": 16}, {"code": 1e-3, "fox": 1e-2}),
    "vera": Choice(lambda m, s, seed, name: add_vera(m, s["targets"].split(","), s["r"], name=name),
                   {"targets": "q_proj,v_proj", "r": 256}, {"code": 1e-2, "fox": 1e-2}),
    "ia3": Choice(lambda m, s, seed, name: add_ia3(m, s["targets"].split(","), name=name),
                  {"targets": "k_proj,v_proj,down_proj"}, {"code": 1e-2, "fox": 5e-2}),
    "bitfit": Choice(lambda m, s, seed, name: add_bitfit(m, s["targets"].split(","), norms=True, name=name),
                     {"targets": ",".join(BLOCK_LINEARS)}, {"code": 3e-3, "fox": 1e-2}),
    "ln_tuning": Choice(lambda m, s, seed, name: add_ln_tuning(m, s["targets"].split(","), name=name),
                        {"targets": ",".join(NORMS)}, {"code": 3e-3, "fox": 1e-2}),
    "bottleneck": Choice(lambda m, s, seed, name: add_bottleneck_adapters(m, s["bottleneck_size"], s["placement"],
                                                                          name=name),
                         {"bottleneck_size": 64, "placement": "houlsby"}, {"code": 1e-3, "fox": 1e-2}),
    "prefix": Choice(lambda m, s, seed, name: add_prefix_tuning(m, s["num_prompts"], s["projection_hidden"], seed=seed,
                                                                name=name),
                     {"num_prompts": 16, "projection_hidden": None}, {"code": 1e-2, "fox": 1e-2}),
    "prompt": Choice(lambda m, s, seed, name: add_prompt_tuning(m, s["num_prompts"], init="vocab", seed=seed,
                                                                name=name),
                     {"num_prompts": 16}, {"code": 1e-2, "fox": 1e-2}),
    "p_tuning": Choice(lambda m, s, seed, name: add_p_tuning(m, s["num_prompts"], s["encoder"], s["encoder_hidden"],
                                                             seed=seed, name=name),
                       {"num_prompts": 16, "encoder": "MLP", "encoder_hidden": 128}, {"code": 1e-3, "fox": 1e-3}),
    "lopt": Choice(lambda m, s, seed, name: add_lopt(m, s["num_prompts"], s["r"], seed=seed, name=name),
                   {"num_prompts": 16, "r": 4}, {"code": 1e-2, "fox": 1e-2}),
    "ept": Choice(lambda m, s, seed, name: add_ept(m, s["num_prompts"], s["max_length"], s["r"], s["spaces"],
                                                   seed=seed, name=name),
                  {"num_prompts": 8, "max_length": 256, "r": 4, "spaces": 3}, {"code": 1e-2, "fox": 1e-2}),
    "iapt": Choice(lambda m, s, seed, name: add_iapt(m, s["num_prompts"], s["r"], s["instruction_tokens"], seed=seed,
                                                     name=name),
                   {"num_prompts": 4, "r": 16, "instruction_tokens": 16}, {"code": 1e-2, "fox": 1e-2}),
    "alora": Choice(lambda m, s, seed, name: add_alora(m, s["targets"].split(","), s["r"], s["alpha"], 0.0,
                                                       s["rounds"], s["capacity"], name=name),
                    {"targets": "q_proj,v_proj", "r": 4, "alpha": 8, "capacity": None, "realloc_start": 20,
                     "realloc_every": 10, "rounds": 4},
                    {"code": 1e-3, "fox": 5e-3}),
}
FLAG_HELP = {"r": "rank: of LoRA's B A (ALoRA's at the start), of LoHa's two factors, LoKr's low-rank ones, of VeRA's"
                  " shared pair, of LoPT's U V, of EPT's A B and projections, IAPT's generators' bottleneck",
             "alpha": "LoRA's (and LoHa's) alpha; the update is scaled by alpha / r",
             "dropout": "LoRA dropout", "targets": "comma-separated linears to wrap (LN tuning: norms)",
             "num_prompts": "learned positions in front of the text (or of every layer's keys and values)",
             "projection_hidden": "prefix tuning's reparameterisation MLP width (None: no MLP)",
             "encoder": "P-tuning's prompt encoder: MLP (three linears) or LSTM (a bidirectional LSTM, then an MLP)",
             "encoder_hidden": "P-tuning's prompt encoder width",
             "bottleneck_size": "bottleneck adapters' width m",
             "placement": "houlsby (after attention and MLP) or pfeiffer (after the MLP)",
             "max_length": "EPT: text positions its low-rank update A B covers (DePT's s); later ones get none",
             "spaces": "EPT: subspaces the gating network mixes",
             "capacity": "ALoRA's rank slots a layer, a cap on growth to save memory (None: no cap, r + every rank "
                         "the rounds can move)",
             "realloc_start": "ALoRA: steps trained before the first reallocation round",
             "realloc_every": "ALoRA: steps between rounds (each scores every open rank and moves the lowest of "
                              "each module type)",
             "rounds": "ALoRA: reallocation rounds, at most",
             "instruction_tokens": "IAPT: the first tokens of each row, which its generators read and the loss skips "
                                   "(train_fox.py: the prompt's)"}
FLAGS = {"r": int, "alpha": float, "dropout": float, "targets": str, "num_prompts": int, "projection_hidden": int,
         "encoder": str, "encoder_hidden": int,
         "bottleneck_size": int, "placement": str, "capacity": int, "realloc_start": int,
         "realloc_every": int, "rounds": int,
         "max_length": int, "spaces": int, "instruction_tokens": int}


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


def choose_method(model, args, task: str, name="default"):
    """Put args.method on the model, as adapter `name`; fill args with the settings and learning rate it used.
    Returns them."""
    settings = method_settings(args, task)
    CHOICES[args.method].add(model, settings, args.seed, name)
    return settings


def method_settings(args, task: str) -> dict:
    """args.method's settings, its defaults filled in (and in args, with its learning rate for `task`): flags it does
    not read are refused, before any weights load."""
    choice = CHOICES[args.method]
    unread = [flag for flag in FLAGS if getattr(args, flag) is not None and flag not in choice.settings]
    if unread:
        raise BadInput(f"--{unread[0].replace('_', '-')}: --method {args.method} does not use it; it reads "
                       f"{', '.join('--' + f.replace('_', '-') for f in choice.settings)}")
    settings = {flag: getattr(args, flag) if getattr(args, flag) is not None else default
                for flag, default in choice.settings.items()}
    positive = ("r", "alpha", "num_prompts", "projection_hidden", "encoder_hidden", "bottleneck_size", "capacity",
                "realloc_every", "max_length", "spaces", "instruction_tokens")
    check_positive(**{flag: value for flag, value in settings.items() if flag in positive and value is not None})
    if settings.get("rounds", 0) < 0 or settings.get("realloc_start", 0) < 0:
        raise BadInput(f"--rounds and --realloc-start: expected 0 or more, got {settings['rounds']} and "
                       f"{settings['realloc_start']}")
    for flag, value in settings.items():
        setattr(args, flag, value)
    if args.lr is None:
        args.lr = choice.lr[task]
    return settings


def between_steps(model, args, step: int, optimizer, scoring_loss) -> str | None:
    """What the method does after optimizer step `step`, if anything: ALoRA, after --realloc-start steps, moves
    ranks every --realloc-every steps, --rounds times at most, scored by `scoring_loss()` (the loss on a few
    fixed held-out samples), not after the last step. Returns a line saying what it did, or None."""
    if args.method != "alora" or step >= args.max_steps:
        return None
    if not is_round(step, args.realloc_start, args.realloc_every, args.rounds):
        return None
    with decoded_weights(model, budget_mb=1024, read_codes=False):  # a round runs 1 + 2 x (open ranks) forwards
        did = reallocate(model, scoring_loss, seed=args.seed + step)
    restart_moments(optimizer, model, [(n, i) for n, i, _ in did["closed"]] + did["opened"])
    ranks = sorted(did["ranks"].values())
    lowest = min((score for _, _, score in did["closed"]), default=float("nan"))
    return (f"ALoRA after step {step}: closed {len(did['closed'])} ranks (lowest IS {lowest:.4f}), opened "
            f"{len(did['opened'])}; open ranks a layer now {ranks[0]} to {ranks[-1]}, {sum(ranks)} in all")


def is_round(step: int, start: int, every: int, rounds: int) -> bool:
    """ALoRA's schedule, as its paper gives it, in optimizer steps: train `start` steps first, then a round after
    every `every` steps, `rounds` of them at most (steps start, start + every, ..., start + (rounds - 1) every)."""
    return step >= start and (step - start) % every == 0 and (step - start) // every < rounds


def restart_moments(optimizer, model, slots):
    """AdamW's running moments of A's row i and B's column i start again from zero, for each (layer, i) that
    ALoRA closed or opened: a fresh rank learns from its own gradients alone."""
    for layer_name, i in slots:
        layer = model.get_submodule(layer_name)
        for parameter, index in ((layer.lora_A.weight, (i,)), (layer.lora_B.weight, (slice(None), i))):
            for moment in optimizer.state.get(parameter, {}).values():
                if torch.is_tensor(moment) and moment.shape == parameter.shape:
                    moment[index] = 0.0
