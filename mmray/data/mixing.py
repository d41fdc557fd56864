"""Mixing several sources with weights, deterministic for a seed.

``data.source: "s3://b/laion/::s3://b/cc12m/"`` with ``data.source_weights: "1::2.5"``: one weight per ``::`` part,
with the meaning of OpenCLIP's ``--train-data-upsampling-factors``: a weight is how many times, per epoch, each
sample of that part is used, relative to the part's own size. Weight 1 uses every sample once, 2.5 uses each twice
and half of them a third time, 0.25 uses a quarter of them, 0 leaves the part out. An epoch of parts with n_i
samples and weights w_i holds about sum(w_i * n_i) samples, part i's share being w_i * n_i / sum(w_j * n_j); for a
70/30 mix of two parts, pick w_i proportional to share_i / n_i (the counts are in each shard's ``_stats.json``; the
training log prints the resulting mix).

The choice is per sample, not per block: copy c of a sample is kept when c < floor(w), and copy floor(w) when a hash
of (seed, shard file name, key) falls below the fractional part of w. So integer weights give exact counts, the
same seed gives the same samples whatever the block order, the number of workers or the epoch, and each copy has
its own key (``KEY~1``, ``KEY~2``, ...) so that keys stay unique within an epoch. Mixing happens in one read of all
parts' shards (files shuffled together by Ray Data's file shuffle, then rows within windows of each shard, see
mmray.data.position), so batches mix the parts throughout the epoch rather than one part after another.
"""
from __future__ import annotations

import hashlib
import math
import posixpath

import numpy as np

from mmray.data.sources import PART_SEPARATOR, SourceError

COPY_SEPARATOR = "~"


def parse_weights(text: str, n_parts: int) -> list[float]:
    """``"1::2.5"`` -> ``[1.0, 2.5]``; empty means 1 for every part. SourceError names the problem."""
    if not text.strip():
        return [1.0] * n_parts
    items = [w.strip() for w in str(text).split(PART_SEPARATOR)]
    if len(items) != n_parts:
        raise SourceError(f"{len(items)} weight(s) {text!r} for {n_parts} source part(s); give one weight per "
                          "'::' part of data.source, e.g. '1::0.5'")
    weights = []
    for item in items:
        try:
            weight = float(item)
        except ValueError:
            raise SourceError(f"weight {item!r} in {text!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise SourceError(f"weight {item!r} in {text!r} must be a finite number >= 0")
        weights.append(weight)
    if not any(weights):
        raise SourceError(f"weights {text!r} are all 0: nothing would be read")
    return weights


def _uniform(seed: int, shard: str, key: str) -> float:
    """A number in [0, 1) fixed by (seed, shard file name, key): the same on every worker, run and epoch."""
    digest = hashlib.blake2b(f"{seed}\0{posixpath.basename(shard)}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def copies(weight: float, seed: int, shard: str, key: str) -> int:
    """How many times a sample is used per epoch under ``weight``."""
    whole, frac = divmod(weight, 1.0)
    return int(whole) + (frac > 0 and _uniform(seed, shard, key) < frac)


class Resample:
    """Raw rows (mmray.data.reader.RAW_SCHEMA) -> each row repeated or dropped by its shard's weight.

    ``weights`` maps a shard path as the reader reports it (its ``shard`` column) to the weight of its part."""

    def __init__(self, weights: dict[str, float], seed: int):
        self.weights, self.seed = weights, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        take, keys = [], []
        for i, (shard, key) in enumerate(zip(batch["shard"], batch["key"])):
            for copy in range(copies(self.weights[shard], self.seed, shard, key)):
                take.append(i)
                keys.append(key if copy == 0 else f"{key}{COPY_SEPARATOR}{copy}")
        index = np.asarray(take, dtype=np.int64)
        out = {name: column[index] for name, column in batch.items()}
        out["key"] = np.asarray(keys, dtype=object)
        return out
