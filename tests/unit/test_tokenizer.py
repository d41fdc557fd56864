"""Tokenizer: our trained WordPiece, and foreign tokenizer.json files (BERT-like WordPiece, GPT-2-like byte BPE)."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmray.data.shapes import generate_sample
from mmray.data.tokenizer import TextTokenizer, train_tokenizer
from mmray.storage import StorageError

CAPTIONS = [generate_sample(0, i).caption for i in range(300)]
QUESTIONS = [qa["question"] for i in range(300) for qa in generate_sample(0, i).qa]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(train_tokenizer(CAPTIONS + QUESTIONS, vocab_size=512))


def test_special_tokens_have_fixed_ids(tok):
    ids = [tok.tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[BOS]", "[EOS]")]
    assert ids == [0, 1, 2, 3]
    assert tok.pad_id == 0
    assert 20 < tok.vocab_size <= 512


def test_batch_ids_are_the_tokenizers_own(tok):
    """encode_batch takes tokenizers' offset-free fast path: the ids must be the slow path's, cut and padded."""
    texts = CAPTIONS[:100] + QUESTIONS[:100] + ["", "café ünïcode ☃", "a " * 80]
    ids = tok.encode_batch(texts, max_len=24)
    for row, text in zip(ids, texts):
        expected = tok._encoder.encode(text).ids[:24]
        assert row.tolist() == expected + [tok.pad_id] * (24 - len(expected))


def test_encode_decode_round_trip(tok):
    texts = CAPTIONS[:50] + QUESTIONS[:50]
    ids = tok.encode_batch(texts, max_len=40)
    assert [tok.decode(row) for row in ids] == texts


def test_training_is_deterministic():
    texts = CAPTIONS + QUESTIONS
    assert len({train_tokenizer(texts, vocab_size=200).to_str() for _ in range(4)}) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=64)


def test_unseen_english_text_needs_no_unk(tok):
    text = "the quick brown zebra jumps over 12 lazy dogs; why? (because!)"
    ids = tok.encode_batch([text], max_len=80)[0]
    assert tok.tokenizer.token_to_id("[UNK]") not in ids
    assert tok.decode(ids) == text


# Captions in a script with thousands of characters, some of them rare: the data a CJK user brings.
CJK = ["一只红色的圆形在蓝色的方形左边", "黄色的三角形", "紫色的菱形和橙色的十字", "a red circle 在左边"] * 40 + \
    [chr(0x4E00 + i) * 2 for i in range(700)]


@pytest.mark.parametrize("vocab_size", [384, 512, 1024])
def test_text_beyond_ascii_stays_within_the_vocab_size_and_never_meets_unk(vocab_size):
    """Before: every character seen was kept (692 ids for vocab_size=256) and unseen ones became [UNK]. Now the rarest
    characters, and characters never seen, are encoded as their UTF-8 bytes and decode back to themselves."""
    tok = TextTokenizer(train_tokenizer(CJK, vocab_size=vocab_size))
    assert tok.vocab_size == vocab_size
    assert tok.tokenizer.token_to_id("<0xE4>") is not None and tok.tokenizer.token_to_id("[UNK]") == 1
    texts = ["一只红色的圆形", "unseen: 丂丂 鿋 𝄞 🙂 ü é ß", "a red circle left of 中"]
    ids = tok.encode_batch(texts, max_len=64)
    assert not (ids == 1).any()
    assert [tok.decode(row) for row in ids] == texts
    # The frequent characters keep tokens of their own; a rare one costs its three bytes.
    assert not any(t.startswith("<0x") for t in tok.tokenizer.encode("黄色的三角形").tokens)
    assert tok.tokenizer.encode("鿋").tokens[-4:-1] == ["<0xE9>", "<0xBF>", "<0x8B>"]


def test_a_small_vocabulary_for_text_beyond_ascii_has_no_byte_tokens_but_keeps_its_size():
    """Below 384 ids the 256 byte tokens do not fit: the most frequent characters are kept, the rest become [UNK]."""
    tok = TextTokenizer(train_tokenizer(CJK, vocab_size=200))
    assert tok.vocab_size == 200 and tok.tokenizer.token_to_id("<0xE4>") is None
    assert tok.decode(tok.encode_batch(["黄色的三角形"], 16)[0]) == "黄色的三角形"


def test_ascii_captions_get_no_byte_tokens(tok):
    assert tok.tokenizer.token_to_id("<0x41>") is None and tok.vocab_size < 256


def test_encode_wraps_in_bos_eos_and_pads_right(tok):
    ids = tok.encode_batch(["a large red circle", "A LARGE RED CIRCLE"], max_len=10)
    assert ids.shape == (2, 10) and ids.dtype == np.int64
    assert (ids[0] == ids[1]).all()  # lowercased
    n = int((ids[0] != tok.pad_id).sum())
    assert ids[0, 0] == 2 and ids[0, n - 1] == 3
    assert (ids[0, n:] == tok.pad_id).all() and n == 6  # [BOS] a large red circle [EOS]


def test_truncation_keeps_the_first_ids(tok):
    long = CAPTIONS[[len(c) for c in CAPTIONS].index(max(len(c) for c in CAPTIONS))]
    full = tok.encode_batch([long], max_len=64)[0]
    cut = tok.encode_batch([long], max_len=5)[0]
    assert cut.shape == (5,) and (cut == full[:5]).all() and cut[-1] != 3
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(["x"], max_len=0)


def test_empty_batch_has_shape_zero_by_max_len(tok):
    assert tok.encode_batch([], max_len=8).shape == (0, 8)


def test_save_load_round_trip(tok, tmp_path):
    path = str(tmp_path / "sub" / "tokenizer.json")
    tok.save(path)
    loaded = TextTokenizer.from_file(path)
    assert loaded.to_str() == tok.to_str()
    assert (loaded.encode_batch(CAPTIONS, 32) == tok.encode_batch(CAPTIONS, 32)).all()
    again = TextTokenizer.from_str(tok.to_str())
    assert (again.encode_batch(QUESTIONS[:20], 16) == tok.encode_batch(QUESTIONS[:20], 16)).all()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(StorageError, match="nope.json"):
        TextTokenizer.from_file(str(tmp_path / "nope.json"))


def _bert_like() -> Tokenizer:
    """A BERT-style WordPiece tokenizer whose [PAD] is not id 0."""
    vocab = {t: i for i, t in enumerate(
        ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "a", "red", "circle", "##s", "left", "of", "blue", "square", ","])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    return tokenizer


def _gpt2_like() -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer: no pad token, <|endoftext|> added last (as in GPT-2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CAPTIONS, trainer=trainer)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


def test_foreign_wordpiece_file_loads_with_its_pad_id(tmp_path):
    path = tmp_path / "bert.json"
    _bert_like().save(str(path))
    tok = TextTokenizer.from_file(str(path))
    assert tok.pad_id == 3
    ids = tok.encode_batch(["A red circles, left of"], max_len=10)
    assert ids.tolist() == [[1, 4, 5, 6, 7, 12, 8, 9, 2, 3]]
    assert tok.decode(ids[0]) == "a red circles, left of"


def test_foreign_byte_level_bpe_file_loads_and_round_trips_any_text(tmp_path):
    path = tmp_path / "gpt2.json"
    _gpt2_like().save(str(path))
    tok = TextTokenizer.from_file(str(path))
    eot = tok.tokenizer.token_to_id("<|endoftext|>")
    assert tok.pad_id == eot and eot == tok.vocab_size - 1 and eot != 0
    texts = ["A Small RED circle!", "ünïcödé and emoji 🙂", CAPTIONS[0]]
    ids = tok.encode_batch(texts, max_len=64)
    assert (ids[:, -1] == eot).all()
    assert [tok.decode(row) for row in ids] == texts


def test_padding_config_decides_pad_id_but_not_the_shape():
    tokenizer = _bert_like()
    tokenizer.enable_padding(pad_id=9, pad_token="of", length=32)
    tokenizer.enable_truncation(max_length=3)
    tok = TextTokenizer(tokenizer)
    assert tok.pad_id == 9
    ids = tok.encode_batch(["a red circle", "a"], max_len=7)
    assert ids.tolist() == [[1, 4, 5, 6, 2, 9, 9], [1, 4, 2, 9, 9, 9, 9]]
    assert '"pad_id":9' in tok.to_str().replace(" ", "")  # the file's own settings are kept


def test_pad_id_defaults_to_zero_without_a_known_pad_token():
    tokenizer = Tokenizer(models.WordLevel({"x": 0, "y": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert TextTokenizer(tokenizer).pad_id == 0
