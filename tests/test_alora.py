"""ALoRA, which no library implements: its layer equals y = W x + s B diag(g) A x written out here, rank by rank;
its gradients equal a finite difference; with nothing reallocated it is LoRA; AB-LoRA's scores equal the
losses with each rank taken out by hand; a reallocation closes the lowest and opens as many elsewhere,
changing the output only by what it closed; the trained adapter's file is a LoRA file with a rank per
module, which peft loads and computes the same logits from; a training checkpoint keeps the gates."""

import json

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import BadInput, load_adapter, load_model, save_adapter
from minipeft.methods.alora import ALoRALayer, add_alora, alora_layers, rank_scores, reallocate
from minipeft.methods.lora import add_lora, lora_layers
from minipeft.train.method_choice import restart_moments
from tests.helpers import write_hf_checkpoint


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base")
    return load_model(tmp_path / "base"), reference.float().eval(), tmp_path


def trained_looking(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in alora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=generator))


def test_layer_equals_the_equation_rank_by_rank():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = ALoRALayer(base, r=2, alpha=6, capacity=4)  # s = 6 / 2 = 3, slots 0 and 1 open
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_gate.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))  # open ranks 0 and 2
    x = torch.randn(3, 6)
    expected = base(x)
    for i in (0, 2):  # s b_i (a_i . x) for each open rank i
        a_i, b_i = layer.lora_A.weight[i], layer.lora_B.weight[:, i]
        expected = expected + 3.0 * (x @ a_i)[:, None] * b_i[None, :]
    assert_close(layer(x), expected, rtol=0, atol=1e-6)
    assert_close(layer.delta_weight(), 3.0 * (layer.lora_B.weight[:, [0, 2]] @ layer.lora_A.weight[[0, 2]]))


def test_gradients_equal_a_finite_difference_and_a_closed_rank_gets_none():
    torch.manual_seed(0)
    layer = ALoRALayer(torch.nn.Linear(4, 3).double(), r=2, alpha=4, capacity=3).double()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 4, dtype=torch.double)
    A, B = layer.lora_A.weight, layer.lora_B.weight

    def f(A_, B_):
        return x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * (x @ A_.T * layer.lora_gate) @ B_.T

    assert torch.autograd.gradcheck(f, (A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()))
    layer(x).square().sum().backward()
    assert torch.all(A.grad[2] == 0) and torch.all(B.grad[:, 2] == 0)  # slot 2 is closed
    assert A.grad[:2].abs().sum() > 0 and B.grad[:, :2].abs().sum() > 0


def test_with_nothing_reallocated_it_is_lora(pair):
    ours, _, tmp_path = pair
    theirs = load_model(tmp_path / "base")
    torch.manual_seed(3)
    add_alora(ours, ["q", "v", "down"], r=4, alpha=8, capacity=4)
    torch.manual_seed(3)
    add_lora(theirs, ["q", "v", "down"], r=4, alpha=8)
    trained_looking(ours)
    for mine, lora in zip(alora_layers(ours).values(), lora_layers(theirs).values()):
        with torch.no_grad():
            lora.lora_B.weight.copy_(mine.lora_B.weight)
        assert torch.equal(mine.lora_A.weight, lora.lora_A.weight)
    ids = torch.randint(3, 256, (2, 9))
    ours.loss(ids, ids).backward()
    theirs.loss(ids, ids).backward()
    assert_close(ours(ids), theirs(ids), rtol=0, atol=0)
    for mine, lora in zip(alora_layers(ours).values(), lora_layers(theirs).values()):
        assert_close(mine.lora_A.weight.grad, lora.lora_A.weight.grad, rtol=0, atol=0)
        assert_close(mine.lora_B.weight.grad, lora.lora_B.weight.grad, rtol=0, atol=0)


def heldout(model, ids):
    return lambda: model.loss(ids, ids).item()


def test_ablation_scores_equal_the_loss_with_each_rank_taken_out_by_hand(pair):
    model, _, _ = pair
    add_alora(model, ["q", "v"], r=2, alpha=4)
    trained_looking(model)
    ids = torch.randint(3, 256, (3, 10))
    model.eval()
    scores = rank_scores(model, heldout(model, ids))
    assert len(scores) == 2 * 2 * 2  # 2 layers x (q, v) x 2 open ranks
    with torch.no_grad():
        everything = model.loss(ids, ids).item()
        for (name, i), score in scores.items():
            B = model.get_submodule(name).lora_B.weight
            column = B[:, i].clone()
            B[:, i] = 0  # the rank's contribution removed another way than by its gate
            assert score == pytest.approx(model.loss(ids, ids).item() - everything, abs=1e-6)
            B[:, i] = column
    assert min(scores.values()) != max(scores.values())


def test_reallocation_moves_the_lowest_ranks_and_keeps_the_budget(pair):
    model, _, _ = pair
    add_alora(model, ["q", "v", "up"], r=2, alpha=4, capacity=3)
    trained_looking(model)
    ids = torch.randint(3, 256, (3, 10))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(ids, ids).backward()
    optimizer.step()
    model.eval()
    scores = rank_scores(model, heldout(model, ids))
    with torch.no_grad():  # what the model computes once the two lowest are closed
        kept = {}
        for name, i in sorted(scores, key=scores.get)[:2]:
            kept[(name, i)] = model.get_submodule(name).lora_gate[i].item()
            model.get_submodule(name).lora_gate[i] = 0
        expected = model(ids)
        for (name, i), gate in kept.items():
            model.get_submodule(name).lora_gate[i] = gate
    did = reallocate(model, heldout(model, ids), prune=2)
    restart_moments(optimizer, model, [(n, i) for n, i, _ in did["closed"]] + did["opened"])
    assert [(n, i) for n, i, _ in did["closed"]] == sorted(scores, key=scores.get)[:2]
    assert sum(did["ranks"].values()) == 6 * 2  # the budget: 6 layers x r = 2
    assert len(did["opened"]) == 2 and not {n for n, _ in did["opened"]} & {n for n, _, _ in did["closed"]}
    means = {n: sum(s for (m, _), s in scores.items() if m == n) / 2 for n in alora_layers(model)}
    losing = {n for n, _, _ in did["closed"]}
    best = sorted((n for n in means if n not in losing), key=lambda n: -means[n])[:2]
    assert sorted(n for n, _ in did["opened"]) == sorted(best)
    with torch.no_grad():
        assert_close(model(ids), expected, rtol=0, atol=1e-6)  # an opened rank adds nothing yet (B = 0)
    for name, i in did["opened"]:
        layer = model.get_submodule(name)
        assert layer.lora_A.weight[i].abs().sum() > 0 and torch.all(layer.lora_B.weight[:, i] == 0)
        assert torch.all(optimizer.state[layer.lora_A.weight]["exp_avg"][i] == 0)
    for name, i, _ in did["closed"]:
        layer = model.get_submodule(name)
        assert layer.lora_gate[i] == 0 and torch.all(layer.lora_A.weight[i] == 0)


def test_the_file_is_a_lora_file_with_a_rank_per_module_that_peft_loads(pair):
    from peft import PeftModel

    model, reference, tmp_path = pair
    add_alora(model, ["q", "v"], r=2, alpha=4, capacity=3)
    trained_looking(model)
    layers = list(alora_layers(model).values())
    with torch.no_grad():
        layers[0].open(2, torch.Generator().manual_seed(0))  # 3 ranks
        layers[0].lora_B.weight[:, 2] = 0.2
        layers[1].close(0)  # 1 rank
        layers[2].close(0), layers[2].close(1)  # none
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    names = list(alora_layers(model))
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert config["rank_pattern"] == {names[0]: 3, names[1]: 1, names[2]: 1}
    assert config["alpha_pattern"] == {names[0]: 6.0, names[1]: 2.0, names[2]: 2.0}  # s r_i, s = 2
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        expected = model(ids)
        theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter")
        assert_close(theirs(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        loaded = load_model(tmp_path / "base")
        load_adapter(loaded, tmp_path / "adapter")
        assert_close(loaded(ids), expected, rtol=0, atol=1e-6)


def test_a_training_checkpoint_keeps_the_gates(pair, tmp_path):
    from types import SimpleNamespace

    from minipeft.train.run_state import load_checkpoint, save_checkpoint

    def state_parts(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        return optimizer, scheduler, SimpleNamespace(epoch=0, cursor=0)

    model, _, base = pair
    add_alora(model, ["q", "v"], r=2, alpha=4)
    with torch.no_grad():
        alora_layers(model)["model.layers.1.self_attn.v_proj"].close(1)
    optimizer, scheduler, batches = state_parts(model)
    save_checkpoint(tmp_path / "ck.safetensors", model, optimizer, scheduler, batches, torch.device("cpu"))
    again = load_model(base / "base")
    add_alora(again, ["q", "v"], r=2, alpha=4)
    optimizer, scheduler, batches = state_parts(again)
    load_checkpoint(tmp_path / "ck.safetensors", again, optimizer, scheduler, batches, torch.device("cpu"))
    assert alora_layers(again)["model.layers.1.self_attn.v_proj"].open_ranks() == [0]


def test_bad_settings_are_refused(pair):
    model, _, _ = pair
    with pytest.raises(BadInput, match="capacity"):
        add_alora(model, ["q"], r=4, capacity=2)
    with pytest.raises(BadInput, match="^r:"):
        add_alora(model, ["q"], r=0)
    assert minipeft.count_parameters(model)["trainable_params"] == 0
