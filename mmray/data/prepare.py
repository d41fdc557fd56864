"""Prepare a training-ready data set: WebDataset shards for train and val, a tokenizer, and a manifest.

Layout under DEST (local or ``s3://``)::

    DEST/train/00000.tar, 00000_stats.json, 00001.tar, ...   (or 00000.parquet, ... for --format parquet)
    DEST/val/00000.tar, 00000_stats.json, ...
    DEST/tokenizer.json
    DEST/dataset.json      written last: its presence means the data set is complete

``dataset.json`` holds, per split, the sample and shard counts and every shard file with its sample count and the
sha256 of its bytes: ``"train": {"samples": N, "shards": K, "files": [{"path": "train/00000.tar", "samples": 1000,
"sha256": "..."}, ...]}``.

This module writes the built-in synthetic generator; :mod:`mmray.data.ingest` writes the same layout from a folder of
images with captions or a CSV/JSONL index. The output is a pure function of the arguments (save the timings in
``*_stats.json``): same seed, same bytes.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable

from mmray import storage
from mmray.data import shapes
from mmray.data.sources import SHARD_SUFFIXES, STATS_SUFFIX, UNSTREAMABLE_TARS
from mmray.data.tokenizer import MIN_VOCAB_SIZE, TextTokenizer, sample_texts, train_tokenizer
from mmray.data.webdataset import ShardInfo, ShardWriter, shard_name

SOURCES = {"synthetic:shapes": "images of 1-3 coloured shapes with captions and QA pairs"}
MANIFEST = "dataset.json"
TOKENIZER = "tokenizer.json"
MIN_VAL_SAMPLES = 256


SYNTHETIC_PREFIX = "synthetic:"


def is_generator(spec: str) -> bool:
    """True for a built-in generator spec such as ``synthetic:shapes`` (as opposed to a folder or index file)."""
    return spec.startswith(SYNTHETIC_PREFIX)


def parse_source(spec: str) -> str:
    """Validate a data source spec and return it.

    A source is a built-in generator (``synthetic:shapes``), or a folder of images with captions or a ``.csv`` /
    ``.jsonl`` index (local or ``s3://``, see :mod:`mmray.data.ingest`). Raises ValueError naming the problem: an
    unknown generator, or a path that does not exist.
    """
    supported = ", ".join(f"{name} ({what})" for name, what in SOURCES.items())
    if is_generator(spec):
        if spec not in SOURCES:
            raise ValueError(f"unknown data source {spec!r}; supported generators: {supported}")
        return spec
    from mmray.data.ingest import find_source

    try:
        find_source(spec)
    except ValueError as e:
        raise ValueError(f"{e}. A data source is a generator ({supported}), a folder of images with .txt captions, "
                         "or a .csv / .jsonl index of image paths and captions (local or s3://)") from None
    return spec


def is_prepared(dest: str) -> bool:
    """True if a complete data set is at ``dest`` (its manifest, written last, exists)."""
    return storage.exists(storage.join(dest, MANIFEST))


def default_val_samples(samples: int) -> int:
    """10% of the samples, at least 256 for stable metrics, but never more than half the samples."""
    return min(max(MIN_VAL_SAMPLES, samples // 10), samples // 2)


def _check_args(samples: int, val_samples: int, samples_per_shard: int, image_size: int, vocab_size: int) -> None:
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if not 0 <= val_samples < samples:
        raise ValueError(f"val_samples must be in [0, samples) = [0, {samples}), got {val_samples}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if image_size < shapes.MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {shapes.MIN_IMAGE_SIZE}, got {image_size}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")


def _write_split(dest_dir: str, indices: range, seed: int, image_size: int, samples_per_shard: int,
                 report: Callable[[ShardInfo], None]) -> tuple[list[ShardInfo], list[str]]:
    """Generate and write the samples ``indices``; returns the shards written and the texts seen (for the
    tokenizer)."""
    texts: list[str] = []
    with ShardWriter(dest_dir, samples_per_shard, on_shard=report) as writer:
        for index in indices:
            sample = shapes.generate_sample(seed, index, image_size)
            meta = {"seed": seed, "index": index, "objects": sample.objects, "qa": sample.qa}
            writer.write(sample.image, sample.caption, meta)
            texts += sample_texts(sample.caption, meta)
    return writer.shards, texts


def _shard_reporter(say: Callable[[str], None], split: str, samples: int,
                    samples_per_shard: int) -> Callable[[ShardInfo], None]:
    """A ShardWriter callback that turns each finished shard into one progress line."""
    total = math.ceil(samples / samples_per_shard)

    def report(info: ShardInfo) -> None:
        done = min(samples, (info.shard_id + 1) * samples_per_shard)
        say(f"{split}: shard {info.shard_id + 1}/{total} written ({done}/{samples} samples)")

    return report


# A numbered shard in any form the reader knows (compressed tars too, and those it refuses), or its stats
_SHARD_FILE = re.compile(r"^(\d+)(" + "|".join(map(re.escape, (*SHARD_SUFFIXES, *UNSTREAMABLE_TARS, STATS_SUFFIX)))
                         + ")$", re.IGNORECASE)  # 00005.TAR is a shard the readers would list too


def remove_stale_shards(dest_dir: str, shards: int, suffix: str = ".tar") -> None:
    """Delete the shard files an earlier run left that this one did not write: numbered ``shards`` and up, and any
    numbered shard of the other format (``suffix`` is this run's: ``.tar`` or ``.parquet``), so a listing is exact."""
    if not storage.exists(dest_dir):
        return
    keep = {shard_name(i) for i in range(shards)}
    for path in storage.list_files(dest_dir):
        match = _SHARD_FILE.match(path.rsplit("/", 1)[-1])
        # (a name this run wrote, in another case, is this run's file on a file system that ignores case: kept)
        if match and (match.group(1) not in keep or match.group(2).lower() not in (suffix, "_stats.json")):
            storage.delete(path)


def split_manifest(split: str, shards: list[ShardInfo]) -> dict:
    """A split's entry in dataset.json: sample and shard counts, and each shard file (its path relative to the data
    set, with ``/``) with its sample count and the sha256 of its bytes."""
    files = [{"path": f"{split}/{info.path.rsplit('/', 1)[-1]}", "samples": info.count, "sha256": info.sha256}
             for info in shards]
    return {"samples": sum(info.count for info in shards), "shards": len(shards), "files": files}


def prepare_synthetic(dest: str, samples: int, seed: int = 0, val_samples: int | None = None,
                      samples_per_shard: int = 1000, image_size: int = 64, vocab_size: int = 512,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Generate the shapes data set into ``dest`` and return a summary.

    ``samples`` is the total; validation takes ``val_samples`` of them (default: ``default_val_samples``).
    Training samples are generator indices [0, n_train), validation [n_train, samples): disjoint and reproducible.
    The tokenizer is trained on training text only (captions, questions and answers), so validation stays unseen.
    """
    started = time.perf_counter()
    n_val = default_val_samples(samples) if val_samples is None else val_samples
    _check_args(samples, n_val, samples_per_shard, image_size, vocab_size)
    n_train = samples - n_val
    say = progress or (lambda message: None)
    manifest_path = storage.join(dest, MANIFEST)
    storage.delete(manifest_path)  # while we rewrite, the data set is not complete

    splits = {}
    for split, indices in (("train", range(n_train)), ("val", range(n_train, samples))):
        split_dir = storage.join(dest, split)
        report = _shard_reporter(say, split, len(indices), samples_per_shard)
        shards, texts = _write_split(split_dir, indices, seed, image_size, samples_per_shard, report)
        remove_stale_shards(split_dir, len(shards))
        splits[split] = {"entry": split_manifest(split, shards), "texts": texts}

    tokenizer = TextTokenizer(train_tokenizer(splits["train"]["texts"], vocab_size=vocab_size))
    tokenizer.save(storage.join(dest, TOKENIZER))
    say(f"tokenizer: {tokenizer.vocab_size} tokens")

    manifest = {
        "name": "synthetic:shapes",
        "format": "webdataset",
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "train": splits["train"]["entry"],
        "val": splits["val"]["entry"],
        "tokenizer": TOKENIZER,
    }
    storage.write_text(manifest_path, json.dumps(manifest, indent=2))
    return {
        "dest": dest,
        "train_samples": n_train,
        "val_samples": n_val,
        "train_shards": splits["train"]["entry"]["shards"],
        "val_shards": splits["val"]["entry"]["shards"],
        "tokenizer": storage.join(dest, TOKENIZER),
        "wall_s": round(time.perf_counter() - started, 3),
    }
