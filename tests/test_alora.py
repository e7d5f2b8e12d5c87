"""ALoRA, which no library implements: its layer equals y = W x + s B diag(g) A x written out here, rank by rank;
its gradients equal a finite difference; with nothing reallocated it is LoRA; AB-LoRA's scores equal the paper's
Eq. (6), IS(r) = S(M) - S(M\\r) + S(M_r), on a case small enough to check by hand and on a model with each rank
taken out by hand; a round closes the lowest rank of each module type and spreads as many over the most
important modules that lost none, past a full one and across module types, changing the output only by what
it closed; the schedule trains first, then holds a bounded number of rounds; the trained adapter's file is a
LoRA file with a rank per module, which peft loads and computes the same logits from; a training checkpoint
keeps the gates."""

import json

import pytest
import torch
from torch.testing import assert_close

import minipeft
from minipeft import BadInput, load_adapter, load_model, save_adapter
from minipeft.methods.alora import ALoRALayer, add_alora, alora_layers, importance_scores, move_ranks, reallocate
from minipeft.methods.lora import add_lora, lora_layers
from minipeft.train.method_choice import is_round, restart_moments
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


def test_importance_is_the_papers_eq_6_on_a_case_checked_by_hand():
    """One output, y = b0 x0 + b1 x1 (W = 0, A = I, s = 1), x = (1, 1), loss (y - 1)^2, b = (2, -1):
    L(M) = 0; without rank 0, y = -1: L = 4; rank 0 alone, y = 2: L = 1; without rank 1, y = 2: L = 1;
    rank 1 alone, y = -1: L = 4. IS(r) = S(M) - S(M\\r) + S(M_r), S = -L:
    IS(0) = 0 + 4 - 1 = 3 and IS(1) = 0 + 1 - 4 = -3 (the loss rise alone would say 4 and 1)."""
    base = torch.nn.Linear(2, 1, bias=False)
    model = torch.nn.Sequential(ALoRALayer(base, r=2, alpha=2))  # s = alpha / r = 1
    with torch.no_grad():
        base.weight.zero_()
        model[0].lora_A.weight.copy_(torch.eye(2))
        model[0].lora_B.weight.copy_(torch.tensor([[2.0, -1.0]]))
    x = torch.ones(1, 2)
    scores = importance_scores(model, lambda: (model(x) - 1).square().sum().item())
    assert scores == {("0", 0): pytest.approx(3.0), ("0", 1): pytest.approx(-3.0)}
    assert model[0].lora_gate.tolist() == [1.0, 1.0]  # every gate as it was


def test_importance_on_a_model_equals_eq_6_with_each_rank_taken_out_by_hand(pair):
    model, _, _ = pair
    add_alora(model, ["q", "v"], r=2, alpha=4)
    trained_looking(model)
    ids = torch.randint(3, 256, (3, 10))
    model.eval()
    scores = importance_scores(model, heldout(model, ids))
    assert len(scores) == 2 * 2 * 2  # 2 layers x (q, v) x 2 open ranks
    layers = alora_layers(model)
    with torch.no_grad():
        columns = {name: layer.lora_B.weight.clone() for name, layer in layers.items()}
        S_M = -model.loss(ids, ids).item()
        for (name, i), score in scores.items():  # each rank's contribution removed another way than by its gate
            layers[name].lora_B.weight[:, i] = 0
            S_without = -model.loss(ids, ids).item()
            for layer in layers.values():
                layer.lora_B.weight.zero_()
            layers[name].lora_B.weight[:, i] = columns[name][:, i]
            S_alone = -model.loss(ids, ids).item()
            for other, layer in layers.items():
                layer.lora_B.weight.copy_(columns[other])
            assert score == pytest.approx(S_M - S_without + S_alone, abs=1e-5)
    assert min(scores.values()) != max(scores.values())


def toy_layers(names, r=2, capacity=5):
    torch.manual_seed(0)
    return {name: ALoRALayer(torch.nn.Linear(4, 4), r=r, alpha=2 * r, capacity=capacity) for name in names}


def test_a_round_closes_the_lowest_of_each_type_and_spreads_the_budget_past_a_full_module():
    names = [f"layers.{l}.{kind}" for l in range(3) for kind in ("q_proj", "v_proj")]
    layers = toy_layers(names)
    scores = {("layers.0.q_proj", 0): 0.5, ("layers.0.q_proj", 1): -0.2,  # q's lowest: layers.0.q_proj rank 1
              ("layers.1.q_proj", 0): 0.9, ("layers.1.q_proj", 1): 0.8,
              ("layers.2.q_proj", 0): 0.1, ("layers.2.q_proj", 1): 0.3,
              ("layers.0.v_proj", 0): 2.0, ("layers.0.v_proj", 1): 1.8,  # the most important module: full
              ("layers.1.v_proj", 0): 0.05, ("layers.1.v_proj", 1): 0.6,  # v's lowest: layers.1.v_proj rank 0
              ("layers.2.v_proj", 0): 1.0, ("layers.2.v_proj", 1): 0.7}
    full = layers["layers.0.v_proj"]
    with torch.no_grad():
        full.lora_gate.fill_(1.0)
    scores_full = {**scores, **{("layers.0.v_proj", i): 1.9 for i in range(2, 5)}}
    closed, opened = move_ranks(layers, scores_full, torch.Generator().manual_seed(0))
    assert closed == [("layers.0.q_proj", 1), ("layers.1.v_proj", 0)]  # one a module type, its lowest
    # the others by mean score: layers.1.q_proj 0.85 and layers.2.v_proj 0.85, then layers.2.q_proj 0.2;
    # layers.0.v_proj (1.9) has no free slot
    assert sorted(opened) == [("layers.1.q_proj", 2), ("layers.2.v_proj", 2)]
    assert sum(len(layer.open_ranks()) for layer in layers.values()) == 5 * 2 + 5  # the budget kept


def test_a_round_moves_ranks_across_module_types_and_cycles_when_few_modules_can_grow():
    layers = toy_layers(["layers.0.q_proj", "layers.1.q_proj", "layers.0.up_proj"], capacity=6)
    scores = {("layers.0.q_proj", 0): 0.1, ("layers.0.q_proj", 1): 0.4,
              ("layers.1.q_proj", 0): 0.0, ("layers.1.q_proj", 1): 0.2,
              ("layers.0.up_proj", 0): -1.0, ("layers.0.up_proj", 1): 0.3}
    closed, opened = move_ranks(layers, scores, torch.Generator().manual_seed(0))
    assert closed == [("layers.0.up_proj", 0), ("layers.1.q_proj", 0)]
    assert opened == [("layers.0.q_proj", 2), ("layers.0.q_proj", 3)]  # the one module that lost none, twice
    assert [len(layer.open_ranks()) for layer in layers.values()] == [4, 1, 1]  # up_proj's rank went to a q_proj


def test_the_schedule_trains_first_then_holds_a_bounded_number_of_rounds():
    assert [step for step in range(1, 200) if is_round(step, start=20, every=10, rounds=4)] == [20, 30, 40, 50]
    assert not any(is_round(step, start=5, every=1, rounds=0) for step in range(1, 50))


def test_a_round_on_a_model_keeps_the_budget_and_changes_only_what_it_closed(pair):
    model, _, _ = pair
    add_alora(model, ["q", "v", "up"], r=2, alpha=4, rounds=1)
    assert all(layer.lora_gate.numel() == 2 + 3 for layer in alora_layers(model).values())  # r + rounds x types
    trained_looking(model)
    ids = torch.randint(3, 256, (3, 10))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(ids, ids).backward()
    optimizer.step()
    model.eval()
    scores = importance_scores(model, heldout(model, ids))
    lowest = {}
    for name, i in sorted(scores, key=scores.get):
        lowest.setdefault(name.rsplit(".", 1)[-1], (name, i))
    with torch.no_grad():  # what the model computes once the lowest of each type is closed
        for name, i in lowest.values():
            model.get_submodule(name).lora_gate[i] = 0
        expected = model(ids)
        for name, i in lowest.values():
            model.get_submodule(name).lora_gate[i] = 1
    did = reallocate(model, heldout(model, ids))
    restart_moments(optimizer, model, [(n, i) for n, i, _ in did["closed"]] + did["opened"])
    assert sorted((n, i) for n, i, _ in did["closed"]) == sorted(lowest.values())
    assert sum(did["ranks"].values()) == 6 * 2  # the budget: 6 layers x r = 2
    assert len(did["opened"]) == 3 and not {n for n, _ in did["opened"]} & {n for n, _, _ in did["closed"]}
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
    with pytest.raises(BadInput, match="^r and rounds:"):
        add_alora(model, ["q"], r=0)
    assert minipeft.count_parameters(model)["trainable_params"] == 0
