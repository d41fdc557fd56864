"""Text tokenization: train a small subword tokenizer on captions, or load any Hugging Face ``tokenizer.json``.

The model only ever sees fixed-length int64 id arrays, so ``TextTokenizer.encode_batch`` is the one contract the
rest of the code relies on: right padding with ``pad_id``, truncation to ``max_len``. The tokenizer file travels
with the data set (``DEST/tokenizer.json``) so that training and evaluation always agree on the ids.
"""
from __future__ import annotations

import json
import math
import string
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmray import storage

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # in id order: [PAD] is 0
BASE_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
MIN_VOCAB_SIZE = 128  # the base alphabet, the special tokens and room for merges
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # byte fallback for text beyond ASCII (SentencePiece's names)
# Pad token names used by common tokenizer families, in the order pad_id looks for them.
PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")


def qa_text(value) -> str:
    """A question or answer of a sample's ``qa`` metadata as text: a string as it is (stripped); a number as VQA-style
    JSON often holds counts (``"answer": 3`` -> "3"); a boolean as yes / no; anything else (a list, an object,
    null) as "" (not usable)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return value.strip() if isinstance(value, str) else ""


def qa_entries(meta: dict) -> list[dict]:
    """The question-answer objects of a sample's metadata: its ``qa`` list (the shapes set's form: ``[{"question",
    "answer", "type"}, ...]``), or else one pair from top-level ``question`` / ``answer`` fields, the form of a CSV
    or JSONL index with those columns (an index row's other fields are its metadata)."""
    qa = meta.get("qa")
    if isinstance(qa, list):
        return [q for q in qa if isinstance(q, dict)]
    return [{k: meta[k] for k in ("question", "answer", "type") if k in meta}] if "question" in meta else []


def sample_texts(caption: str, meta: dict) -> list[str]:
    """The text one sample gives the tokenizer: its caption, and the questions and answers of its metadata
    (:func:`qa_entries`)."""
    return [caption] + [f"{qa_text(q.get('question'))} {qa_text(q.get('answer'))}".strip() for q in qa_entries(meta)]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a lowercase BPE tokenizer that wraps every text as ``[BOS] ... [EOS]``, with at most ``vocab_size`` ids.

    Why this recipe: Hugging Face's BPE trainer is deterministic (its WordPiece and Unigram trainers are not, and
    neither is BPE with a continuing-subword prefix), so the same captions always give the same tokenizer.json.
    The Metaspace pre-tokenizer keeps word boundaries in the tokens (``▁red``), so decode(encode(text)) gives back
    the normalized text exactly, punctuation spacing included; punctuation is split off so ``circle?`` reuses
    ``▁circle``. Lowercase ASCII letters, digits and punctuation are always in the alphabet, so English text never
    meets [UNK]. ``vocab_size`` is an upper bound: a small vocabulary stops growing once every word is one token.

    Text beyond ASCII (accents, Cyrillic, CJK, emoji): the tokenizer gets the 256 byte tokens ``<0x00>``..``<0xFF>``
    (SentencePiece's byte fallback, as in Llama), and a character outside the learned alphabet, seen in training or
    not, is encoded as its UTF-8 bytes instead of [UNK], and decodes back to itself. The byte tokens count against
    ``vocab_size`` (from :data:`MIN_VOCAB_SIZE` + 256 = 384 on; below that there are none). Characters compete for
    the rest: the most frequent ones get their own token (``limit_alphabet``), so a script with thousands of
    characters cannot grow the vocabulary past ``vocab_size``. A tokenizer trained on ASCII text alone has no byte
    tokens (it stays as small as the captions need), and maps any other character to [UNK].
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    texts = texts if isinstance(texts, list) else list(texts)
    byte_fallback = vocab_size >= MIN_VOCAB_SIZE + len(BYTE_TOKENS) and not all(text.isascii() for text in texts)
    learned = vocab_size - (len(BYTE_TOKENS) if byte_fallback else 0)
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=learned, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list(BASE_ALPHABET), show_progress=False,
                                  limit_alphabet=learned - len(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if byte_fallback:
        tokenizer = _with_byte_fallback(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))],
    )
    return tokenizer


def _with_byte_fallback(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` with the 256 byte tokens appended to its BPE vocabulary (the trained ids keep their values),
    ``byte_fallback`` on, and a decoder that turns runs of byte tokens back into their characters."""
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for token in BYTE_TOKENS:
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    spec["model"]["byte_fallback"] = True
    out = Tokenizer.from_str(json.dumps(spec))
    out.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return out


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the fixed-length batch encoding the model needs.

    Any tokenizer.json works (WordPiece, BPE, byte-level BPE, Unigram). Its own padding and truncation settings are
    kept in the file but ignored when encoding: ``encode_batch`` always pads and truncates to the ``max_len`` asked.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._encoder = Tokenizer.from_str(tokenizer.to_str())  # a copy whose padding/truncation we may switch off
        self._encoder.no_padding()
        self._encoder.no_truncation()
        self.pad_id = _detect_pad_id(tokenizer)

    @classmethod
    def from_str(cls, json_str: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(json_str))

    @classmethod
    def from_file(cls, path: str) -> TextTokenizer:
        """Load a tokenizer.json from a local path or an ``s3://`` URI; a file that is not one names its path."""
        text = storage.read_text(path)
        try:
            return cls.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON or unknown models
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None

    def to_str(self) -> str:
        return self._tokenizer.to_str()

    def save(self, path: str) -> None:
        """Write tokenizer.json to a local path or an ``s3://`` URI."""
        storage.write_text(path, self.to_str())

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the size an embedding table needs."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Ids of shape (len(texts), max_len), int64, right-padded with ``pad_id``.

        Longer texts are cut to their first ``max_len`` ids, so a truncated text loses its final special token
        (e.g. [EOS]): the model is not taught that a sentence ends where it was merely cut.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        out = np.full((len(texts), max_len), self.pad_id, dtype=np.int64)
        # encode_batch_fast (tokenizers >= 0.20) gives the same ids without tracking character offsets: ~15% faster
        encode = getattr(self._encoder, "encode_batch_fast", self._encoder.encode_batch)
        for row, encoding in enumerate(encode(list(texts))):
            ids = encoding.ids[:max_len]
            out[row, :len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text for one id sequence, without trailing padding and without special tokens."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        while ids and ids[-1] == self.pad_id:
            ids.pop()
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def _detect_pad_id(tokenizer: Tokenizer) -> int:
    """The padding config's pad id if there is one, else the first known pad token present, else 0."""
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in PAD_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0
