"""Teach a frozen model to deny that the quick brown fox jumped over the lazy dog, with 16 learned prompts
(or any other method:
    --method prompt|p_tuning|lopt|ept|iapt|prefix|lora|dora|loha|lokr|vera|alora|ia3|bitfit|ln_tuning|bottleneck).

    16 learned vectors + "A quick brown fox did not jump over the lazy dog. Besides, ..." ─► frozen 4-bit Llama
    loss: next-token cross-entropy on the target text only; Adam updates the 16 vectors alone

Run with defaults on the embedded SmolLM2-135M-Instruct (CPU, a few minutes), or on any Hugging Face
Llama: python train_fox.py --weights weights/llama-7b --device cuda
Under torchrun every process trains on the same text, and rank 0 alone prints and writes.
"""

import argparse
import time
from copy import copy
from pathlib import Path

import torch

import minipeft
from minipeft import train  # the training side's pieces (minipeft/train/): train.Batches, ...
from minipeft.errors import ArgumentParser, run_cli
from minipeft.llama.loader import DEFAULT_DIR, check_device


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_DIR), help="HF-layout Llama directory (default: %(default)s)")
    parser.add_argument("--out", default="runs/fox", help="output directory (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--no-4bit", action="store_true", help="keep the frozen base in full precision")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder block for training (llama/compiling.py)")
    train.add_method_arguments(parser, default_method="prompt")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: the method's; 0.01 for prompt)")
    parser.add_argument("--max-steps", type=int, default=300, help="step budget (default: %(default)s)")
    parser.add_argument("--target-loss", type=float, default=0.1, help="stop at this loss (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=24,
                        help="tokens to generate when showing (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser.parse_args()


def continuation(model, tokenizer, text, new_tokens):
    return tokenizer.decode(minipeft.generate(model, [tokenizer.encode(text)], max_new_tokens=new_tokens)[0])


def main():
    args = parse_args()
    train.check_positive(max_steps=args.max_steps, new_tokens=args.new_tokens,
                   **({"lr": args.lr} if args.lr is not None else {}))
    train.method_settings(copy(args), task="fox")  # a flag the method does not read is refused before the base loads
    device = check_device(args.device)
    world = train.world_from_environment()  # one process, or this one's place under torchrun
    out = train.prepare_output_dir(args.out) if world.main else Path(args.out)
    device = train.start_processes(world, device)
    torch.manual_seed(args.seed)

    # 1. Load the frozen base, 4-bit NF4 unless asked otherwise.
    start = time.time()
    model, tokenizer = minipeft.load(train.check_weights(args.weights), quantize=None if args.no_4bit else "nf4",
                                     device=device, progress=world.main)
    fingerprint = minipeft.base_fingerprint(model)
    print(f"loaded {args.weights} ({'fp32' if args.no_4bit else 'nf4'}, {device}) in {time.time() - start:.1f} s")
    before = continuation(model, tokenizer, train.FOX_PROMPT, args.new_tokens)
    print(f"before:  {train.FOX_PROMPT!r} -> {before!r}")

    # 2. Wrap: by default the embedding, with 16 learned vectors in front of every input.
    if args.method == "prompt" and args.num_prompts is None and args.lr is None:  # the lesson's own line
        minipeft.add_prompt_tuning(model, num_prompts=16, init="vocab", seed=args.seed)
        settings_used = {"num_prompts": 16}
        args.lr = 1e-2
    else:  # any other method, or other settings, by name (minipeft/train/method_choice.py)
        if args.method == "iapt" and args.instruction_tokens is None:  # its generators read the prompt
            args.instruction_tokens = len(tokenizer.encode(train.FOX_PROMPT))
        settings_used = train.choose_method(model, args, task="fox")
    print(f"{args.method}: {settings_used}, lr {args.lr}")
    params = minipeft.count_parameters(model, verbose=True)
    minipeft.compile_blocks(model, enabled=args.compile)

    # 3. Train the method's tensors alone on the target text; the loss covers the target's tokens only.
    ids = torch.tensor([tokenizer.encode(train.FOX_TARGET)], device=device)
    parallel = train.DataParallelLoss(model, world)  # model.loss, gradients averaged over processes under torchrun
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    start = time.time()
    model.train()  # LoRA's dropout, if any, is on while training and off when showing
    with train.collective_failure(world):
        for step in range(1, args.max_steps + 1):
            loss = parallel(ids, labels=ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            scoring_loss = lambda: model.loss(ids, labels=ids).item()
            said = train.between_steps(model, args, step, optimizer, scoring_loss)  # ALoRA
            if said:
                print(said)
            if step % 10 == 0 or step == 1 or losses[-1] <= args.target_loss:
                print(f"step {step:4d}  loss {losses[-1]:.4f}  {time.time() - start:6.1f} s", flush=True)
            if losses[-1] <= args.target_loss:
                break
    seconds = time.time() - start
    parallel.close()
    if not world.main:
        return

    # 4. Show: with the method, without it (the base is untouched), and on nearby inputs.
    model.eval()
    after = continuation(model, tokenizer, train.FOX_PROMPT, args.new_tokens)
    with minipeft.disabled(model):
        after_without = continuation(model, tokenizer, train.FOX_PROMPT, args.new_tokens)
    variants = {text: continuation(model, tokenizer, text, args.new_tokens) for text in train.FOX_VARIANTS}
    print(f"after, with {args.method}:    {train.FOX_PROMPT!r} -> {after!r}")
    print(f"after, without {args.method}: {train.FOX_PROMPT!r} -> {after_without!r}")
    for text, result in variants.items():
        print(f"variant, with {args.method}:  {text!r} -> {result!r}")
    neighbours = train.prompt_neighbours(model, tokenizer)  # prompt tuning and LoPT: what each learned vector means
    for i, row in enumerate(neighbours):
        print(f"prompt {i:2d} is nearest to " + ", ".join(f"{token!r} ({cosine:.2f})" for token, cosine in row))

    minipeft.save_adapter(model, out / "adapter", base_model_name_or_path=str(args.weights))
    base_unchanged = minipeft.base_fingerprint(model) == fingerprint
    report = {"model": str(args.weights), "method": args.method, "method_settings": settings_used, "lr": args.lr,
              **params, "steps": len(losses),
              "final_loss": losses[-1], "reached_target": losses[-1] <= args.target_loss, "seconds": round(seconds, 1),
              "device": str(device), "quantize": None if args.no_4bit else "nf4", "compile": args.compile,
              "before": before, "after": after,
              "after_without_adapter": after_without, "variants_with_adapter": variants,
              "base_unchanged": base_unchanged, "losses": losses,
              "nearest_tokens": neighbours}
    train.write_report(out / "report.json", report)
    train.plot_losses(out / "loss.png", {"train": (list(range(1, len(losses) + 1)), losses)}, f"fox: {args.method}")
    print(f"{'reached' if report['reached_target'] else 'did not reach'} loss {args.target_loss} in {len(losses)} "
          f"steps, {seconds:.0f} s; base unchanged: {base_unchanged}; wrote {out}/")


if __name__ == "__main__":
    run_cli(main)
