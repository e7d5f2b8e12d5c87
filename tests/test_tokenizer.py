"""Tokenizers against their own references: HF `tokenizers` for the hand-written BPE, sentencepiece itself."""

from pathlib import Path

import pytest

from minipeft import BadInput, load_tokenizer
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


def test_bytes_missing_from_the_vocabulary_are_dropped_as_tokenizers_drops_them(bpe_pair):
    ours, reference = bpe_pair
    for text in ("a\x04b", "x\x04\x04y", "\x04", "tab\x05\x06\x07 end"):
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, repr(text)


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
    with pytest.raises(BadInput, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BadInput, match="tokenizer.json"):
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


# ---- the kinds of tokenizer Llama-family checkpoints ship, each built by its own library --------------------

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WHOLE_WORD = " quickbrownfox"  # put in the vocabulary with no merges that build it: only ignore_merges finds it
VARIED = [*TEXTS.values(), "  leading spaces and 1234567 digits in groups", WHOLE_WORD + " jumps",
          "<|begin_of_text|>system\n<|eot_id|>", "x = [i ** 2 for i in range(10_000)]\n"]


def write_llama3_style(directory, ignore_merges=True, tokenizer_config=None):
    """A Llama 3 style tokenizer.json trained by `tokenizers`: a Split regex that groups digits by 1-3, ByteLevel
    without its own regex, ignore_merges, and a template that prepends <|begin_of_text|>."""
    import inspect
    import json
    import json as json_package
    from pathlib import Path

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sources = ([p.read_text() for p in sorted(Path(json_package.__file__).parent.glob("*.py"))]
               + [inspect.getsource(json)])
    tokenizer.train_from_iterator(sources, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", 0)])
    spec = json.loads(tokenizer.to_str())
    spec["model"]["vocab"]["Ġquickbrownfox"] = len(spec["model"]["vocab"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    (directory / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1]}))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         **(tokenizer_config or {})}))
    return directory


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_llama3_style_bpe_equals_hf(tmp_path, ignore_merges):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    directory = write_llama3_style(tmp_path, ignore_merges)
    ours = load_tokenizer(directory)
    reference, auto = Tokenizer.from_file(str(directory / "tokenizer.json")), AutoTokenizer.from_pretrained(directory)
    for text in VARIED:
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids == auto(text)["input_ids"], text
        assert ids[0] == 0  # <|begin_of_text|>, from the template
        assert ours.decode(ids[1:]) == text
    whole = ours.encode(WHOLE_WORD, add_bos=False)
    assert (len(whole) == 1) == ignore_merges


@pytest.mark.parametrize("flag", [None, True, False])
def test_bos_follows_the_template_of_tokenizer_json_as_in_transformers(tmp_path, default_weights, flag):
    """transformers 5 lets a tokenizer.json's template decide and ignores add_bos_token beside it; so do we."""
    import json
    import shutil

    from transformers import AutoTokenizer

    extra = {} if flag is None else {"add_bos_token": flag}
    llama3 = write_llama3_style(tmp_path / "llama3", tokenizer_config=extra)
    smollm = tmp_path / "smollm"
    smollm.mkdir()
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(default_weights / name, smollm)
    (smollm / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", **extra}))
    for directory, bos in ((llama3, 0), (smollm, None)):
        ids = load_tokenizer(directory).encode("Hello world 12")
        assert ids == AutoTokenizer.from_pretrained(directory)("Hello world 12")["input_ids"]
        assert (ids[0] == 0) == (bos == 0)


def test_add_bos_token_decides_for_sentencepiece(converted_sentencepiece, tmp_path):
    import json
    import shutil

    shutil.copy(converted_sentencepiece / "tokenizer.model", tmp_path)
    assert load_tokenizer(tmp_path).encode("Hi")[0] == 1  # Llama's default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    ids = load_tokenizer(tmp_path).encode("Hi")
    assert ids[0] != 1 and ids[-1] == 2


@pytest.fixture(scope="module")
def converted_sentencepiece(tmp_path_factory):
    """mistral-common's Llama tokenizer.model, and the tokenizer.json transformers' own converter makes of it:
    what Llama 2 and TinyLlama repositories ship side by side."""
    import json
    import shutil

    import mistral_common
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("llama2_tokenizer")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
         "eos_token": "</s>", "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    assert (directory / "tokenizer.json").is_file()
    return directory


def test_sentencepiece_conversion_is_read_from_its_tokenizer_model(converted_sentencepiece):
    import sentencepiece
    from tokenizers import Tokenizer

    ours = load_tokenizer(converted_sentencepiece)
    assert isinstance(ours, SentencePieceTokenizer)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(converted_sentencepiece / "tokenizer.model"))
    converted = Tokenizer.from_file(str(converted_sentencepiece / "tokenizer.json"))
    agree = 0
    for text in VARIED:
        ids = ours.encode(text)
        assert ids == [1] + reference.encode(text)  # BOS, as tokenizer_config.json says
        assert ours.decode(ids) == reference.decode(ids)
        agree += converted.encode(text).ids == ids
    print(f"transformers' converted tokenizer.json agrees with sentencepiece on {agree} of {len(VARIED)} texts")


def test_sentencepiece_conversion_alone_is_refused(converted_sentencepiece, tmp_path):
    import shutil

    shutil.copy(converted_sentencepiece / "tokenizer.json", tmp_path)
    with pytest.raises(BadInput, match="tokenizer.json: a sentencepiece tokenizer converted to JSON"):
        load_tokenizer(tmp_path)


def test_ids_beyond_the_vocabulary_decode_to_nothing(bpe_pair, converted_sentencepiece):
    ours, reference = bpe_pair
    ids = ours.encode("fox") + [ours.vocab_size, ours.vocab_size + 1000]
    assert ours.decode(ids) == reference.decode(ids) == "fox"
    spm = load_tokenizer(converted_sentencepiece)
    assert spm.decode(spm.encode("fox") + [spm.vocab_size + 5]) == "fox"


@pytest.mark.parametrize("change, named", [
    ({"normalizer": {"type": "NFKC"}}, "normalizer 'NFKC'"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "pre-tokenizer step"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "MergedWithNext", "invert": False}},
     "pre-tokenizer step"),
    ({"post_processor": {"type": "RobertaProcessing"}}, "post-processor 'RobertaProcessing'"),
])
def test_tokenizer_parts_it_cannot_honour_are_refused_by_name(tmp_path, change, named):
    import json

    directory = write_llama3_style(tmp_path)
    spec = json.loads((directory / "tokenizer.json").read_text())
    (directory / "tokenizer.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(BadInput, match="tokenizer.json") as error:
        load_tokenizer(directory)
    assert named in str(error.value) and "\n" not in str(error.value)
