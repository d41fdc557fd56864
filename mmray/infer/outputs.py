"""The outputs of batch inference: one file per input shard, written whole, and a record of each finished one.

Layout under OUT (local or ``s3://``)::

    OUT/_manifest.json                       what made the outputs: the export (path, weights sha256), the command
    OUT/train__00000.tar.parquet             the rows of input shard train/00000.tar (or .jsonl)
    OUT/_done/train__00000.tar.parquet.json  written after its output: rows, bytes and sha256 of that file

Each output is written atomically (local: temporary name, then rename; S3: one PUT), then its record. On a rerun,
a shard whose record exists and whose output has the recorded size is skipped (see ``OutputDir.plan``); any other
is computed again and overwritten. Names starting with ``_`` or ``.`` are ignored by ``pyarrow.dataset`` discovery, so
``pyarrow.dataset.dataset(OUT)`` reads the outputs and nothing else.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmray import storage
from mmray.config import ConfigError
from mmray.infer import FORMATS

MANIFEST = "_manifest.json"
DONE_DIR = "_done"


def _encode(table: pa.Table, fmt: str) -> bytes:
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()
    return "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode("utf-8")


def float_lists(values: np.ndarray) -> pa.Array:
    """(N, E) float32 -> an Arrow ``list<float32>`` column of N rows, without a Python loop."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return fixed.cast(pa.list_(pa.float32()))


class OutputDir:
    """OUT of one inference command: its manifest, its finished shards and the writing of new ones."""

    def __init__(self, out: str, fmt: str = "parquet"):
        if fmt not in FORMATS:
            raise ConfigError(f"output format {fmt!r} is not supported; allowed values: {', '.join(FORMATS)}")
        self.out, self.fmt = out, fmt

    def file_name(self, name: str) -> str:
        return f"{name}.{self.fmt}"

    def manifest(self) -> dict | None:
        path = storage.join(self.out, MANIFEST)
        return json.loads(storage.read_text(path)) if storage.exists(path) else None

    def claim(self, manifest: dict, same: tuple[str, ...]) -> bool:
        """Write ``manifest``, unless OUT holds outputs made otherwise: the keys ``same`` must match the old one's,
        so that a resumed run never mixes rows of two models (or two tasks) in one OUT. True when OUT had none."""
        old = self.manifest()
        if old is not None:
            changed = [k for k in same if old.get(k) != manifest.get(k)]
            if changed:
                raise ConfigError(f"{self.out} already holds outputs made with different "
                                  + ", ".join(f"{k} ({old.get(k)!r}, now {manifest.get(k)!r})" for k in changed)
                                  + "; write to a new OUT, or delete the old one")
        storage.write_text(storage.join(self.out, MANIFEST), json.dumps(manifest, indent=1))
        return old is None

    def release(self) -> None:
        """Take back a claim that produced nothing (the run failed before its first output), so that OUT is free
        for another export or task."""
        if not self.completed():
            storage.delete(storage.join(self.out, MANIFEST))

    def completed(self) -> dict[str, dict]:
        """``{name: record}`` of the shards whose output is whole (recorded, and of the recorded size)."""
        fs, inner = storage.resolve(self.out)
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            return {}
        sizes = {info.base_name: info.size for info in fs.get_file_info(pafs.FileSelector(inner))
                 if info.type == pafs.FileType.File}
        done_dir = storage.join(self.out, DONE_DIR)
        if fs.get_file_info(storage.resolve(done_dir)[1]).type == pafs.FileType.NotFound:
            return {}
        records = {}
        for path in storage.list_files(done_dir, ".json"):
            record = json.loads(storage.read_text(path))
            if sizes.get(record["file"]) == record["bytes"]:
                records[record["name"]] = record
        return records

    def plan(self, sources: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
        """``(to do, skipped)``: the ``(source, name)`` pairs whose source has no whole output yet, and how many
        have one. Resuming goes by source, so the same shard named from another SRC root is still found; a name
        already taken by another source's output gets a suffix from the source's hash instead of overwriting it."""
        done = self.completed()
        finished = {record["source"] for record in done.values()}
        todo = []
        for source, name in sources:
            if source in finished:
                continue
            if name in done and done[name]["source"] != source:
                name = f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
            todo.append((source, name))
        return todo, len(sources) - len(todo)

    def files(self) -> list[str]:
        """Paths of the outputs of every finished shard, sorted."""
        return sorted(storage.join(self.out, r["file"]) for r in self.completed().values())

    def write(self, name: str, source: str, table: pa.Table, raw_rows: int) -> dict:
        """Write one shard's output, then its record; returns the record."""
        data = _encode(table, self.fmt)
        file = self.file_name(name)
        storage.write_bytes(storage.join(self.out, file), data)
        record = {"name": name, "source": source, "file": file, "rows": table.num_rows, "raw_rows": raw_rows,
                  "bad": raw_rows - table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        storage.write_text(storage.join(self.out, DONE_DIR, f"{file}.json"), json.dumps(record, indent=1))
        return record


class ShardAssembler:
    """Collects result rows per shard from batches that arrive in any order (see mmray.infer.inputs).

    ``add`` returns the shards that became complete with that batch: ``(shard, rows, raw_rows)`` where ``rows``
    holds the non-tally columns of the shard's usable samples, in arrival order.
    """

    TALLY_COLUMNS = ("tally", "n_raw", "n_total")

    def __init__(self, shards: list[str]):
        self.parts: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in shards}
        self.seen = dict.fromkeys(shards, 0)
        self.total: dict[str, int | None] = dict.fromkeys(shards)

    def add(self, batch: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray], int]]:
        tally = batch["tally"].astype(bool)
        columns = [k for k in batch if k not in self.TALLY_COLUMNS]
        touched = []
        for shard in dict.fromkeys(batch["shard"]):
            mine = batch["shard"] == shard
            samples = mine & ~tally
            if samples.any():
                self.parts[shard].append({k: batch[k][samples] for k in columns})
            for i in np.flatnonzero(mine & tally):
                self.seen[shard] += int(batch["n_raw"][i])
                if batch["n_total"][i] >= 0:
                    self.total[shard] = int(batch["n_total"][i])
            touched.append(shard)
        complete = []
        for shard in touched:
            total = self.total[shard]
            if total is not None and self.seen[shard] > total:
                raise RuntimeError(f"{shard}: {self.seen[shard]} rows seen but the shard has {total}")
            if total is not None and self.seen[shard] == total:
                parts = self.parts.pop(shard)
                rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
                complete.append((shard, rows, total))
                self.seen.pop(shard)
        return complete

    def pending(self) -> list[str]:
        """Shards not complete yet; empty once the stream is drained, unless rows went missing."""
        return list(self.seen)
