"""Tokenizers that real Llama-family checkpoints ship, chosen by what the files say:

    tokenizer.json, byte-level BPE     SmolLM2 / GPT-2 style and Llama 3 style: the BPE written by hand,
                                       with the pre-tokenizer the file gives (Split regex, Digits, ByteLevel)
    tokenizer.model, sentencepiece     Llama 1/2, TinyLlama, Mistral: sentencepiece itself. Preferred when
                                       both exist: those repositories' tokenizer.json is a conversion of it

Byte-level BPE (Sennrich et al. 2016; Radford et al. 2019), encode:

    text ─► split out added tokens ─► pre-tokenize as the file says ─► each piece's UTF-8 bytes as printable
         chars ─► (ignore_merges: a piece already in the vocabulary is one token) ─► merge the best-ranked
         adjacent pair until none is in the merge list ─► ids

BOS and EOS are added as the checkpoint says, as transformers does: a tokenizer.json's post-processor
template decides for it (Llama 3 prepends <|begin_of_text|>, SmolLM2 nothing; transformers ignores
add_bos_token there), and tokenizer_config.json's add_bos_token / add_eos_token for a tokenizer.model
(Llama 2 prepends <s>).
"""

import json
from functools import lru_cache
from pathlib import Path

import regex

from ..errors import BadInput
from .chat import chat_settings

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Marks of a tokenizer.json converted from sentencepiece (Llama 2, TinyLlama): not byte-level BPE.
SENTENCEPIECE_MARKS = ("Metaspace", "Prepend", "ByteFallback", "Replace")


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


def split_isolated(pattern):
    """tokenizers' Split(behavior="Isolated"): every match a piece, and every stretch between matches."""
    def split(piece):
        pieces, start = [], 0
        for match in pattern.finditer(piece):
            pieces += [piece[start:match.start()], match.group()]
            start = match.end()
        return [p for p in pieces + [piece[start:]] if p]
    return split


def pre_tokenizer_steps(spec, path) -> list:
    """The file's pre-tokenizer as a list of functions, each splitting one piece into pieces."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    functions = []
    for step in steps:
        kind = step.get("type")
        if kind == "Digits":
            digits = regex.compile(r"\p{N}|[^\p{N}]+" if step.get("individual_digits") else r"\p{N}+|[^\p{N}]+")
            functions.append(digits.findall)
        elif kind == "ByteLevel" and not step.get("add_prefix_space", False):
            if step.get("use_regex", True):
                functions.append(regex.compile(GPT2_PATTERN).findall)
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert", False):
            pattern = step.get("pattern", {})
            text = pattern.get("Regex") if "Regex" in pattern else regex.escape(pattern.get("String", ""))
            functions.append(split_isolated(regex.compile(text)))
        else:
            raise BadInput(f"{path}: pre-tokenizer step {json.dumps(step)[:120]} is not supported (expected "
                           f"Digits, ByteLevel without add_prefix_space, or Split with behavior Isolated)")
    return functions


def special_template(post_processor, path) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's TemplateProcessing puts before and after a single sequence."""
    processors = (post_processor or {}).get("processors", [post_processor]) if post_processor else []
    before, after, seen_sequence = [], [], False
    for processor in processors:
        kind = processor.get("type")
        if kind == "ByteLevel":
            continue  # only adjusts offsets
        if kind != "TemplateProcessing":
            raise BadInput(f"{path}: post-processor {kind!r} is not supported (expected TemplateProcessing)")
        for item in processor["single"]:
            if "Sequence" in item:
                seen_sequence = True
            else:
                ids = processor["special_tokens"][item["SpecialToken"]["id"]]["ids"]
                (after if seen_sequence else before).extend(ids)
    return before, after


class BPETokenizer:
    def __init__(self, path, bos_id=None, eos_id=None):
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE":
            raise BadInput(f"{path}: model type {model.get('type')!r} is not supported; expected 'BPE'")
        if spec.get("normalizer") is not None:
            raise BadInput(f"{path}: normalizer {spec['normalizer'].get('type')!r} is not supported "
                           f"(byte-level BPE tokenizers have none)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise BadInput(f"{path}: BPE option {key}={model[key]!r} is not supported")
        self.vocab = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        broken = next((pair for pair in merges if len(pair) != 2 or "".join(pair) not in self.vocab), None)
        if broken:  # as tokenizers refuses it: the merge would make a piece with no id
            raise BadInput(f"{path}: merge {broken} makes a token that is not in the vocabulary")
        self.ignore_merges = bool(model.get("ignore_merges", False))  # Llama 3: whole words in the vocab stay whole
        added = spec.get("added_tokens", [])
        stripping = [t["content"] for t in added if t.get("lstrip") or t.get("rstrip") or t.get("single_word")]
        if stripping:
            raise BadInput(f"{path}: added token {stripping[0]!r} has lstrip/rstrip/single_word, not supported")
        self.special = {t["content"]: t["id"] for t in added}
        self.id_to_token = {i: t for t, i in {**self.vocab, **self.special}.items()}
        self.vocab_size = max(self.id_to_token) + 1
        self.pre_tokenizer = pre_tokenizer_steps(spec.get("pre_tokenizer"), path)
        self.special_pattern = regex.compile("(" + "|".join(map(regex.escape, sorted(self.special, key=len,
                                                                                      reverse=True))) + ")")
        self.byte_chars = bytes_to_unicode()
        self.char_bytes = {c: b for b, c in self.byte_chars.items()}
        self.before, self.after = special_template(spec.get("post_processor"), path)  # BOS / EOS, if any
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id
        self.cache = {}

    def pre_tokenize(self, text) -> list[str]:
        pieces = [text]
        for step in self.pre_tokenizer:
            pieces = [p for piece in pieces for p in step(piece)]
        return pieces

    def bpe(self, piece: str) -> list[int]:
        if piece in self.cache:
            return self.cache[piece]
        # A byte the vocabulary lacks is dropped, as tokenizers drops it when there is no unk_token.
        word = [c for c in (self.byte_chars[b] for b in piece.encode("utf-8")) if c in self.vocab]
        if self.ignore_merges and "".join(word) in self.vocab:
            word = ["".join(word)]
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

    def encode(self, text: str, add_bos=None, add_eos=None) -> list[int]:
        """Token ids; BOS/EOS as the checkpoint says, unless add_bos / add_eos say otherwise."""
        ids = list(self.before) if add_bos is None else [self.bos_id] if add_bos else []
        for chunk in self.special_pattern.split(text) if self.special else [text]:
            if chunk in self.special:
                ids.append(self.special[chunk])
            else:
                ids.extend(i for piece in self.pre_tokenize(chunk) for i in self.bpe(piece))
        return ids + (list(self.after) if add_eos is None else [self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        """Text of the ids; an id outside the vocabulary (config vocab_size may be larger) decodes to nothing."""
        out, pending = [], bytearray()
        for i in ids:
            token = self.id_to_token.get(int(i))
            if token is None:
                continue
            if token in self.special:
                out.append(pending.decode("utf-8", errors="replace") + token)
                pending = bytearray()
            else:
                pending.extend(self.char_bytes[c] for c in token)
        return "".join(out) + pending.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A thin wrapper over sentencepiece itself: BOS is added unless tokenizer_config.json says otherwise."""

    def __init__(self, path, add_bos=None, add_eos=None):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise BadInput(f"{path}: not a readable sentencepiece model ({e})") from None
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else self.eos_id
        self.add_bos = True if add_bos is None else add_bos
        self.add_eos = bool(add_eos)

    def encode(self, text: str, add_bos=None, add_eos=None) -> list[int]:
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        return [self.bos_id] * add_bos + self.processor.encode(text) + [self.eos_id] * add_eos

    def decode(self, ids) -> str:
        """Text of the ids; an id outside the vocabulary decodes to nothing."""
        return self.processor.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def read_json(path, what):
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{path}: expected a JSON object ({what})")
    return value


def tokenizer_flags(weights_dir) -> tuple:
    """add_bos_token / add_eos_token from tokenizer_config.json (None where it does not say)."""
    path = weights_dir / "tokenizer_config.json"
    config = read_json(path, "tokenizer settings")
    flags = config.get("add_bos_token"), config.get("add_eos_token")
    if not all(flag is None or isinstance(flag, bool) for flag in flags):
        raise BadInput(f"{path}: add_bos_token / add_eos_token should be true or false, got {flags}")
    return flags


def is_sentencepiece_conversion(spec) -> bool:
    text = json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")})
    return spec.get("model", {}).get("byte_fallback") is True or any(f'"{m}"' in text for m in SENTENCEPIECE_MARKS)


def load_tokenizer(weights_dir):
    """The tokenizer a checkpoint ships, picked by what its files say (see the module docstring)."""
    weights_dir = Path(weights_dir)
    tokenizer = pick_tokenizer(weights_dir)
    tokenizer.chat = chat_settings(weights_dir, read_json(weights_dir / "tokenizer_config.json", "tokenizer settings"))
    return tokenizer


def pick_tokenizer(weights_dir):
    json_path, model_path = weights_dir / "tokenizer.json", weights_dir / "tokenizer.model"
    add_bos, add_eos = tokenizer_flags(weights_dir)
    if json_path.is_file():
        spec = read_json(json_path, "a Hugging Face tokenizer")
        if is_sentencepiece_conversion(spec):
            if model_path.is_file():
                return SentencePieceTokenizer(model_path, add_bos, add_eos)
            raise BadInput(f"{json_path}: a sentencepiece tokenizer converted to JSON (Metaspace / byte_fallback) "
                           f"is read from its tokenizer.model, which is not in {weights_dir}")
        ids = read_json(weights_dir / "config.json", "the model config")
        bos, eos = ids.get("bos_token_id"), ids.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        try:
            return BPETokenizer(json_path, bos, eos)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError, regex.error) as e:
            raise BadInput(f"{json_path}: not a readable byte-level BPE tokenizer.json ({e!r})") from None
    if model_path.is_file():
        return SentencePieceTokenizer(model_path, add_bos, add_eos)
    raise BadInput(f"{weights_dir}: no tokenizer.json or tokenizer.model found")
