"""Tokenizers against their own references: HF `tokenizers` for the hand-written BPE, sentencepiece itself."""

import pytest

from minipeft import MiniPeftError, load_tokenizer
from minipeft.llama.tokenizer import BPETokenizer, SentencePieceTokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what they'd've done, isn't it?",
    "python": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "whitespace": "a  b   c\t\td\n\n\n   e    \n\t \r\n  ",
    "digits": "In 2024, 3.14159 * 1000000 = 3141590; 007 +42 -17e10 ①②③ ½",
    "accents": "Café naïve résumé Ångström façade São Paulo Straße ÆØÅ",
    "cjk": "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "emoji": "I ❤️ 🦊 and 🐶! 👨‍👩‍👧‍👦 🇫🇷 ✨",
    "special": "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
}


@pytest.fixture(scope="module")
def bpe_pair(default_weights):
    from tokenizers import Tokenizer

    return load_tokenizer(default_weights), Tokenizer.from_file(str(default_weights / "tokenizer.json"))


@pytest.mark.parametrize("kind", TEXTS)
def test_bpe_ids_equal_hf_tokenizers(bpe_pair, kind):
    ours, reference = bpe_pair
    text = TEXTS[kind]
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text


def test_bpe_on_real_code(bpe_pair):
    import inspect
    import json

    ours, reference = bpe_pair
    text = inspect.getsource(json.decoder)
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text


def test_bpe_is_fast_enough(bpe_pair):
    """A few MB of code in well under a minute: the per-piece cache makes repeated words free."""
    import time
    from pathlib import Path
    import json as json_module

    ours, _ = bpe_pair
    text = "".join(p.read_text() for p in sorted(Path(json_module.__file__).parent.parent.glob("*.py"))[:120])
    start = time.time()
    ours.encode(text)
    seconds = time.time() - start
    print(f"{len(text) / 1e6:.1f} MB in {seconds:.1f} s")
    assert seconds < 30 * len(text) / 3e6 + 5


def test_sentencepiece_llama_family_model_equals_sentencepiece():
    import sentencepiece
    from importlib.resources import files

    path = files("mistral_common") / "data" / "tokenizer.model.v1"
    ours, reference = SentencePieceTokenizer(path), sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert ours.vocab_size == 32000
    for text in TEXTS.values():
        ids = ours.encode(text)
        assert ids == [reference.bos_id()] + reference.encode(text)
        assert ours.decode(ids) == reference.decode(reference.encode(text))
    assert ours.encode("hi", add_bos=False, add_eos=True)[-1] == reference.eos_id()


def test_sentencepiece_tiny_trained_model(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS.values()) * 20)
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=500, model_type="bpe", byte_fallback=True,
                                             minloglevel=2)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, SentencePieceTokenizer)
    for text in TEXTS.values():
        assert ours.encode(text, add_bos=False) == reference.encode(text)
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(MiniPeftError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MiniPeftError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bpe_class_reads_plain_bytelevel(tmp_path):
    """A GPT-2 style tokenizer.json (ByteLevel pre-tokenizer alone) built with HF tokenizers itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    reference = Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    reference.train_from_iterator(list(TEXTS.values()) * 10, trainer)
    reference.save(str(tmp_path / "tokenizer.json"))
    ours = BPETokenizer(tmp_path / "tokenizer.json")
    for text in TEXTS.values():
        assert ours.encode(text) == reference.encode(text).ids
