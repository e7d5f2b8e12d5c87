"""What a reader reads to follow each method: every function that add_X, a forward through the model and merge
run, in minipeft's files outside llama/ (the decoder is the same under every method), found by tracing one run
of each on a tiny random Llama, and the lines of those functions.

    .venv/bin/python bench/reading_paths.py            # this checkout
    PYTHONPATH=OTHER .venv/bin/python bench/reading_paths.py   # another checkout's minipeft

Prints a Markdown table: for add_X, the forward and merge, the files and the lines of the functions run there;
then all three together. A function counts whole (its docstring too), once, however often it runs.
"""

import sys
from pathlib import Path

import torch

import minipeft


def methods() -> dict:
    dora = getattr(minipeft, "add_dora", None) or (lambda m, *a, **k: minipeft.add_lora(m, *a, use_dora=True, **k))
    return {
        "prompt tuning": lambda m: minipeft.add_prompt_tuning(m, num_prompts=4),
        "P-tuning": lambda m: minipeft.add_p_tuning(m, num_prompts=4, hidden=8),
        "LoPT": lambda m: minipeft.add_lopt(m, num_prompts=4, r=2),
        "EPT": lambda m: minipeft.add_ept(m, num_prompts=4, max_length=8, r=2, spaces=2),
        "IAPT": lambda m: minipeft.add_iapt(m, num_prompts=2, r=4, instruction_tokens=2),
        "prefix tuning": lambda m: minipeft.add_prefix_tuning(m, num_prompts=4),
        "LoRA": lambda m: minipeft.add_lora(m, ["q_proj", "v_proj"], r=4),
        "DoRA": lambda m: dora(m, ["q_proj", "v_proj"], r=4),
        "LoHa": lambda m: minipeft.add_loha(m, ["q_proj", "v_proj"], r=2),
        "LoKr": lambda m: minipeft.add_lokr(m, ["q_proj", "v_proj"], r=2),
        "VeRA": lambda m: minipeft.add_vera(m, ["q_proj", "v_proj"], r=4),
        "ALoRA": lambda m: minipeft.add_alora(m, ["q_proj", "v_proj"], r=2),
        "IA3": lambda m: minipeft.add_ia3(m),
        "BitFit": lambda m: minipeft.add_bitfit(m, norms=True),
        "LN tuning": lambda m: minipeft.add_ln_tuning(m),
        "bottleneck": lambda m: minipeft.add_bottleneck_adapters(m, 8),
    }


def tiny_model():
    config = minipeft.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                  attention_bias=True, mlp_bias=True)  # biases for BitFit to fold into
    torch.manual_seed(0)
    return minipeft.Llama(config).eval()


def traced(run) -> dict:
    """{code object: None} of every function in minipeft (llama/ left out) that run() calls, in order."""
    package = Path(minipeft.__file__).resolve().parent
    seen = {}

    def profile(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename).resolve()
            if package in path.parents and (package / "llama") not in path.parents:
                if not frame.f_code.co_name.startswith("<"):  # lambdas and comprehensions: inside a counted one
                    seen.setdefault(frame.f_code, None)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen


def lines_of(code) -> int:
    numbers = [line for _, _, line in code.co_lines() if line is not None]
    return max(numbers) - code.co_firstlineno + 1


def reading(codes) -> tuple[dict, int]:
    """{file: [functions]}, and their lines in all."""
    package = Path(minipeft.__file__).resolve().parent
    files = {}
    for code in codes:
        files.setdefault(str(Path(code.co_filename).resolve().relative_to(package)), []).append(code.co_qualname)
    return files, sum(lines_of(code) for code in codes)


def paths(name, add) -> dict:
    """{"add" | "forward" | "merge": (files, lines)} for one method on a fresh tiny model."""
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 6))
    found = {"add": traced(lambda: add(model))}
    with torch.no_grad():
        found["forward"] = traced(lambda: model(ids))
    if any(hasattr(m, "merge") for m in model.modules() if hasattr(m, "trainable_names")):
        found["merge"] = traced(lambda: minipeft.merge(model))
    return {step: reading(codes) for step, codes in found.items()} | {
        "all": reading({c: None for codes in found.values() for c in codes})}


def main():
    print(f"minipeft at {Path(minipeft.__file__).resolve().parent}")
    print("| method | add_X: files, lines | forward: files, lines | merge: files, lines | all: files, lines |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, add in methods().items():
        found = paths(name, add)
        cell = lambda step: f"{len(found[step][0])}, {found[step][1]}" if step in found else "-"
        print(f"| {name} | {cell('add')} | {cell('forward')} | {cell('merge')} | {cell('all')} |")


if __name__ == "__main__":
    main()
