"""Tokenizers that real Llama-family checkpoints ship: sentencepiece `tokenizer.model` (Llama-1/2,
Mistral) and byte-level BPE `tokenizer.json` (SmolLM, GPT-2 style), the BPE written by hand.

Byte-level BPE (Sennrich et al. 2016; Radford et al. 2019), encode:

    text ─► split out special tokens ─► pre-tokenize (digits, then the GPT-2 regex)
         ─► each piece's UTF-8 bytes as printable chars ─► merge the best-ranked adjacent pair until none
            is in the merge list ─► ids
"""

import json
from functools import lru_cache
from pathlib import Path

import regex

from ..errors import MiniPeftError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so BPE never sees whitespace or controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


class BPETokenizer:
    def __init__(self, path, bos_id=None, eos_id=None):
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE":
            raise MiniPeftError(f"{path}: model type {model.get('type')!r} is not supported; expected 'BPE'")
        self.vocab = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.id_to_token = {i: t for t, i in {**self.vocab, **self.special}.items()}
        self.vocab_size = max(self.id_to_token) + 1
        self.split_digits, self.split_regex = self.read_pre_tokenizer(spec.get("pre_tokenizer"), path)
        self.special_pattern = regex.compile("(" + "|".join(map(regex.escape, sorted(self.special, key=len,
                                                                                      reverse=True))) + ")")
        self.byte_chars = bytes_to_unicode()
        self.char_bytes = {c: b for b, c in self.byte_chars.items()}
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id
        self.cache = {}

    @staticmethod
    def read_pre_tokenizer(spec, path):
        steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
        split_digits, split_regex = False, False
        for step in steps:
            if step["type"] == "Digits" and step.get("individual_digits"):
                split_digits = True
            elif step["type"] == "ByteLevel" and not step.get("add_prefix_space", False):
                split_regex = step.get("use_regex", True)
            else:
                raise MiniPeftError(f"{path}: pre-tokenizer {step} is not supported "
                                    f"(expected Digits(individual_digits) and ByteLevel)")
        return split_digits, split_regex

    def pre_tokenize(self, text) -> list[str]:
        pieces = regex.findall(r"\p{N}|[^\p{N}]+", text) if self.split_digits else [text]
        if self.split_regex:
            pieces = [p for piece in pieces for p in regex.findall(GPT2_PATTERN, piece)]
        return pieces

    def bpe(self, piece: str) -> list[int]:
        if piece in self.cache:
            return self.cache[piece]
        word = [self.byte_chars[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            ranks = [self.merge_rank.get(pair, float("inf")) for pair in zip(word, word[1:])]
            best = min(range(len(ranks)), key=ranks.__getitem__)
            if ranks[best] == float("inf"):
                break
            merged, i = [], 0
            pair = (word[best], word[best + 1])
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = self.cache[piece] = [self.vocab[token] for token in word]
        return ids

    def encode(self, text: str, add_bos=False, add_eos=False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for chunk in self.special_pattern.split(text) if self.special else [text]:
            if chunk in self.special:
                ids.append(self.special[chunk])
            else:
                ids.extend(i for piece in self.pre_tokenize(chunk) for i in self.bpe(piece))
        return ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        out, pending = [], bytearray()
        for i in ids:
            token = self.id_to_token[int(i)]
            if token in self.special:
                out.append(pending.decode("utf-8", errors="replace") + token)
                pending = bytearray()
            else:
                pending.extend(self.char_bytes[c] for c in token)
        return "".join(out) + pending.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A thin wrapper over sentencepiece itself: BOS is added by default, as Llama expects."""

    def __init__(self, path):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise MiniPeftError(f"{path}: not a readable sentencepiece model ({e})") from None
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, add_bos=True, add_eos=False) -> list[int]:
        return [self.bos_id] * add_bos + self.processor.encode(text) + [self.eos_id] * add_eos

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])


def load_tokenizer(weights_dir):
    """The tokenizer a checkpoint ships: tokenizer.json (byte-level BPE) or tokenizer.model (sentencepiece)."""
    weights_dir = Path(weights_dir)
    if (weights_dir / "tokenizer.json").is_file():
        path = weights_dir / "tokenizer.json"
        config = weights_dir / "config.json"
        try:
            ids = json.loads(config.read_text()) if config.is_file() else {}
            return BPETokenizer(path, ids.get("bos_token_id"), ids.get("eos_token_id"))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MiniPeftError(f"{path}: not a readable byte-level BPE tokenizer.json ({e!r})") from None
    if (weights_dir / "tokenizer.model").is_file():
        return SentencePieceTokenizer(weights_dir / "tokenizer.model")
    raise MiniPeftError(f"{weights_dir}: no tokenizer.json or tokenizer.model found")
