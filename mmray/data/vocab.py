"""`mmray data tokenizer`: train a tokenizer on the text of shards that came without one.

Shards written by other tools (img2dataset's LAION / CC12M downloads, webdataset's ShardWriter, Parquet exports)
carry captions but no tokenizer, and training needs one (``data.tokenizer``). This streams the training text of a
source through the real reader (the same source forms and reading keys as ``data.source``), and trains the same
BPE tokenizer as `mmray data prepare` (:func:`mmray.data.tokenizer.train_tokenizer`) on it.

A prepared data set contributes its ``train/`` split only, so held-out text stays unseen. Images are read but not
decoded. Samples whose caption is missing, empty or not UTF-8, or whose shard is damaged, are skipped and counted by
reason, as training would count them.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import pyarrow.fs as pafs

from mmray import storage
from mmray.data.pipeline import DataQuality, decode_caption, decode_meta, ray_running, read_raw
from mmray.data.sources import split_shards
from mmray.data.tokenizer import MIN_VOCAB_SIZE, TextTokenizer, sample_texts, train_tokenizer

DEFAULT_MAX_SAMPLES = 1_000_000  # ~100 MB of captions: BPE merges settle long before a web-scale data set ends
PROGRESS_EVERY = 50_000


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse, before hours of reading, an OUT that the tokenizer could not be written to (or must not be)."""
    fs, path = storage.resolve(out)  # S3: bucket/key; local: the absolute path
    if storage.is_s3(out):
        bucket, _, key = path.partition("/")
        if not key or out.endswith("/"):
            raise ValueError(f"{out} names a bucket or prefix; OUT must name the file "
                             f"(e.g. s3://{bucket}/tokenizer.json)")
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ValueError(f"bucket {bucket!r} of {out} does not exist")
    else:
        if os.path.isdir(path):
            raise ValueError(f"{out} is a directory; OUT must name the file "
                             f"(e.g. {os.path.join(out, 'tokenizer.json')})")
        parent = os.path.dirname(path)
        while not os.path.exists(parent):  # storage creates the missing folders: the nearest existing one decides
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"cannot write {out}: {parent} is not a writable folder")
    if not overwrite and storage.exists(out):
        raise ValueError(f"{out} already exists; choose another path or pass --overwrite to replace it")


def _rows(ds) -> Iterator[tuple]:
    """(key, shard, caption, meta, error) of each raw sample of ``ds``, in order."""
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        yield from zip(batch["key"], batch["shard"], batch["caption"], batch["meta"], batch["error"])


def train_from_shards(src: str, out: str, vocab_size: int = 512, max_samples: int = DEFAULT_MAX_SAMPLES,
                      reader: dict | None = None, allow_missing: bool = False, overwrite: bool = False,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Train a tokenizer on the text of the first ``max_samples`` usable samples of ``src`` (0: all of them, in
    shard order) and write it to ``out`` (a local path or ``s3://`` URI). Returns the summary that the command
    prints. ValueError names a bad argument or an ``out`` that exists (unless ``overwrite``) before anything is
    read; the source's own problems (no shards, a missing shard) raise what ``data.source`` would."""
    import ray
    import ray.data

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    if max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0 (0: every sample), got {max_samples}")
    _check_out(out, overwrite)
    paths = split_shards(src, "train", allow_missing)

    quality = DataQuality()  # in-process: no task decodes here, this loop is the one that sees each sample
    texts: list[str] = []
    used, capped = 0, False
    t0 = time.perf_counter()
    with ray_running():
        options = ray.data.DataContext.get_current().execution_options
        kept, options.preserve_order = options.preserve_order, True  # "the first N": the same set on every run
        try:
            ds = read_raw(paths, **(reader or {})).select_columns(["key", "shard", "caption", "meta", "error"])
            for key, shard, caption, meta, error in _rows(ds):
                if max_samples and used == max_samples:  # capped only when something is left unread
                    capped = True
                    break
                try:
                    if error:
                        raise ValueError(error.split(":")[0])
                    texts += sample_texts(decode_caption(caption), decode_meta(meta))
                except ValueError as e:
                    quality.add(0, {str(e): [f"{shard}:{key}"]})
                    continue
                used += 1
                if progress and used % PROGRESS_EVERY == 0:
                    progress(f"{used} samples read for the tokenizer")
        finally:
            options.preserve_order = kept  # the caller's, for its own reads
    snap = quality.snapshot()
    read_s = time.perf_counter() - t0
    if not texts:
        raise ValueError(f"{src} has no usable caption to train a tokenizer on (skipped: {snap['bad'] or 'none'})")
    if progress:
        progress(f"read {used} samples in {read_s:.0f} s; training the tokenizer on their {len(texts)} texts")
    tokenizer = TextTokenizer(train_tokenizer(texts, vocab_size=vocab_size))
    try:
        tokenizer.save(out)
    except OSError as e:  # checked before reading, but storage can still refuse (permissions, a vanished bucket)
        raise ValueError(f"cannot write the tokenizer to {out}: {e}") from None
    if progress:
        progress(f"tokenizer: {tokenizer.vocab_size} tokens from {used} samples -> {out}")
    return {"tokenizer": out, "vocab_size": tokenizer.vocab_size, "samples": used, "texts": len(texts),
            "capped": capped, "bad": snap["bad"], "bad_examples": snap["bad_examples"], "shards": len(paths),
            "samples_per_s": round((used + sum(snap["bad"].values())) / max(read_s, 1e-9), 1)}
