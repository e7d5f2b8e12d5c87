"""IAPT, which no library implements: its output equals its equations (pooling, down projection, rational
activation, up projection, in every layer) written out here step by step and put into transformers' own Llama
before each of its decoder layers; its gradients equal autograd through that written-out model and a finite
difference; with the generators' output held constant it is fixed per-layer tokens inserted by hand; the loss
scores none of the tokens the generators read; the activation starts as GELU; its file round-trips."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import minipeft
from minipeft import BadInput, add_iapt, load_adapter, load_model, save_adapter
from minipeft.llama.loader import build_model
from minipeft.methods.counting import count_parameters
from minipeft.methods.iapt import gelu_as_rational
from minipeft.tools.methods_table import SHAPES
from minipeft.train.loop import scored_tokens
from tests.helpers import write_hf_checkpoint

NAMES = ("down.weight", "queries", "activation.numerator", "activation.denominator", "up.weight")


@pytest.fixture()
def pair(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "base")
    return load_model(tmp_path / "base"), reference.float().eval(), tmp_path


def layer_tensors(prompts):
    """Per layer: [Down (r, D), queries (P, r), a (6,), b (4,), Up (D, r)], as the module holds them."""
    return [[generator.get_parameter(name) for name in NAMES] for generator in prompts.generators]


def equations(H, n, down, queries, a, b, up):
    """One row's soft tokens (P, D) from its text's hidden states H (T, D), one equation a line."""
    H = H[:n]  # the instruction: the first n tokens (no padding in these rows)
    Z = (H / torch.sqrt((H * H).mean(dim=1, keepdim=True) + 1e-6)) @ down.T  # (n, r)
    soft = []
    for q in queries:
        weights = torch.exp(Z @ q / math.sqrt(Z.shape[1]))
        w = weights / weights.sum()  # (n,): attention pooling
        p = (w[:, None] * Z).sum(dim=0)  # (r,)
        sigma = sum(a[k] * p ** k for k in range(6)) / (1 + torch.abs(sum(b[k - 1] * p ** k for k in range(1, 5))))
        soft.append((w[:, None] * H).sum(dim=0) + up @ sigma)  # (D,): the pooled states, plus the bottleneck
    return torch.stack(soft)


def written_out(reference, per_layer, ids, P, n, labels=None):
    """transformers' Llama with P zero positions in front, which a hook before each decoder layer replaces by
    that layer's soft tokens: from the equations (per_layer: tensors) or given outright (per_layer: tokens)."""
    def before_layer(index):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            given = per_layer[index]
            soft = given.expand(len(x), -1, -1) if torch.is_tensor(given) else torch.stack(
                [equations(row[P:], n, *given) for row in x])
            x = torch.cat([soft, x[:, P:]], dim=1)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return hook
    handles = [layer.register_forward_pre_hook(before_layer(i), with_kwargs=True)
               for i, layer in enumerate(reference.model.layers)]
    try:
        embeds = reference.get_input_embeddings()(ids)
        inputs = torch.cat([torch.zeros(len(ids), P, embeds.shape[-1]), embeds], dim=1)
        if labels is not None:  # the prepended positions and the instruction are not scored
            labels = torch.cat([torch.full((len(ids), P + n), -100), labels[:, n:]], dim=1)
        return reference(inputs_embeds=inputs, labels=labels)
    finally:
        for handle in handles:
            handle.remove()


def trained_looking(prompts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in prompts.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_a_generator_on_a_case_small_enough_to_check_by_hand():
    """D = r = 2, Down = I, Up = 2 I, sigma(z) = z (a1 = 1, every other coefficient 0), the instruction's states
    h = (1, 1) and (3, -3): RMS-normalised, z = (1, 1) and (1, -1). A query q = (0, sqrt(2) ln(3) / 2) scores them
    +-ln(3) / 2, so w = (3/4, 1/4): p = (1, 0.5), pooled states (1.5, 0), s = (1.5, 0) + 2 (1, 0.5) = (3.5, 1).
    The zero query pools evenly: p = (1, 0), pooled (2, -1), s = (4, -1)."""
    from minipeft.methods.iapt import PromptGenerator

    generator = PromptGenerator(2, 2, 2, torch.tensor([0.0, 1, 0, 0, 0, 0]), torch.zeros(4))
    with torch.no_grad():
        generator.down.weight.copy_(torch.eye(2))
        generator.up.weight.copy_(2 * torch.eye(2))
        generator.queries.copy_(torch.tensor([[0.0, math.sqrt(2) * math.log(3) / 2], [0.0, 0.0]]))
        H = torch.tensor([[[1.0, 1.0], [3.0, -3.0], [7.0, 7.0]]])  # the third token is not the instruction's
        soft = generator(H, torch.tensor([[True, True, False]]))
    assert_close(soft, torch.tensor([[[3.5, 1.0], [4.0, -1.0]]]), rtol=0, atol=1e-5)


def test_logits_and_loss_equal_the_equations_written_out(pair):
    ours, reference, _ = pair
    prompts = add_iapt(ours, num_prompts=3, r=4, instruction_tokens=5)
    trained_looking(prompts)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        expected = written_out(reference, layer_tensors(prompts), ids, 3, 5, labels=ids)
        assert_close(ours(ids), expected.logits, rtol=0, atol=1e-5)  # (B, P + T, vocab)
        assert_close(ours.loss(ids, ids), expected.loss, rtol=0, atol=1e-5)


def test_gradients_equal_autograd_through_the_equations_and_a_finite_difference(pair):
    ours, reference, _ = pair
    prompts = add_iapt(ours, num_prompts=2, r=3, instruction_tokens=4)
    trained_looking(prompts)
    ids = torch.randint(3, 256, (2, 8))
    ours.loss(ids, ids).backward()
    copies = [[t.detach().clone().requires_grad_() for t in layer] for layer in layer_tensors(prompts)]
    written_out(reference, copies, ids, 2, 4, labels=ids).loss.backward()
    for layer, (mine, theirs) in enumerate(zip(layer_tensors(prompts), copies)):
        for name, p, copy in zip(NAMES, mine, theirs):
            assert_close(p.grad, copy.grad, rtol=1e-4, atol=1e-6, msg=f"layer {layer} {name}")
            assert copy.grad.abs().sum() > 0, (layer, name)
    numerator = prompts.generators[1].activation.numerator  # along layer 1's activation
    direction = torch.randn(numerator.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        step = 2e-2
        numerator.add_(step * direction)
        plus = ours.loss(ids, ids).double()
        numerator.sub_(2 * step * direction)
        minus = ours.loss(ids, ids).double()
    finite = (plus - minus) / (2 * step)
    assert finite.item() == pytest.approx((copies[1][2].grad.double() * direction).sum().item(), rel=2e-2, abs=1e-5)


def test_with_the_generators_output_held_constant_it_is_fixed_tokens_inserted_by_hand(pair):
    ours, reference, _ = pair
    prompts = add_iapt(ours, num_prompts=3, r=4, instruction_tokens=5)
    trained_looking(prompts)
    fixed = [torch.randn(3, ours.config.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for generator, tokens in zip(prompts.generators, fixed):
        generator.forward = lambda H, reads, tokens=tokens: tokens.expand(len(H), -1, -1)  # whatever it reads
    with torch.no_grad():
        ids = torch.randint(3, 256, (2, 9))
        other = ids.clone()
        other[:, :5] = torch.randint(3, 256, (2, 5))  # another instruction: the same tokens now
        assert_close(ours(ids), written_out(reference, fixed, ids, 3, 5).logits, rtol=0, atol=1e-5)
        assert_close(ours(other), written_out(reference, fixed, other, 3, 5).logits, rtol=0, atol=1e-5)


def test_the_loss_scores_none_of_the_tokens_the_generators_read(pair):
    ours, _, _ = pair
    prompts = add_iapt(ours, num_prompts=2, r=4, instruction_tokens=3)
    trained_looking(prompts)
    ids = torch.randint(3, 256, (2, 8))
    later = ids.clone()
    later[:, 3:] = torch.randint(3, 256, (2, 5))
    with torch.no_grad():  # the soft tokens read the first 3 tokens only: what follows cannot change them
        assert_close(ours(ids)[:, :2 + 3], ours(later)[:, :2 + 3], rtol=0, atol=0)
        summed = ours.loss(ids, ids, reduction="sum")
        mean = ours.loss(ids, ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert scored_tokens(ids, model=ours, mask=mask) == 2 * (8 - 3)  # tokens 3..7 of each row
    assert_close(summed / (2 * (8 - 3)), mean)
    for documents in (torch.zeros_like(ids),):
        with pytest.raises(BadInput, match="documents: packed rows"):
            ours.loss(ids, ids, documents=documents)
    with pytest.raises(BadInput, match="LayerPrompts: the batch has 0 positions"):
        ours(inputs_embeds=torch.zeros(1, 4, ours.config.hidden_size))


def test_the_activation_starts_as_gelu():
    a, b = gelu_as_rational()
    z = torch.linspace(-4, 4, 801)
    powers = z[:, None] ** torch.arange(6)
    assert (powers[:, 1:5] @ b).min() >= -1e-6  # |Q| = Q where it was fitted
    assert_close(powers @ a / (1 + (powers[:, 1:5] @ b).abs()), F.gelu(z), rtol=0, atol=5e-3)


def test_file_round_trips_names_its_format_and_refuses_what_it_cannot_honour(pair, tmp_path):
    ours, _, path = pair
    trained_looking(add_iapt(ours, num_prompts=3, r=4, instruction_tokens=5))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert [config[k] for k in ("peft_type", "num_virtual_tokens", "r", "instruction_tokens", "num_layers")] == \
        ["IAPT", 3, 4, 5, 2]
    again = load_model(path / "base")
    load_adapter(again, tmp_path / "adapter")
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    for key, value, needle in (("num_layers", 3, "num_layers is 3, the model has 2 layers"),
                               ("instruction_tokens", 0, r"'instruction_tokens' should be int in \[1, 128\]"),
                               ("dropout", 0.1, "key 'dropout' is 0.1; minipeft does not know this key")):
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(BadInput, match=needle):
            load_adapter(load_model(path / "base"), tmp_path / "adapter")
    minipeft.add_prompt_tuning(again, num_prompts=2, name="other")
    with pytest.raises(BadInput, match="already puts positions in front of the text"):
        add_iapt(again, name="other")


def test_counts_at_llama_7b():
    model = build_model(SHAPES["Llama-7B"])
    add_iapt(model, num_prompts=4, r=16)
    assert count_parameters(model)["trainable_params"] == 32 * (2 * 4096 * 16 + 4 * 16 + 10) == 4_196_672
