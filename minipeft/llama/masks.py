"""Which keys each query sees: causal attention over real (not padded) positions, and packed rows, whose
documents each attend only to themselves and to the positions in front of them all."""

import torch


def causal_padding_mask(key_mask, num_new: int):
    """Boolean (B, 1, T, S) mask: a query sees real keys at or before its own position.

    A padded query also sees itself, so no softmax row is empty (its output is never used)."""
    S = key_mask.shape[1]
    query_pos = torch.arange(S - num_new, S, device=key_mask.device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=key_mask.device)[None]  # (1, S)
    mask = (key_pos <= query_pos) & key_mask[:, None, :]  # (B, T, S)
    return (mask | (key_pos == query_pos))[:, None]


def document_mask(key_mask, key_documents, query_documents):
    """Packed rows: boolean (B, 1, T, S) mask, and rotary positions (B, T) that restart at each document.

    A query sees real keys at or before it in its own document, and the shared positions in front of
    every document (document -1: learned prompts or a learned past). Its position is how many it sees,
    less one: the position it would have with its document alone behind the shared ones."""
    S, T = key_mask.shape[1], query_documents.shape[1]
    query_pos = torch.arange(S - T, S, device=key_mask.device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=key_mask.device)[None]  # (1, S)
    same = (key_documents[:, None, :] == query_documents[:, :, None]) | (key_documents[:, None, :] == -1)  # (B, T, S)
    sees = (key_pos <= query_pos) & key_mask[:, None, :] & same
    positions = (sees.sum(-1) - 1).clamp(min=0)
    return (sees | (key_pos == query_pos))[:, None], positions
