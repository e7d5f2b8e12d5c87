"""P-tuning: prompt tuning whose prompts are made by a small trained network, the prompt encoder.

Liu et al. 2021, "GPT Understands, Too" (arXiv 2103.10385): continuous prompt embeddings h_i are not trained
directly but produced by a prompt encoder from trainable inputs, a bidirectional LSTM and a two-layer MLP
so that the prompts depend on each other; peft's P-tuning has that encoder and, its default,
an MLP alone:

    MLP  (peft's default):   h = W3 relu(W2 relu(W1 e + b1) + b2) + b3             e (P, D) trained, H hidden
    LSTM (the paper's):      h = W2 relu(W1 [LSTM→(e) ; LSTM←(e)] + b1) + b2        a 2-layer bidirectional LSTM

    e (P, D) ─► encoder (MLP, or LSTM then MLP) ─► prompts (P, D) ─► expand to (B, P, D) ──┐
    token ids ─► frozen embedding ─► (B, T, D) ───────────────────────────────────────► cat ─► (B, P + T, D)

Everything after the prompts is prompt tuning's (prompt_tuning.py). The encoder exists only for training:
the file holds its output, the P prompts (as peft saves them), and a file loads as learned prompts, as
peft loads one for inference. Trains P D + the encoder: with the MLP, P D + (D H + H) + (H H + H) + (H D + D);
at P = 20 and H = D = 4096 on Llama-7B, 50,425,856 numbers, of which the file keeps 81,920.

The paper's prompt also has anchor tokens and prompts between the input's words; peft's and this one are
P prompts in front of the text, and the encoder's inputs e start normal (nn.Embedding's start), as peft's.

On disk (peft's layout): adapter_config.json {"peft_type": "P_TUNING", "num_virtual_tokens": P, "token_dim": D,
"encoder_reparameterization_type": "MLP" or "LSTM", "encoder_hidden_size": H, ...} and one tensor,
prompt_embeddings (P, D): the encoder's output.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BadInput
from .contract import attach
from .prompt_tuning import PromptsInFront

ENCODERS = ("MLP", "LSTM")


class PromptEncoder(nn.Module):
    """e (P, D) ─► [bidirectional LSTM] ─► MLP ─► prompts (P, D)."""

    def __init__(self, num_prompts, dim, hidden, kind="MLP", lstm_layers=2, lstm_dropout=0.0):
        super().__init__()
        self.embedding = nn.Embedding(num_prompts, dim)  # e: the encoder's trained inputs, normal at the start
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, lstm_layers, dropout=lstm_dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight[None]  # (1, P, D)
        if self.lstm_head is not None:
            e = self.lstm_head(e)[0]  # (1, P, 2 H): each prompt's input read forwards and backwards
        return self.mlp_head(e)[0]  # (P, D)


class WordEmbeddingsWithEncodedPrompts(PromptsInFront):
    """Prepends the encoder's P prompts, made at every forward (prompt tuning's wrapper, its prompts made otherwise)."""

    def __init__(self, word_embeddings: nn.Embedding, encoder: PromptEncoder):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.encoder = encoder
        self.trainable_names = tuple(f"encoder.{name}" for name, _ in encoder.named_parameters())

    @property
    def num_prompts(self) -> int:
        return self.encoder.embedding.num_embeddings

    def prompts(self) -> torch.Tensor:
        return self.encoder()  # (P, D)


@dataclass
class PTuningSettings:
    """What add_p_tuning was asked for: what its adapter file is written from (formats/peft.py)."""
    num_prompts: int
    encoder: str
    hidden: int
    lstm_layers: int = 2
    lstm_dropout: float = 0.0


def add_p_tuning(model, num_prompts=20, encoder="MLP", hidden=None, lstm_layers=2, lstm_dropout=0.0, seed=0,
                 name="default") -> WordEmbeddingsWithEncodedPrompts:
    """Freeze the model and put `num_prompts` prompts made by a prompt encoder in front of every input. Returns
    the wrapper.

    Args:
        encoder: "MLP" (three linears, peft's default) or "LSTM" (a bidirectional LSTM, then two linears).
        hidden: the encoder's width H (default: the model's hidden size).
        lstm_layers, lstm_dropout: the LSTM's depth and dropout between its layers.
        seed: the encoder's start.
        name: the adapter it belongs to.
    """
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise BadInput(f"num_prompts: expected a positive integer, got {num_prompts!r}")
    if encoder not in ENCODERS:
        raise BadInput(f"encoder: expected one of {ENCODERS}, got {encoder!r}")
    dim = model.config.hidden_size
    hidden = dim if hidden is None else hidden
    if not isinstance(hidden, int) or hidden <= 0:
        raise BadInput(f"hidden: expected a positive integer width, got {hidden!r}")
    embedding = model.model.embed_tokens
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        made = PromptEncoder(num_prompts, dim, hidden, encoder, lstm_layers, lstm_dropout)
    made = made.to(embedding.weight.device)
    settings = PTuningSettings(num_prompts, encoder, hidden, lstm_layers, lstm_dropout)
    return attach(model, name, settings, ["model.embed_tokens"],
                  lambda _, inner: WordEmbeddingsWithEncodedPrompts(inner, made))["model.embed_tokens"]
