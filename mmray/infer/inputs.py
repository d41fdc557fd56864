"""The inputs of batch inference: which shards SRC names, and how their samples reach the model.

Samples are read by mmray's shard reader and decoded by the training pipeline's :class:`Preprocess`, so a sample
that training would skip is skipped here too, and counted by reason in the same :class:`DataQuality` actor.

Outputs are written per input shard, which needs to know when every sample of a shard has gone through the
pipeline, even though Ray Data streams blocks out of order and drops bad samples. So the reader appends one
end-of-shard row to each shard (its ``error`` says how many rows the shard had), and :class:`Decode` turns each
batch into the usable samples plus one *tally* row per shard: how many raw rows of that shard the batch held and,
when the end-of-shard row was among them, the shard's total. A shard is complete when its tallies add up.

Batch schema of :class:`Decode` (numpy, one row per usable sample or tally):

    ...       the columns of mmray.data.pipeline.Preprocess that the command keeps (see :class:`Rows`), e.g.
              image (N, S, S, 3), text_ids (N, T), caption, key; zeros or "" in tally rows
    shard     object  (N,)          the shard's path as the reader names it (inside its filesystem)
    tally     bool    (N,)          True for tally rows
    n_raw     int64   (N,)          tally rows: raw rows of the shard in this batch (good and bad); else 0
    n_total   int64   (N,)          tally rows: the shard's row count if its end was in this batch, else -1
"""
from __future__ import annotations

import json
import posixpath
from typing import Iterator

import numpy as np
import pyarrow as pa

from mmray import storage
from mmray.data.inspect import find_shards
from mmray.data.pipeline import Preprocess, decode_meta
from mmray.data.reader import RAW_SCHEMA, ShardDatasource
from mmray.data.sources import NoShards, image_files, is_dir, is_shard

END_OF_SHARD = "end_of_shard"


def _relative_name(path: str, root: str) -> str:
    """``root/train/00000.tar`` -> ``train__00000.tar``: a flat, unique output name that says where it came from."""
    rel = posixpath.relpath(path.replace("\\", "/"), root.replace("\\", "/").rstrip("/"))
    return rel.replace("/", "__") if not rel.startswith("..") else posixpath.basename(path)


STAGED = "_staged"  # under OUT: folders and CSV/JSONL indexes written as shards (mmray.data.ingest)


def _needs_staging(src: str) -> bool:
    """A folder of images with captions, or a .csv / .jsonl index, rather than shards or a prepared data set."""
    if is_shard(src):
        return False
    if not is_dir(src):
        return src.lower().endswith((".csv", ".jsonl"))
    try:
        find_shards(src)
    except NoShards:  # a directory without shards: a folder of images (ingest says if it is not)
        return True
    images = image_files(src)
    if images:  # reading the shards alone would leave the images out without a word
        from mmray.config import ConfigError

        raise ConfigError(f"{src} holds both shards and {len(images)} image file(s) (e.g. {images[0]}): pass a "
                          "directory of shards or a folder of images, not one holding both (move one kind out)")
    return False


def check_sources(srcs: list[str], out: str) -> None:
    """Fail (naming the path) before anything is written to OUT when a source is missing or holds nothing to
    read: shards and data sets are listed, folders and indexes recognised (their samples are checked when staged),
    and OUT may not lie inside a folder it reads."""
    from mmray.config import ConfigError
    from mmray.data.ingest import _inside, find_source

    for src in srcs:
        if _needs_staging(src):
            if find_source(src) == "folder" and _inside(out, src):
                raise ConfigError(f"OUT {out} is inside the source folder {src}: choose an OUT outside it")
        else:
            find_sources([src])


def stage_sources(srcs: list[str], out: str, tokenizer: str, progress=None,
                  captions_required: bool = True) -> tuple[list[str], dict, dict]:
    """Replace each folder / CSV / JSONL source by its shards, written once under ``OUT/_staged/<hash>`` by
    :func:`mmray.data.ingest.prepare_ingest` (all samples in train/, with the export's tokenizer); a rerun reuses
    them (a changed folder is not noticed: delete OUT/_staged to stage it again). Returns the sources to read, the
    samples each staging left out, ``{staged dir: {"bad": counts, "bad_examples": ..., "samples": samples staged}}``
    (missing captions or images, unreadable images: the reader never sees them; see :class:`LeftOut`), and an
    output-name prefix for each staged source (its hash), so that staged shards never share a name."""
    import hashlib

    from mmray.config import ConfigError
    from mmray.data.ingest import prepare_ingest
    from mmray.data.prepare import MANIFEST, is_prepared

    read, staged, prefixes = [], {}, {}
    for src in srcs:
        if not _needs_staging(src):
            read.append(src)
            continue
        where = src if storage.is_s3(src) else storage.resolve(src)[1]
        digest = hashlib.sha256(where.encode()).hexdigest()[:16]
        dest = storage.join(out, STAGED, digest)
        if is_prepared(dest):
            manifest = json.loads(storage.read_text(storage.join(dest, MANIFEST)))
            staged[dest] = {"bad": manifest.get("bad", {}), "bad_examples": manifest.get("bad_examples", {}),
                            "samples": manifest.get("train", {}).get("samples", 0)}
            if progress:
                progress(f"{src}: using the shards staged in {dest}")
        else:
            if progress:
                progress(f"{src}: writing it as shards to {dest} first")
            try:
                summary = prepare_ingest(src, dest, val_samples=0, tokenizer=tokenizer, progress=progress,
                                         captions_required=captions_required)
            except ValueError as e:  # no usable samples, a bad index: bad input, named
                message = str(e) if str(e).startswith(src) else f"{src}: {e}"
                if "--image-column" in message or "--caption-column" in message:  # `mmray data prepare`'s options
                    message += (f" (here: write it as shards first, `mmray data prepare {src} DEST --image-column ... "
                                f"--caption-column ...`, and pass DEST)")
                raise ConfigError(message) from None
            staged[dest] = {"bad": summary["bad"], "bad_examples": summary["bad_examples"],
                            "samples": summary["train_samples"]}
        read.append(dest)
        prefixes[dest] = f"{STAGED}_{digest}__"
    return read, staged, prefixes


def stage_claimed(job, fresh: bool, srcs: list[str], export_dir: str, progress=None) -> tuple[list[str], dict, dict]:
    """:func:`stage_sources` for a job (mmray.infer.runner.Job) that has just claimed its OUT (``fresh`` when OUT had
    no manifest), with the job's caption rule: when staging fails (a folder or index with nothing usable), the claim
    is taken back, so that OUT, which holds no output, stays free for the next command."""
    try:
        return stage_sources(srcs, job.outputs.out, storage.join(export_dir, "tokenizer.json"), progress,
                             job.captions_required)
    except Exception:
        if fresh:
            job.outputs.release()
        raise


class LeftOut:
    """The samples that staging a folder or index left out, counted in a run as it reads the staged shards.

    A staged source's left-out samples count in proportion to the share of its staged samples that the run has
    read: all of them once it has read them all, and none in a rerun that finds the source's outputs all written.
    So the bad fraction at any point compares like with like (a large folder with 0.5% bad images is not 30% bad
    after its first shard), and a rerun that reads the last tenth of a source counts a tenth of its left-out ones.
    """

    def __init__(self, staged: dict, shards: list[str]):
        self.staged = staged
        self.read = {dest: 0 for dest in staged}
        self.dest_of: dict[str, str] = {}  # shard (as given) -> the staged dir it lies in
        for dest in staged:
            root = storage.resolve(dest)[1].rstrip("/") + "/"
            self.dest_of.update({s: dest for s in shards if storage.resolve(s)[1].startswith(root)})

    def add(self, shard: str, raw_rows: int) -> None:
        """``raw_rows`` samples of ``shard`` were read."""
        if shard in self.dest_of:
            self.read[self.dest_of[shard]] += raw_rows

    def counts(self) -> dict:
        """``{"bad": {reason: n}, "bad_examples": ...}`` of the share read so far."""
        bad: dict[str, int] = {}
        examples: dict[str, list[str]] = {}
        for dest, left_out in self.staged.items():
            total = left_out.get("samples") or 0
            share = min(1.0, self.read[dest] / total) if total else float(self.read[dest] > 0)
            for reason, n in left_out["bad"].items():
                if (part := int(n * share)) > 0:
                    bad[reason] = bad.get(reason, 0) + part
                    examples.setdefault(reason, []).extend(left_out["bad_examples"].get(reason, []))
        return {"bad": bad, "bad_examples": examples}


def merge_staged(summary: dict, staged: dict) -> dict:
    """Add bad samples (:meth:`LeftOut.counts`) to a run's summary."""
    bad = dict(summary.get("bad", {}))
    for reason, n in staged["bad"].items():
        bad[reason] = bad.get(reason, 0) + n
    examples = {**staged["bad_examples"], **summary.get("bad_examples", {})}
    return {**summary, "bad": bad, "bad_examples": examples}


def find_sources(srcs: list[str], prefixes: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``(shard path or URI, output name)`` for every shard that ``srcs`` name, in order.

    Each item may be a prepared data set (its train/ and val/ shards), a directory of ``.tar`` / ``.parquet``
    shards, or one shard file. Output names are relative to the item (``train__00000.tar``); two shards that would
    share a name are an error rather than one output overwriting the other. Local paths are made absolute, so that
a rerun from another directory finds the same shards.
    """
    found: list[tuple[str, str]] = []
    for src in srcs:
        if is_shard(src) and not is_dir(src):
            if not storage.exists(src):
                raise storage.StorageError(f"shard does not exist: {src}")
            path = src if storage.is_s3(src) else storage.resolve(src)[1]  # local: absolute, as find_shards gives
            found.append((path, posixpath.basename(path.replace("\\", "/"))))
        else:
            root = src if storage.is_s3(src) else storage.resolve(src)[1]
            prefix = (prefixes or {}).get(src, "")
            found += [(path, prefix + _relative_name(path, root)) for path in find_shards(src)]
    names: dict[str, str] = {}
    for path, name in found:
        if name in names and names[name] != path:
            raise storage.StorageError(f"shards {names[name]} and {path} would both be written as {name}; "
                                       "embed or generate them into separate outputs")
        names[name] = path
    return list(dict.fromkeys(found))


def _end_row(path: str, rows: int) -> pa.Table:
    values = {"key": "", "shard": path, "error": f"{END_OF_SHARD}:{rows}"}
    return pa.table({f.name: [values.get(f.name)] for f in RAW_SCHEMA}, schema=RAW_SCHEMA)


class CountedShardDatasource(ShardDatasource):
    """mmray's shard reader, with one end-of-shard row after each shard's samples (see the module docstring)."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows = 0
        for block in super()._read_stream(f, path):
            rows += block.num_rows
            yield block
        yield _end_row(path, rows)


def read_counted(paths: list[str], reader: dict | None = None, **read_args):
    """A streaming Ray Dataset of raw samples (mmray.data.reader.RAW_SCHEMA) with end-of-shard rows.

    The same as :func:`mmray.data.pipeline.read_raw` (in file order: no shuffle) but for the datasource;
    ``reader`` holds the datasource's options (:func:`mmray.data.pipeline.reader_options`: Parquet columns,
    WebDataset member extensions), ``read_args`` go to ``ray.data.read_datasource`` (``num_cpus``, ``concurrency``).
    """
    import ray.data

    fs, _ = storage.resolve(paths[0])
    source = CountedShardDatasource([storage.resolve(p)[1] for p in paths], filesystem=fs, **(reader or {}))
    return ray.data.read_datasource(source, **read_args)


def origin(meta: bytes | None) -> str:
    """Where a sample came from, as its metadata says: the file that staging a folder or index read it from
    (``source``), else the URL img2dataset downloaded it from (``url``); "" when the metadata names neither."""
    try:
        info = decode_meta(meta)
    except ValueError:
        return ""
    for name in ("source", "url"):
        if isinstance(info.get(name), str) and info[name]:
            return info[name]
    return ""


def _take(batch: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in batch.items()}


class Rows:
    """What a command feeds its model: the decoded columns it keeps, and how usable samples become rows.

    By default one row per sample; a subclass may expand a sample into several rows (one per VQA question) from the
    raw sample's JSON metadata, which ``expand`` receives in the samples' order. ``samples`` holds the ``keep``
    columns and ``source``, each sample's :func:`origin`.
    """

    keep: tuple[str, ...] = ("image", "text_ids", "caption", "key")

    def expand(self, samples: dict[str, np.ndarray], metas: list[bytes | None]) -> dict[str, np.ndarray]:
        return samples


class Decode:
    """Raw rows -> model inputs (the columns ``rows.keep``, expanded by ``rows``), plus tally rows (see the module
    docstring).

    Decoding is :class:`Preprocess` itself, applied to each shard's rows of the batch, so bad samples are dropped
    and reported to the ``quality`` actor exactly as in training.
    """

    def __init__(self, tokenizer_json: str, image_size: int, max_text_len: int, quality=None,
                 rows: Rows | None = None, captions_required: bool = True):
        self.preprocess = Preprocess(tokenizer_json, image_size, max_text_len, quality, captions_required)
        self.rows = rows or Rows()
        # Column names, dtypes and row shapes of the output, for tally rows of batches without a usable sample.
        empty = {f.name: np.array([], dtype=object) for f in RAW_SCHEMA}
        self.template = self._rows(Preprocess(tokenizer_json, image_size, max_text_len)(empty), empty)

    def __call__(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        by_shard: dict[str, list[int]] = {}
        for i, shard in enumerate(raw["shard"]):
            by_shard.setdefault(shard, []).append(i)
        parts = []
        for shard, indices in by_shard.items():
            ends = [i for i in indices if str(raw["error"][i]).startswith(END_OF_SHARD)]
            samples = [i for i in indices if i not in ends] if ends else indices
            if samples:
                sub = _take(raw, samples)
                rows = self._rows(self.preprocess(sub), sub)
                n = len(rows["key"])
                parts.append({**rows, "shard": np.array([shard] * n, dtype=object), "tally": np.zeros(n, bool),
                              "n_raw": np.zeros(n, np.int64), "n_total": np.full(n, -1, np.int64)})
            total = int(str(raw["error"][ends[0]]).split(":")[1]) if ends else -1
            parts.append(self._tally(shard, len(samples), total))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _rows(self, good: dict[str, np.ndarray], raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The kept columns of the usable samples, expanded; each sample's metadata is found by walking the raw
        rows in order (Preprocess keeps the order and only drops rows), so repeated keys cannot mix samples up."""
        metas, j = [], 0
        raw_meta = raw.get("meta", [None] * len(raw["key"]))
        for key in good["key"]:
            while raw["key"][j] != key:
                j += 1
            metas.append(raw_meta[j])
            j += 1
        samples = {k: good[k] for k in self.rows.keep}
        samples["source"] = np.array([origin(m) for m in metas], dtype=object)
        return self.rows.expand(samples, metas)

    def _tally(self, shard: str, n_raw: int, n_total: int) -> dict[str, np.ndarray]:
        row = {k: (np.array([""], dtype=object) if v.dtype == object else np.zeros((1, *v.shape[1:]), v.dtype))
               for k, v in self.template.items()}
        return {**row, "shard": np.array([shard], dtype=object), "tally": np.ones(1, bool),
                "n_raw": np.array([n_raw], np.int64), "n_total": np.array([n_total], np.int64)}
