"""`minipeft` (or `python -m minipeft`): use what you trained, without writing Python.

    minipeft generate --adapter fox=runs/fox/adapter --adapter code=runs/code/adapter \\
                      --prompt "fox:A quick brown fox" --prompt "code:import" --prompt "-:Hello"
        every prompt answered by its own adapter (or none, "-"), all in one mixed batch on one frozen base,
        loaded as the adapters were trained on it (4-bit or not: their files say)
    minipeft merge --adapter runs/code/adapter --out merged/ [--dtype bf16]
        the adapter folded into the base it was trained on (4-bit: dequantized), written as a Hugging Face
        checkpoint any stack can serve
    minipeft count --config llama-7b --method lora --r 8
        the parameter report, on the meta device: no weights are read
    minipeft nearest --adapter runs/fox/adapter
        what each learned prompt vector means: its nearest vocabulary tokens, by cosine
    minipeft serve --adapter fox=runs/fox/adapter
        an OpenAI-compatible API (continuous batching, every adapter in one batch) and a page to compare and tune

Mistakes (an unknown adapter name, an adapter for another base, a method that cannot merge) end with one
line naming them, and exit code 2.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from . import formats
from .bases import (MERGED_KEY, adapter_digest, base_for, check_adapters, describe_base, load_base, merged_into,
                    parse_adapters)
from .errors import ArgumentParser, BadInput, run_cli
from .llama.config import LlamaConfig
from .llama.loader import DEFAULT_DIR
from .llama.generate import generate
from .llama.loader import build_model, load_model, read_named_tensor, write_checkpoint
from .llama.chat import chat_ids
from .llama.tokenizer import load_tokenizer
from .llama.quant import dequantize, is_4bit
from .methods.counting import count_parameters
from .methods.fingerprints import base_name
from .methods.freezing import adapter_parameters
from .methods.merging import merge
from .methods.named_adapters import set_adapter, wrappers
from .methods.placing import slot_names
from .serve import add_serve_command, command_serve
from .train.method_choice import add_method_arguments, choose_method
from .train.reporting import check_weights, prompt_neighbours

PRESETS = {"llama-7b": LlamaConfig()}  # the dataclass defaults are Llama-2-7B


def parse_prompt(line: str, names) -> tuple:
    """'NAME:text' -> (NAME, text); '-:text' -> (None, text), the bare base."""
    name, colon, text = line.partition(":")
    if not colon or (name != "-" and name not in names):
        raise BadInput(f"--prompt {line[:40]!r}: expected NAME:TEXT, NAME one of {sorted(names)} or '-' for the "
                       f"bare base")
    return (None if name == "-" else name), text.replace("\\n", "\n")


def prompt_lines(args) -> list[str]:
    lines = list(args.prompt or [])
    if args.prompts_file:
        try:
            source = sys.stdin if args.prompts_file == "-" else open(args.prompts_file, encoding="utf-8")
            lines += [line.rstrip("\n") for line in source if line.strip()]
        except OSError as e:
            raise BadInput(f"--prompts-file {args.prompts_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise BadInput(f"--prompts-file {args.prompts_file}: not UTF-8 text") from None
    if not lines:
        raise BadInput("generate: no prompts; give --prompt NAME:TEXT or --prompts-file FILE (- for stdin)")
    return lines


def command_generate(args):
    adapters = parse_adapters(args.adapter)  # the arguments first: a typo is reported before a long load
    check_sampling(args)
    rows = [parse_prompt(line, adapters) for line in prompt_lines(args)]
    check_adapters(args.weights, adapters)
    base = base_for(adapters, args.four_bit)
    model, tokenizer = load_base(args.weights, base, args.device)
    for name, path in adapters.items():
        formats.load_adapter(model, path, name=name)
    if adapters:
        set_adapter(model, [name for name, _ in rows])
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": text}]) if args.chat else tokenizer.encode(text)
               for _, text in rows]
    bf16 = base["dtype"] == "bfloat16"  # as it trained: under autocast
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
        answers = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    for (name, text), answer in zip(rows, answers):
        print(f"[{name or '-'}] {text}{' -> ' if args.chat else ''}{tokenizer.decode(answer)}")


def check_sampling(args):
    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens: expected a positive integer, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):
        raise BadInput(f"--temperature: expected a number >= 0 (0 for greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise BadInput(f"--top-p: expected a probability in (0, 1], got {args.top_p}")


def export_state(model) -> dict:
    """The merged base's tensors under their Hugging Face names (wrappers and adapter tensors left out)."""
    slots, adapter = slot_names(model), {id(p) for p in adapter_parameters(model).values()}
    wrapped_paths = {f"{n}.{m.wrapped}.": f"{slots[n]}." for n, m in wrappers(model) if getattr(m, "wrapped", None)}
    return {base_name(name, wrapped_paths): p for name, p in model.named_parameters() if id(p) not in adapter}


def dequantized_copy(model):
    """Every 4-bit linear replaced by a full-precision one with its dequantized weight (for export)."""
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = dequantize(module).float()
            if module.bias is not None:
                linear.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def command_merge(args):
    weights, out = Path(args.weights), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"--out {out}: exists and is not empty; choose a new directory")
    dry_run = check_adapters(weights, {"default": Path(args.adapter)})  # before the weights are read
    cannot = [type(m).__name__ for _, m in wrappers(dry_run) if not hasattr(m, "merge")]
    config_name = formats.read_adapter(args.adapter)[0]["peft_type"]
    if cannot:
        raise BadInput(f"--adapter {args.adapter}: a {config_name} adapter ({cannot[0]}) is not a change to a "
                       f"weight, so it cannot be merged; serve it unmerged (minipeft generate)")
    base = base_for({"the adapter": Path(args.adapter)}, args.four_bit)
    model = load_model(weights, quantize=base["quantize"], dtype=getattr(torch, base["dtype"]),
                       double_quant=base["double_quant"], progress=sys.stderr)
    formats.load_adapter(model, args.adapter)
    plain = dequantized_copy(model).float()  # the weights it trained on, exactly, computing in float32
    probe = torch.arange(32)[None] * 7919 % model.config.vocab_size  # any tokens: the same before and after
    with torch.no_grad():
        unmerged = model(probe)
    config = json.loads((weights / "config.json").read_text())
    for kind in {type(m) for _, m in wrappers(model)}:  # a method whose merge needs more of the base says so
        config = kind.prepare_export(plain, config)
    merge(model)
    with torch.no_grad():
        error = (model(probe) - unmerged).abs().max().item()
    config[MERGED_KEY] = [*merged_into(weights), {"peft_type": config_name, "sha256": adapter_digest(args.adapter)}]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    write_checkpoint(out, export_state(model), config, weights, dtype)
    print(f"merged {config_name} from {args.adapter} into {describe_base(base)} of {weights}"
          f"{' (dequantized)' if base['quantize'] else ''}: wrote {out} ({args.dtype}); max abs logits change from "
          f"merging {error:.2e}")


def command_nearest(args):
    """Each learned prompt vector's nearest vocabulary tokens: only config.json, the vocabulary embedding and the
    tokenizer are read (the rest of the model stays on the meta device, unread)."""
    weights = check_weights(args.weights)
    if args.k < 1:
        raise BadInput(f"--k: expected a positive integer, got {args.k}")
    model = build_model(LlamaConfig.from_json(weights / "config.json"))
    model.model.embed_tokens = nn.Embedding.from_pretrained(read_named_tensor(weights, "model.embed_tokens.weight"))
    tokenizer = load_tokenizer(weights)
    peft_type = formats.load_adapter(model, args.adapter)["peft_type"]
    neighbours = prompt_neighbours(model, tokenizer, args.k)
    if not neighbours:
        raise BadInput(f"--adapter {args.adapter}: a {peft_type} adapter learns no vectors in the token embedding "
                       f"space; nearest reads prompt tuning, LoPT and EPT adapters")
    print(f"nearest vocabulary tokens by cosine, for each of the {len(neighbours)} learned prompts of {args.adapter}:")
    for i, row in enumerate(neighbours):
        print(f"{i:3d}  " + "  ".join(f"{token!r} {cosine:.2f}" for token, cosine in row))


def command_count(args):
    config = PRESETS.get(args.config) or LlamaConfig.from_json(Path(args.config) / "config.json")
    model = build_model(config)
    args.lr, args.seed = 0.0, 0
    settings = choose_method(model, args, task="code")
    print(f"{args.method} {settings} on {args.config}:")
    count_parameters(model, verbose=True)


def build_parser():
    parser = ArgumentParser(prog="minipeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer prompts, each with its own adapter, in one batch")
    gen.add_argument("--weights", default=str(DEFAULT_DIR), help="HF-layout Llama directory (default: %(default)s)")
    gen.add_argument("--4bit", dest="four_bit", action=argparse.BooleanOptionalAction,
                     help="load the base in NF4, or in full precision (--no-4bit). Default: as the adapters were "
                          "trained (their files say); NF4 without adapters, as serve")
    gen.add_argument("--adapter", action="append", help="NAME=PATH of an adapter directory (repeatable)")
    gen.add_argument("--prompt", action="append", help="NAME:TEXT, '-:TEXT' for the bare base (repeatable)")
    gen.add_argument("--prompts-file", help="a file of NAME:TEXT lines, or - for stdin")
    gen.add_argument("--max-new-tokens", type=int, default=32,
                     help="how many tokens to add to each prompt, at most (default: %(default)s)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user turn in the model's chat template (tokenizer_config.json), "
                          "as transformers' apply_chat_template does, and stop at its end-of-turn token")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    gen.add_argument("--seed", type=int, help="makes sampling repeatable")
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    mer = commands.add_parser("merge", help="fold an adapter into the base; write a Hugging Face checkpoint")
    mer.add_argument("--weights", default=str(DEFAULT_DIR), help="the base (default: %(default)s)")
    mer.add_argument("--adapter", required=True, help="a LoRA, DoRA, IA3 or BitFit adapter directory")
    mer.add_argument("--out", required=True, help="a new directory for the merged checkpoint")
    mer.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="(default: %(default)s)")
    mer.add_argument("--4bit", dest="four_bit", action=argparse.BooleanOptionalAction,
                     help="merge into the dequantized NF4 base, or the full-precision one (--no-4bit). Default: "
                          "the base the adapter was trained on (its file says)")
    near = commands.add_parser("nearest", help="each learned prompt vector's nearest vocabulary tokens")
    near.add_argument("--weights", default=str(DEFAULT_DIR), help="the base (default: %(default)s)")
    near.add_argument("--adapter", required=True, help="a prompt tuning or LoPT adapter directory")
    near.add_argument("--k", type=int, default=5, help="tokens per prompt vector (default: %(default)s)")
    cnt = commands.add_parser("count", help="trainable and total numbers of a method, without loading weights")
    cnt.add_argument("--config", default="llama-7b", help="a directory with config.json, or llama-7b (default)")
    add_method_arguments(cnt, default_method="lora")
    add_serve_command(commands)
    return parser


def prompts_as_values(argv: list) -> list:
    """`--prompt "-:Hello"` as `--prompt=-:Hello`: argparse would take a value that starts with '-' for a flag."""
    joined = []
    for arg in argv:
        if joined and joined[-1] == "--prompt":
            joined[-1] = f"--prompt={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv=None):
    args = build_parser().parse_args(prompts_as_values(sys.argv[1:] if argv is None else list(argv)))
    commands = {"generate": command_generate, "merge": command_merge, "count": command_count,
                "nearest": command_nearest, "serve": command_serve}
    run_cli(lambda: commands[args.command](args))


if __name__ == "__main__":
    main()
