"""Packing changes the speed, not the model: a packed row's loss and gradients are the sums over its
documents run one by one, each alone in its own forward (fp32, 1e-5); and the packer itself."""

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft.train.batches import Batches, pack_rows
from minipeft.train.loop import scored_tokens
from tests.helpers import write_hf_checkpoint

ADD = {
    "lora": lambda m: minipeft.add_lora(m, ["q_proj", "v_proj", "down_proj"], r=4),
    "prompt": lambda m: minipeft.add_prompt_tuning(m, num_prompts=3, init="random"),
    "prefix": lambda m: minipeft.add_prefix_tuning(m, num_prompts=3, init="random"),
}


def trained_looking(model):
    """LoRA's B starts at zero, which would hide its gradients' dependence on A: give it values."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)


def loss_and_gradients(model, run):
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_packed_equals_alone(model, rows, atol=1e-5, grad_atol=1e-5):
    """Per token, as training divides the summed loss (a sum of ~100 tokens' losses would carry fp32's
    rounding at its own magnitude)."""
    ids, mask, labels, documents = pack_rows(rows, "cpu")
    samples = [s for row in rows for s in row]
    tokens = sum(len(s) - 1 for s in samples)
    assert scored_tokens(labels, documents) == tokens
    packed, packed_grads = loss_and_gradients(
        model, lambda: model.loss(ids, labels, attention_mask=mask, documents=documents, reduction="sum") / tokens)

    def alone():
        total = 0
        for sample in samples:
            one = torch.tensor([sample])
            total = total + model.loss(one, one, reduction="sum")
        return total / tokens

    reference, reference_grads = loss_and_gradients(model, alone)
    assert_close(packed, reference, rtol=0, atol=atol)
    assert reference_grads
    for name, grad in reference_grads.items():
        assert_close(packed_grads[name], grad, rtol=0, atol=grad_atol, msg=name)
    return packed, reference


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", list(ADD))
def test_packed_rows_equal_documents_alone(tmp_path, method, checkpointing):
    write_hf_checkpoint(tmp_path)
    model = minipeft.load_model(tmp_path)
    ADD[method](model)
    trained_looking(model)
    if checkpointing:
        minipeft.enable_checkpointing(model)
    model.train()
    generator = torch.Generator().manual_seed(5)
    sample = lambda n: torch.randint(0, 256, (n,), generator=generator).tolist()
    rows = [[sample(7), sample(1), sample(12)], [sample(9), sample(5)]]  # the second row is padded
    assert_packed_equals_alone(model, rows)

    ids, mask, labels, documents = pack_rows(rows, "cpu")
    with torch.no_grad():  # the logits too, token by token
        logits = model(ids, attention_mask=mask, documents=documents)
        prepended = logits.shape[1] - ids.shape[1]
        start = 0
        for doc in rows[0]:
            alone = model(torch.tensor([doc]))[0, prepended:]
            assert_close(logits[0, prepended + start:prepended + start + len(doc)], alone, rtol=0, atol=1e-5)
            start += len(doc)


def test_packed_rows_on_the_default_model(default_weights):
    """The real model (tied embeddings, 30 layers, GQA), LoRA on its defaults, three real code snippets."""
    model, tokenizer = minipeft.load(default_weights)
    minipeft.add_lora(model, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], r=8)
    trained_looking(model)
    minipeft.enable_checkpointing(model)
    texts = ["import os\nprint(os.getcwd())\n", "def add(a, b):\n    return a + b\n",
             "class Point:\n    x: int = 0\n    y: int = 0\n"]
    docs = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    # Through 30 fp32 layers, multithreaded matmuls of other shapes round differently: the gradients (up to 1.39)
    # differ by 3.6e-5 on 2 threads (under 1e-5 on one); a wrong mask or position moves them by 1e-2 and more.
    packed, alone = assert_packed_equals_alone(model, [docs], grad_atol=1e-4)
    # and a row that mixed its documents up would not: the same tokens as one document (1000x the tolerance)
    ids = torch.tensor([sum(docs, [])])
    assert abs(model.loss(ids, ids).item() - alone.item()) > 1e-2


def test_packer_takes_whole_samples_in_order_and_resumes():
    samples = [[i] * n for i, n in enumerate([3, 5, 2, 8, 1, 4, 6, 7, 2, 3])]
    batches = Batches(samples, batch_size=2, seed=4)
    order = batches.order()
    seen = []
    for _ in range(3):
        for row in batches.next_packed(10):
            assert 0 < sum(map(len, row)) <= 10
            seen += [s[0] for s in row]
    assert seen[:len(samples)] == order  # every sample once per epoch, whole, in the shuffled order
    resumed = Batches(samples, batch_size=2, seed=4, epoch=batches.epoch, cursor=batches.cursor)
    assert resumed.next_packed(10) == batches.next_packed(10)


def test_pack_rows_labels_and_documents():
    ids, mask, labels, documents = pack_rows([[[5, 6, 7], [8, 9]], [[4]]], "cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert mask.tolist() == [[True] * 5, [True, False, False, False, False]]
    assert labels.tolist() == [[5, 6, 7, 8, 9], [4] + [-100] * 4]
    assert documents[0].tolist() == [0, 0, 0, 1, 1] and documents[1, 0] == 0
