"""The Ray Data input pipeline: stream shards -> decode, resize, normalise, tokenize -> per-worker batches.

Batch schema (numpy, one row per sample), produced by :class:`Preprocess` and consumed by mmray.train.loop:

    image     float32 (N, 3, S, S)  RGB scaled to [-1, 1], S = data.image_size
    text_ids  int64   (N, T)        token ids, right-padded with the tokenizer's pad id, T = data.max_text_len
    caption   object  (N,)          the caption text (retrieval counts a hit when texts are equal)
    key       object  (N,)          the sample key inside its shard

Bad samples (undecodable or oversized images, missing or non-UTF-8 captions, members without their pair, truncated
shards) are dropped per sample, never per block, and counted by reason in a :class:`DataQuality` actor; the trainer
reports the counts and stops the run when their fraction exceeds ``data.max_bad_fraction``.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter
from functools import lru_cache

import numpy as np
from PIL import Image

from mmray import storage
from mmray.config import Config
from mmray.data.tokenizer import TextTokenizer

# Images above this many pixels are refused before decoding (a decompression bomb costs memory, not just time).
MAX_IMAGE_PIXELS = 8192 * 8192
EXAMPLES_PER_REASON = 5


class BadDataError(ValueError):
    """The data set is unusable (too many bad samples, no shards); the message names the reason and examples."""


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> TextTokenizer:
    # Map tasks receive the tokenizer as a JSON string; parse it once per worker process.
    return TextTokenizer.from_str(tokenizer_json)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded bytes -> float32 (3, size, size) in [-1, 1]. Raises ValueError with a short reason on bad input.

    JPEGs are decoded in draft mode (DCT scaling) straight to the smallest scale at least ``size``, which is much
    cheaper than a full decode followed by a resize.
    """
    if not data:
        raise ValueError("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError("image_too_large")
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = img.convert("RGB")
    except ValueError as e:
        if str(e) == "image_too_large":
            raise
        raise ValueError("corrupt_image") from None
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for truncated or non-images
        raise ValueError("corrupt_image") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def decode_caption(data: bytes | None) -> str:
    """Raw caption bytes -> stripped text; ValueError with a short reason when missing, empty or not UTF-8."""
    if data is None:
        raise ValueError("missing_caption")
    try:
        text = bytes(data).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("non_utf8_caption") from None
    if not text:
        raise ValueError("empty_caption")
    return text


class DataQuality:
    """A Ray actor that totals good and bad samples (by reason, with example keys) across all preprocessing tasks."""

    def __init__(self):
        self.good = 0
        self.bad: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, good: int, bad: dict[str, list[str]]) -> None:
        self.good += good
        for reason, keys in bad.items():
            self.bad[reason] += len(keys)
            kept = self.examples.setdefault(reason, [])
            kept.extend(keys[:EXAMPLES_PER_REASON - len(kept)])

    def snapshot(self) -> dict:
        return {"good": self.good, "bad": dict(self.bad), "bad_examples": dict(self.examples)}


def quality_snapshot(quality, attempts: int = 5) -> dict:
    """The counts so far; retried because a busy actor can be briefly unreachable (ActorUnavailableError)."""
    import time

    import ray

    for attempt in range(attempts):
        try:
            return ray.get(quality.snapshot.remote(), timeout=60)
        except ray.exceptions.ActorUnavailableError:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


def check_quality(snapshot: dict, max_bad_fraction: float) -> None:
    """Raise BadDataError when the bad fraction so far exceeds the limit; the message names reasons and examples."""
    bad = sum(snapshot["bad"].values())
    total = bad + snapshot["good"]
    if total and bad / total > max_bad_fraction:
        raise BadDataError(
            f"{bad} of {total} samples ({bad / total:.1%}) are bad, over data.max_bad_fraction={max_bad_fraction}: "
            f"{snapshot['bad']}; examples: {snapshot['bad_examples']}")


class Preprocess:
    """Raw rows (see mmray.data.reader.RAW_SCHEMA) -> model-ready rows; bad samples are dropped and counted."""

    def __init__(self, tokenizer_json: str | None, image_size: int, max_text_len: int, quality=None):
        self.tokenizer_json = tokenizer_json  # None: no tokenization (data inspection)
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.quality = quality  # a DataQuality actor handle, or None to skip reporting

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, captions, keys = [], [], []
        bad: dict[str, list[str]] = {}
        for key, shard, image, caption, error in zip(batch["key"], batch["shard"], batch["image"], batch["caption"],
                                                     batch["error"]):
            try:
                if error:
                    raise ValueError(error.split(":")[0])
                text = decode_caption(caption)
                images.append(decode_image(image, self.image_size))
            except ValueError as e:
                bad.setdefault(str(e), []).append(f"{shard}:{key}")
                continue
            captions.append(text)
            keys.append(key)
        if self.quality is not None:
            self.quality.add.remote(len(keys), bad)
        size = self.image_size
        out = {"image": np.stack(images) if images else np.zeros((0, 3, size, size), np.float32),
               "caption": np.array(captions, dtype=object), "key": np.array(keys, dtype=object)}
        if self.tokenizer_json is not None:
            out["text_ids"] = (_tokenizer(self.tokenizer_json).encode_batch(captions, self.max_text_len) if captions
                               else np.zeros((0, self.max_text_len), np.int64))
        return out


SHARD_SUFFIXES = (".tar", ".parquet")


def list_shards(directory: str) -> list[str]:
    """The ``.tar`` / ``.parquet`` shards directly under ``directory``, sorted (other files, e.g. stats, skipped)."""
    return [p for p in storage.list_files(directory) if p.endswith(SHARD_SUFFIXES)]


def shard_paths(root: str, split: str) -> list[str]:
    """The shards of one split of a prepared data set, sorted; a clear error when there are none."""
    paths = list_shards(storage.join(root, split))
    if not paths:
        raise storage.StorageError(f"no .tar or .parquet shards under {storage.join(root, split)}")
    return paths


def read_raw(paths: list[str], shuffle_seed: int | None = None):
    """A lazily-evaluated, streaming Ray Dataset of raw samples (mmray.data.reader.RAW_SCHEMA) from the shards."""
    import ray.data
    from ray.data import FileShuffleConfig

    from mmray.data.reader import ShardDatasource

    fs, _ = storage.resolve(paths[0])
    source = ShardDatasource([storage.resolve(p)[1] for p in paths], filesystem=fs,
                             shuffle=FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None)
    return ray.data.read_datasource(source)


def read_split(paths: list[str], cfg: Config, tokenizer: TextTokenizer, shuffle_seed: int | None = None,
               quality=None):
    """Raw samples preprocessed into the batch schema, streaming."""
    return read_raw(paths, shuffle_seed).map_batches(
        Preprocess(tokenizer.to_str(), cfg.data.image_size, cfg.data.max_text_len, quality),
        batch_size=256, batch_format="numpy")
