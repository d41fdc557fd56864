"""The Ray Data input pipeline: stream WebDataset shards -> decode, resize, normalise, tokenize -> per-worker batches.

Batch schema (numpy, one row per sample), produced by :class:`Preprocess` and consumed by mmray.train.loop:

    image     float32 (N, 3, S, S)  RGB scaled to [-1, 1], S = data.image_size
    text_ids  int64   (N, T)        token ids, right-padded with the tokenizer's pad id, T = data.max_text_len
    caption   object  (N,)          the caption text (retrieval counts a hit when texts are equal)
    key       object  (N,)          the sample key inside its shard
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from mmray import storage
from mmray.config import Config
from mmray.data.tokenizer import TextTokenizer

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadSampleError(ValueError):
    """A sample in a shard cannot be decoded; the message names the sample key."""


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> TextTokenizer:
    # Map tasks receive the tokenizer as a JSON string; parse it once per worker process.
    return TextTokenizer.from_str(tokenizer_json)


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


class Preprocess:
    """Raw WebDataset rows (bytes per member) -> model-ready rows (see the module docstring)."""

    def __init__(self, tokenizer_json: str, image_size: int, max_text_len: int):
        self.tokenizer_json = tokenizer_json
        self.image_size = image_size
        self.max_text_len = max_text_len

    def _image(self, data: bytes, key: str) -> np.ndarray:
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as e:  # PIL raises several types for truncated or non-image bytes
            raise BadSampleError(f"sample {key!r}: image cannot be decoded ({e})") from None
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)           # (3, S, S) in [0, 255]
        return arr / 127.5 - 1.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [_as_text(k) for k in batch["__key__"]]
        image_col = next((c for c in IMAGE_EXTENSIONS if c in batch), None)
        if image_col is None or "txt" not in batch:
            raise BadSampleError(f"shard rows have members {sorted(batch)}; expected an image "
                                 f"({'/'.join(IMAGE_EXTENSIONS)}) and a txt caption")
        captions = [_as_text(t).strip() for t in batch["txt"]]
        images = np.stack([self._image(data, key) for data, key in zip(batch[image_col], keys)])
        ids = _tokenizer(self.tokenizer_json).encode_batch(captions, self.max_text_len)
        return {"image": images, "text_ids": ids, "caption": np.array(captions, dtype=object),
                "key": np.array(keys, dtype=object)}


def shard_paths(root: str, split: str) -> list[str]:
    """The ``.tar`` shards of one split of a prepared data set, sorted; a clear error when there are none."""
    paths = [p for p in storage.list_files(storage.join(root, split)) if p.endswith(".tar")]
    if not paths:
        raise storage.StorageError(f"no .tar shards under {storage.join(root, split)}")
    return paths


def read_split(paths: list[str], cfg: Config, tokenizer: TextTokenizer, shuffle_seed: int | None = None):
    """A lazily-evaluated, streaming Ray Dataset over the given shards, preprocessed into the batch schema."""
    import ray.data
    from ray.data import FileShuffleConfig

    fs, _ = storage.resolve(paths[0])
    ds = ray.data.read_webdataset(
        [storage.resolve(p)[1] for p in paths],
        filesystem=fs,
        decoder=None,  # raw member bytes; Preprocess decodes (and names the sample when it cannot)
        shuffle=FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None,
    )
    return ds.map_batches(Preprocess(tokenizer.to_str(), cfg.data.image_size, cfg.data.max_text_len),
                          batch_size=256, batch_format="numpy")
