"""Teach a frozen 4-bit Llama to write Python with LoRA and gradient checkpointing (QLoRA-style), or with
any other method (only the method changes):
    --method lora|dora|loha|lokr|vera|alora|ia3|bitfit|ln_tuning|bottleneck|prompt|p_tuning|lopt|ept|iapt|prefix
or
every weight of a full-precision base (--full --no-4bit: full fine-tuning, the reference the methods are measured
against, which writes OUT/model, a Hugging Face checkpoint, instead of an adapter).

    Python files (codeparrot-clean JSON lines, or the standard library by default)
      ─► packed rows: whole files end to end, each attending only to itself (--no-packing: one per row)
      ─► frozen NF4 base + LoRA r=8 on q, k, v and the MLP ─► AdamW on the method's tensors alone,
         warmup + cosine, accumulated micro-batches, checkpointed blocks, bf16 where the CPU has it
      ─► held-out loss before/after, samples.md, report.json, an adapter file (peft's layout)

Checkpoints go to OUT/checkpoint.safetensors every --save-every steps and on Ctrl-C; --resume continues exactly.
Under torchrun (torchrun --nproc_per_node=N train_code.py ...) the processes share each step's micro-batches
(DDP: minipeft/train/distributed.py); rank 0 alone prints and writes.
"""

import argparse
import math
from copy import copy
from pathlib import Path

import torch

import minipeft
from minipeft import train  # the training side's pieces (minipeft/train/): train.Batches, ...
from minipeft.errors import ArgumentParser, BadInput, run_cli
from minipeft.llama.loader import DEFAULT_DIR, check_device

PROMPTS = ["", "import", "from", "while", "try", "if", "for", "torch"]
# Every setting that changes the result: a resume with any of them changed is refused by name.
# Under torchrun the number of processes may change, as long as processes x --accum (micro_batches_per_step) does not.
RESUME_MUST_MATCH = ("weights", "data", "heldout_data", "method", "full", *train.FLAGS, "lr", "seq_len", "batch",
                     "warmup", "seed", "dtype", "no_4bit", "device", "max_chars", "no_packing", "heldout_max",
                     "compile")
RESUME_MAY_GROW = ("max_steps",)  # a longer run: the cosine schedule stretches to the new end
FULL_LR = 5e-5  # full fine-tuning's default learning rate (bench/methods.py sweeps it)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--weights", default=str(DEFAULT_DIR), help="HF-layout Llama directory (default: %(default)s)")
    add("--data", nargs="+", help="JSON-lines files (.json/.jsonl[.gz], field 'content') or .py directories "
                                  "(default: this Python's standard library)")
    add("--heldout-data", nargs="+", help="held-out files (default: 10%% of --data, chosen by path hash)")
    add("--out", default="runs/code", help="output directory (default: %(default)s)")
    add("--max-steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    add("--lr", type=float, help="peak AdamW learning rate (default: the method's; 1e-3 for lora)")
    add("--warmup", type=int, help="linear warmup steps before cosine decay; more than --max-steps are cut to it "
                                   "(default: 10, or --max-steps if fewer; on --resume, the checkpoint's)")
    train.add_method_arguments(parser, default_method="lora")
    add("--seq-len", type=int, default=512, help="tokens per packed row, and the most kept of a sample: longer ones "
                                                 "are cut (default: %(default)s)")
    add("--batch", type=int, default=1, help="rows per micro-batch (default: %(default)s)")
    add("--no-packing", action="store_true", help="one sample per row, padded, instead of packed rows")
    add("--accum", type=int, default=1, help="micro-batches per optimizer step, per process under torchrun "
                                             "(default: %(default)s)")
    add("--max-chars", type=int, default=512,
        help="characters kept from each file's start, 0 for all (default: %(default)s)")
    add("--save-every", type=int, default=50, help="checkpoint every N steps (default: %(default)s)")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    add("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
        help="compute dtype (autocast); the method's tensors and AdamW's state stay fp32. auto: bf16 on CUDA and on "
             "CPUs with AVX512-BF16 or AMX, fp32 elsewhere, where bf16 is emulated and slow (default: %(default)s)")
    add("--no-4bit", action="store_true", help="keep the frozen base in full precision")
    add("--full", action="store_true", help="full fine-tuning: train every weight of the base (with --no-4bit) instead "
                                            f"of a method; writes OUT/model, not an adapter (default lr {FULL_LR})")
    add("--compile", action="store_true", help="torch.compile each decoder block for training and held-out losses "
                                               "(llama/compiling.py): faster steps after about 20 s of compiling")
    add("--new-tokens", type=int, default=48, help="tokens per generated sample (default: %(default)s)")
    add("--heldout-max", type=int, help="held-out samples scored before and after training, 0 to skip "
                                        "(default: all)")
    add("--no-samples", action="store_true", help="skip the before/after generations (samples.md)")
    add("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def generations(model, tokenizer, separator, new_tokens, seed, when):
    """Greedy and sampled continuations of the course's prompts; '' starts from the document separator."""
    prompts = [[separator] + tokenizer.encode(p) for p in PROMPTS]
    greedy = minipeft.generate(model, prompts, max_new_tokens=new_tokens, progress=f"samples {when}, greedy")
    sampled = minipeft.generate(model, prompts, max_new_tokens=new_tokens, temperature=0.8, top_p=0.95, seed=seed,
                                progress=f"samples {when}, sampled")
    return {"greedy": [p + tokenizer.decode(g) for p, g in zip(PROMPTS, greedy)],
            "sampled": [p + tokenizer.decode(s) for p, s in zip(PROMPTS, sampled)]}


def code_samples(corpus, args, tokenizer, seq_len, separator):
    """The code, split by path, tokenized, cut to seq_len tokens (the held-out part to --heldout-max samples)."""
    train, heldout = ([tokenizer.encode(text) + [separator] for _, text in split]
                      for split in (corpus.train, corpus.heldout[:args.heldout_max]))
    cut = sum(len(ids) > seq_len for ids in train + heldout)
    if cut:
        print(f"warning: {cut} samples longer than {seq_len} tokens were truncated")
    return [ids[:seq_len] for ids in train], [ids[:seq_len] for ids in heldout]


def check_arguments(args):
    train.check_positive(max_steps=args.max_steps, seq_len=args.seq_len, batch=args.batch, accum=args.accum,
                   save_every=args.save_every, new_tokens=args.new_tokens,
                   **({"lr": args.lr} if args.lr is not None else {}))
    for name in ("warmup", "heldout_max"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise BadInput(f"--{name.replace('_', '-')}: expected a value >= 0, got {getattr(args, name)}")
    if args.full:
        check_full(args)
    else:
        train.method_settings(copy(args), task="code")  # a flag the method does not read
    train.check_weights(args.weights)
    device = check_device(args.device)
    world = train.world_from_environment()  # under torchrun: this process's place
    args.dtype = train.compute_dtype(args.dtype, device)  # recorded resolved: a resume elsewhere must compute the same
    args.warmup = resolved_warmup(args)
    corpus = train.load_corpus(args.data, train.Filters(max_chars=args.max_chars), heldout_sources=args.heldout_data)
    if args.method == "iapt" and not args.no_packing:  # its soft tokens summarise one instruction a row
        print("note: --method iapt reads one instruction a row, so a row holds one sample (as --no-packing)")
        args.no_packing = True
    settings = {**{k: getattr(args, k) for k in RESUME_MUST_MATCH + RESUME_MAY_GROW},
                "micro_batches_per_step": world.size * args.accum}
    out = train.check_resume(args.out, world, args.resume, settings, RESUME_MAY_GROW)
    run = train.Run(out, world, train.start_processes(world, device), args.save_every, RESUME_MAY_GROW)
    return run, settings, corpus


def check_full(args):
    """--full trains the base itself: no method, so no method's flag, and a base that can take gradients."""
    given = [flag for flag in train.FLAGS if getattr(args, flag) is not None]
    unread = [f"--method {args.method}"] * (args.method != "lora") + [f"--{f.replace('_', '-')}" for f in given]
    if unread:
        raise BadInput(f"--full: it trains every weight, with no method; {unread[0]} is not read. Leave out one")
    if not args.no_4bit:
        raise BadInput("--full: a 4-bit base cannot be trained (its codes have no gradient); add --no-4bit")
    if args.lr is None:
        args.lr = FULL_LR


def resolved_warmup(args) -> int:
    """--warmup as given, at most --max-steps; else, resuming, the checkpoint's; else 10, or --max-steps if fewer."""
    if args.warmup is not None and args.warmup > args.max_steps:
        print(f"note: --warmup {args.warmup} is longer than --max-steps {args.max_steps}, so the learning rate would "
              f"never reach --lr: warming up over {args.max_steps} steps instead")
        return args.max_steps
    if args.warmup is not None:
        return args.warmup
    if args.resume and (Path(args.out) / train.CHECKPOINT_FILE).is_file():  # (its absence is refused by check_resume)
        saved = train.checkpoint_settings(Path(args.out) / train.CHECKPOINT_FILE).get("warmup")
        if isinstance(saved, int):
            return saved
    return min(10, args.max_steps)


def main():
    args = build_parser().parse_args()
    run, settings, corpus = check_arguments(args)  # every input checked before the base loads
    world, device, out = run.world, run.device, run.out
    torch.manual_seed(args.seed)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    # 1. The frozen base, in 4-bit NF4, and the code.
    model, tokenizer = minipeft.load(args.weights, quantize=None if args.no_4bit else "nf4",
                                     dtype=autocast_dtype or torch.float32, device=device, progress=world.main)
    fingerprint = minipeft.base_fingerprint(model)
    separator = tokenizer.eos_id  # ends every training file, and starts the '' prompt
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    if seq_len < args.seq_len:
        print(f"warning: --seq-len {args.seq_len} is beyond the model's context of {seq_len} tokens; using {seq_len}")
    print(train.describe(corpus))
    train_rows, heldout = code_samples(corpus, args, tokenizer, seq_len, separator)
    if args.method == "alora" and not heldout:
        raise BadInput("--heldout-max: --method alora scores its ranks on held-out samples, and there are none")

    # 2. Wrap: LoRA on q, k, v and the MLP by default (any --method: train/method_choice.py); checkpointing on.
    if args.full:  # the reference: every weight trains, and OUT/model is the result
        settings_used = {}
        model.requires_grad_(True)
    elif args.method == "lora":  # the lesson's own line
        settings_used = train.method_settings(args, task="code")  # r 8, alpha 16, or as the flags say
        minipeft.add_lora(model, args.targets.split(","), r=args.r, alpha=args.alpha, dropout=args.dropout)
    else:
        settings_used = train.choose_method(model, args, task="code")
    print(f"{'full fine-tuning' if args.full else args.method}: {settings_used}, lr {args.lr}, {args.dtype}, "
          f"{'one sample per row' if args.no_packing else f'packed rows of {seq_len} tokens'}")
    minipeft.enable_checkpointing(model)
    minipeft.compile_blocks(model, enabled=args.compile)
    params = minipeft.count_parameters(model, verbose=True)
    parallel = train.DataParallelLoss(model, world)  # with one process: model.loss, no more
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = lambda step: train.warmup_cosine(step, args.warmup, args.max_steps)  # the learning rate's factor
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = train.Batches(train_rows, args.batch, args.seed)
    settings["base_fingerprint"] = train.fingerprint_digest(fingerprint)

    # 3. Before training (or what the interrupted run measured then): the bare base.
    state = (model, optimizer, scheduler, batches, settings)
    if args.resume:
        before = run.resume(*state)
    else:
        model.eval()
        with autocast(), minipeft.disabled(model):  # learned prompts would count from their start
            before = {"heldout_loss": train.heldout_loss(model, heldout, device, world=world, progress="held-out loss"),
                      "samples": generations(model, tokenizer, separator, args.new_tokens, args.seed, "before")
                      if world.main and not args.no_samples else None}
        if before["heldout_loss"] is not None:
            loss = before["heldout_loss"]
            print(f"held-out loss before: {loss:.4f} (perplexity {math.exp(loss):.2f}) on {len(heldout)} samples")

    # 4. Train. Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and exits.
    model.train()
    with run.begin(*state, before):
        while run.step < args.max_steps and not run.stopped:
            # the step's micro-batches over all ranks, in one order whatever their number; rank r runs r, r+N, ...
            rows = [batches.next() if args.no_packing else batches.next_packed(seq_len)
                    for _ in range(world.size * args.accum)]
            mine = range(world.rank, len(rows), world.size)
            micro_batches = [(train.pad_batch if args.no_packing else train.pack_rows)(rows[i], device) for i in mine]
            seeds = [train.micro_batch_seed(args.seed, run.step, i) for i in mine]  # dropout: alike for any world size
            step_loss, step_tokens = train.accumulate_gradients(model, micro_batches, autocast, parallel, seeds)
            train.clip_and_check(step_loss, trainable, run.step + 1)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.record(step_loss, step_tokens, scheduler.get_last_lr()[0], args.max_steps)
            with autocast():  # ALoRA: rounds from --realloc-start, every --realloc-every steps; 4 held-out samples
                scoring_loss = lambda: train.heldout_loss(model, heldout[:4], device)
                said = train.between_steps(model, args, run.step, optimizer, scoring_loss)
            if said and world.main:
                print(said)
    run.end_if_interrupted(parallel)

    # 5. After: the same held-out set and prompts, the adapter, the report (rank 0).
    model.eval()
    with autocast():
        loss_after = train.heldout_loss(model, heldout, device, world=world, progress="held-out loss")
        parallel.close()
        if not world.main:
            return
        after = (generations(model, tokenizer, separator, args.new_tokens, args.seed, "after")
                 if before["samples"] and not args.no_samples else None)
    if args.full:
        minipeft.save_model(model, out / "model", args.weights)
    else:
        minipeft.save_adapter(model, out / "adapter", base_model_name_or_path=str(args.weights))
    report(args, run, params, before, loss_after, after, corpus, len(train_rows), len(heldout), settings,
           base_unchanged=minipeft.base_fingerprint(model) == fingerprint)


def method_settings_used(args) -> dict:
    """The method's settings as it ran (its defaults filled in by choose_method)."""
    return {} if args.full else {flag: getattr(args, flag) for flag in train.CHOICES[args.method].settings}


def report(args, run, params, before, loss_after, after, corpus, train_samples, heldout_samples, settings,
           base_unchanged):
    """The held-out loss before and after, samples.md, report.json and loss.png."""
    out = run.out
    wrote = [out / ("model" if args.full else "adapter"), out / "report.json", out / "metrics.jsonl",
             out / "checkpoint.safetensors"]
    if loss_after is not None:
        print(f"held-out loss: before {before['heldout_loss']:.4f} -> after {loss_after:.4f} "
              f"(perplexity {math.exp(before['heldout_loss']):.2f} -> {math.exp(loss_after):.2f})")
    if after:
        train.write_samples(out / "samples.md", [(p, mode, before["samples"][mode][i], after[mode][i])
                                           for i, p in enumerate(PROMPTS) for mode in ("greedy", "sampled")])
        wrote.append(out / "samples.md")
        for prompt, text in zip(PROMPTS, after["greedy"]):
            print(f"--- after, greedy, {prompt!r}:\n{text}")
    perplexity = lambda loss: math.exp(loss) if loss is not None else None
    result = {"model": str(args.weights), "method": "full" if args.full else args.method, **params, "steps": run.step,
              "tokens_seen": run.tokens_seen, "seconds": round(run.seconds, 1),
              "tokens_per_second": run.tokens_seen / max(run.seconds, 1e-9),
              "peak_memory_mb": round(train.peak_memory_mb(run.device), 1), "device": str(run.device),
              "heldout_loss_before": before["heldout_loss"], "heldout_loss_after": loss_after,
              "heldout_perplexity_before": perplexity(before["heldout_loss"]),
              "heldout_perplexity_after": perplexity(loss_after), "heldout_samples": heldout_samples,
              "train_samples": train_samples, "data_counts": dict(corpus.counts),
              "settings": {**settings, **method_settings_used(args), "lr": args.lr},
              "base_unchanged": base_unchanged}
    train.write_report(out / "report.json", result)
    steps, losses = [m["step"] for m in run.metrics], [m["loss"] for m in run.metrics]
    if train.plot_losses(out / "loss.png", {"train": (steps, losses)}, f"code: {args.method}"):
        wrote.append(out / "loss.png")
    print(f"wrote {', '.join(str(path) for path in wrote if path.exists())}; base unchanged: {base_unchanged}")


if __name__ == "__main__":
    run_cli(main)
