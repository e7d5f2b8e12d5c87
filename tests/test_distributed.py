"""Both scripts under torchrun (CPU, gloo): N processes equal one process with the same global batch.

2 processes x --accum k against 1 process x --accum 2k: the same micro-batches, the same dropout masks
(each drawn from seed, step and the micro-batch's index), the same token weighting, so the same adapter
to float rounding (the gradients are summed in another order).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from minipeft.train.loop import accumulate_gradients
from minipeft.train.run_state import read_checkpoint
from tests.helpers import FAST, ROOT, losses, write_hf_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, *args, processes=1, popen=False, timeout=900):
    """`script` as a user runs it: plain python for one process, torchrun for more."""
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                          f"--master_port={free_port()}", "--max_restarts=0"]
    command = [sys.executable, *launcher, str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread a process, on both sides
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, default_weights):
    """A random two-layer Llama that reads the default model's tokenizer (its vocabulary size)."""
    path = tmp_path_factory.mktemp("tiny")
    write_hf_checkpoint(path, vocab_size=49152)
    shutil.copy(default_weights / "tokenizer.json", path)
    return path


@pytest.mark.parametrize("weights", ["tiny", "default"])
def test_two_processes_equal_one_with_the_same_global_batch(weights, tiny_weights, default_weights, code_data,
                                                            tmp_path):
    """LoRA with dropout 0.05 and checkpointing (train_code.py's, with --dropout): 2 x accum 1 against 1 x accum 2.
    One micro-batch a rank: the all-reduce adds the two gradients as the single process does, so the runs
    agree to the bit. (With accum k > 1 the order of the sums differs: test_gradients_... below.)"""
    path = tiny_weights if weights == "tiny" else default_weights
    common = [*FAST, "--weights", str(path), "--data", str(code_data), "--max-steps", "3", "--new-tokens", "2",
              "--dropout", "0.05"]
    one = run("train_code.py", *common, "--accum", "2", "--out", str(tmp_path / "one"))
    two = run("train_code.py", *common, "--accum", "1", "--out", str(tmp_path / "two"), processes=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    diff = max_diff(adapter(tmp_path / "one"), adapter(tmp_path / "two"))
    print(f"{weights}: max abs diff of the adapters, 1 x accum 2 against 2 x accum 1: {diff:.2e}")
    assert diff <= 1e-5
    one_report, two_report = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert one_report["tokens_seen"] == two_report["tokens_seen"]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert one_report["heldout_loss_after"] == pytest.approx(two_report["heldout_loss_after"], abs=1e-5)
    assert two.stdout.count("held-out loss before") == 1  # rank 0 alone prints
    # and the two ranks really split the step: half of it alone is another run
    half = run("train_code.py", *common, "--accum", "1", "--out", str(tmp_path / "half"))
    assert max_diff(adapter(tmp_path / "one"), adapter(tmp_path / "half")) > 1e-4


def shared_step(rank, world_size, weights, init_file, micro_batches, out):
    """One rank of test_gradients_...: its share of the micro-batches through DDP, then its gradients saved."""
    import torch.distributed as dist

    from minipeft.train.distributed import DataParallelLoss, World

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = lora_model(weights)
    world = World(rank, world_size, rank)
    mine = range(rank, len(micro_batches), world_size)
    parallel = DataParallelLoss(model, world)
    step_loss, _ = accumulate_gradients(model, [micro_batches[i] for i in mine], contextlib.nullcontext, parallel,
                                        seeds=list(mine))
    torch.save({"loss": step_loss, **gradients(model)}, f"{out}/rank{rank}.pt")
    parallel.close()


def lora_model(weights):
    import minipeft

    torch.manual_seed(0)
    model = minipeft.load_model(weights, quantize="nf4")
    minipeft.add_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.1)
    minipeft.enable_checkpointing(model)
    with torch.no_grad():  # B = 0 would leave A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_of_a_step_shared_by_two_processes_equal_one_process(tiny_weights, tmp_path):
    """2 ranks x accum 2 (no sync on the first micro-batch) against 1 x accum 4, packed rows of different
    lengths, dropout and checkpointing on: the same token-weighted gradients, to float rounding."""
    import torch.multiprocessing as mp

    from minipeft.train.batches import pack_rows

    generator = torch.Generator().manual_seed(0)
    lengths = [[12, 30], [7], [20, 5, 9], [40]]  # labelled tokens differ per micro-batch: weighting matters
    micro_batches = [pack_rows([[torch.randint(3, 49152, (n,), generator=generator).tolist() for n in row]],
                               torch.device("cpu")) for row in lengths]
    model = lora_model(tiny_weights)
    loss, _ = accumulate_gradients(model, micro_batches, contextlib.nullcontext, seeds=list(range(4)))
    alone = gradients(model)
    mp.spawn(shared_step, args=(2, tiny_weights, tmp_path / "init", micro_batches, tmp_path), nprocs=2)
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared.pop("loss") == pytest.approx(loss, rel=1e-6)
        worst = max((shared[n] - g).abs().max().item() / g.abs().max().item() for n, g in alone.items())
        print(f"rank {rank}: worst relative gradient difference {worst:.1e}")
        assert worst < 1e-5


def test_resume_under_torchrun_equals_the_straight_run_and_may_change_the_process_count(tiny_weights, code_data,
                                                                                        tmp_path):
    common = [*FAST, "--weights", str(tiny_weights), "--data", str(code_data), "--max-steps", "6", "--save-every", "2",
              "--new-tokens", "2"]
    straight = run("train_code.py", *common, "--accum", "2", "--out", str(tmp_path / "straight"), processes=2)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "interrupted"
    process = run("train_code.py", *common, "--accum", "2", "--out", str(out), processes=2, popen=True)
    while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 2:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # torchrun hands it to every process: each finishes the step
    stdout, stderr = process.communicate(timeout=300)
    assert "checkpoint saved" in stdout, stderr[-3000:]
    stopped_at = len(losses(out))
    assert 2 <= stopped_at < 6

    refused = run("train_code.py", *common, "--accum", "1", "--out", str(out), "--resume", processes=2)
    assert refused.returncode != 0
    assert refused.stderr.count("error: --resume: the micro-batches per step, processes x --accum (4 in the "
                                "checkpoint, 2 here)") == 1, refused.stderr[-3000:]

    resumed = run("train_code.py", *common, "--accum", "4", "--out", str(out), "--resume")  # 1 x 4 = 2 x 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {stopped_at}" in resumed.stdout
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), abs=1e-5)
    assert max_diff(adapter(out), adapter(tmp_path / "straight")) <= 1e-5


def test_a_killed_rank_ends_the_job_with_a_message_and_the_checkpoint_intact(tiny_weights, code_data, tmp_path):
    out = tmp_path / "run"
    process = run("train_code.py", *FAST, "--weights", str(tiny_weights), "--data", str(code_data), "--max-steps",
                  "500", "--save-every", "1", "--out", str(out), processes=2, popen=True)
    while not (out / "checkpoint.safetensors").is_file() or len(losses(out)) < 2:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    rank1 = next(pid for pid in child_pids(process.pid) if environment(pid).get("RANK") == "1")
    os.kill(rank1, signal.SIGKILL)
    started = time.time()
    stdout, stderr = process.communicate(timeout=120)
    print(f"the job ended {time.time() - started:.1f} s after rank 1 was killed")
    assert process.returncode != 0
    assert "error: rank 0: a step shared with the other processes failed" in stderr, stderr[-3000:]
    assert f"The last checkpoint in {out} is intact: rerun with --resume" in stderr
    state, tensors = read_checkpoint(out / "checkpoint.safetensors")  # complete, and loadable
    assert state["step"] >= 1 and any(k.startswith("trainable/") for k in tensors)


def test_bad_arguments_are_reported_once(tiny_weights, tmp_path):
    """Every process finds the same mistake before any process group starts; rank 0 alone says it."""
    result = run("train_code.py", "--weights", str(tiny_weights), "--max-steps", "0", "--out", str(tmp_path),
                 processes=2, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: --max-steps: expected a value > 0, got 0") == 1, result.stderr[-3000:]
    # torchrun ends rank 1 as soon as rank 0 fails: run a rank 1 by hand to see that it stays silent
    rank1 = subprocess.Popen([sys.executable, str(ROOT / "train_code.py"), "--max-steps", "0", "--out", str(tmp_path)],
                             env={**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
                             stderr=subprocess.PIPE, text=True)
    time.sleep(10)
    rank1.terminate()
    assert rank1.communicate(timeout=60)[1] == ""


def test_train_fox_under_torchrun_equals_one_process(default_weights, tmp_path):
    common = ["--method", "lora", "--max-steps", "3", "--new-tokens", "2"]
    one = run("train_fox.py", *common, "--out", str(tmp_path / "one"))
    two = run("train_fox.py", *common, "--out", str(tmp_path / "two"), processes=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    diff = max_diff(adapter(tmp_path / "one"), adapter(tmp_path / "two"))
    print(f"fox: max abs diff of the adapters, 1 against 2 processes: {diff:.2e}")
    assert diff <= 1e-5
    assert two.stdout.count("base unchanged") == 1


def child_pids(pid):
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in open(f"/proc/{pid}/task/{task}/children").read().split():
            children += [int(child), *child_pids(int(child))]
    return children


def environment(pid) -> dict:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
