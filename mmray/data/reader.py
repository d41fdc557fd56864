"""mmray's shard reader: WebDataset tars and Parquet files into Arrow blocks of raw samples, many rows per block.

Built on Ray Data's datasource API (``FileBasedDatasource``). Ray's stock ``read_webdataset`` builds one block per
sample; this reader groups members by key and emits a block every ``rows_per_block`` samples, so the per-sample
overhead is a few list appends. Nothing is decoded here: decoding happens in :class:`mmray.data.pipeline.Preprocess`.

Every row has the same schema (see :data:`RAW_SCHEMA`). Problems that can be seen while reading (a member without
its pair, a truncated tar, an unreadable Parquet row group) are not fatal: the sample is emitted with ``error`` set
to the reason, so that it is counted and reported downstream instead of being lost silently.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

RAW_SCHEMA = pa.schema([
    ("key", pa.string()),        # the sample key (WebDataset member stem, or the Parquet key column / row number)
    ("shard", pa.string()),      # the file it came from
    ("image", pa.binary()),      # encoded image bytes, null when missing
    ("caption", pa.binary()),    # raw caption bytes (UTF-8 expected), null when missing
    ("meta", pa.binary()),       # the sample's JSON metadata (WebDataset ``.json`` member), null when absent
    ("error", pa.string()),      # "" when the sample was read whole, else the reason
])


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000010042.jpg`` -> (``dir/000010042``, ``jpg``): the key ends at the first dot of the basename."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem) if dirname else stem, ext.lower()


class _Rows:
    """Accumulates rows column-wise and flushes them as Arrow tables of at most ``size`` rows."""

    def __init__(self, shard: str, size: int):
        self.shard, self.size = shard, size
        self.cols: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}

    def add(self, key: str, image: bytes | None, caption: bytes | None, error: str = "",
            meta: bytes | None = None) -> pa.Table | None:
        for name, value in zip(RAW_SCHEMA.names, (key, self.shard, image, caption, meta, error)):
            self.cols[name].append(value)
        return self.flush() if len(self.cols["key"]) >= self.size else None

    def flush(self) -> pa.Table | None:
        if not self.cols["key"]:
            return None
        table = pa.table(self.cols, schema=RAW_SCHEMA)
        self.cols = {name: [] for name in RAW_SCHEMA.names}
        return table


def _sample_row(key: str, members: dict[str, bytes], image_exts: Sequence[str], caption_ext: str,
                meta_ext: str = "json"):
    """(key, image, caption, error, meta) for one grouped WebDataset sample."""
    image = next((members[e] for e in image_exts if e in members), None)
    caption = members.get(caption_ext)
    error = "missing_image" if image is None else "missing_caption" if caption is None else ""
    return key, image, caption, error, members.get(meta_ext)


class StreamError(Exception):
    """Reading the underlying file failed (a storage or network error, not a bad tar): re-raised as the original
    error so that the read is retried (pyarrow's S3 retries, then Ray Data's ``retried_io_errors``) or fails, instead
    of being mistaken for a truncated shard and silently changing the samples read."""


class _CountingReader:
    """A read-only stream wrapper that counts bytes, so that a tar cut at a member boundary can be told apart from
    a complete one (Python's tarfile silently stops at a truncated header). Errors of the stream itself are wrapped
    in StreamError so that they are not taken for a corrupt tar."""

    def __init__(self, stream):
        self.stream, self.total = stream, 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.stream.read(n)
        except Exception as e:
            raise StreamError() from e
        self.total += len(data)
        return data

    def drain(self) -> int:
        while self.read(1 << 20):
            pass
        return self.total


def iter_tar(stream, shard: str, rows_per_block: int, image_exts: Sequence[str] = IMAGE_EXTENSIONS,
             caption_ext: str = "txt") -> Iterator[pa.Table]:
    """Stream a WebDataset tar (members grouped by key, as the format requires) into blocks of raw samples."""
    rows = _Rows(shard, rows_per_block)
    counted = _CountingReader(stream)
    try:
        yield from _iter_tar_members(counted, shard, rows, image_exts, caption_ext)
    except StreamError as e:
        raise e.__cause__ from None


def _iter_tar_members(counted: _CountingReader, shard: str, rows: _Rows, image_exts: Sequence[str],
                      caption_ext: str) -> Iterator[pa.Table]:
    key, members = None, {}
    try:
        with tarfile.open(fileobj=counted, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                k, ext = _split_name(info.name)
                if k != key:
                    if key is not None and (block := rows.add(*_sample_row(key, members, image_exts, caption_ext))):
                        yield block
                    key, members = k, {}
                members[ext] = tar.extractfile(info).read()
            # A complete archive ends with two zero blocks after the last member; tarfile does not check.
            if counted.drain() < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"archive ends at byte {counted.total} without its end-of-archive blocks")
    except StreamError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        # A truncated or corrupt tar: the samples read whole are kept; the one cut off is dropped and the break is
        # recorded as a bad sample of this shard, so it is counted rather than lost silently.
        key, members = None, {}
        if block := rows.add(f"{shard}#truncated", None, None, f"truncated_shard: {e}"):
            yield block
    if key is not None and (block := rows.add(*_sample_row(key, members, image_exts, caption_ext))):
        yield block
    if (block := rows.flush()) is not None:
        yield block


IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")  # img2dataset names the column after --encode_format
CAPTION_COLUMNS = ("txt", "caption")  # img2dataset writes `caption` (its input's caption column), some versions `txt`
AUTO = "auto"


def _pick(shard: str, names: set[str], wanted: str, auto: tuple[str, ...], what: str, key: str) -> str:
    """The column to read: ``wanted``, or with ``auto`` the first of ``auto`` present; ValueError names the options."""
    choices = auto if wanted == AUTO else (wanted,)
    found = next((c for c in choices if c in names), None)
    if found is None:
        looked = f"any of {list(auto)}" if wanted == AUTO else repr(wanted)
        raise ValueError(f"{shard}: Parquet file has no {what} column ({looked}); it has {sorted(names)}. "
                         f"Set {key}.")
    return found


def iter_parquet(data: bytes, shard: str, rows_per_block: int, image_column: str = AUTO,
                 caption_column: str = AUTO, key_column: str | None = "key",
                 meta_column: str | None = "json") -> Iterator[pa.Table]:
    """Blocks of raw samples from a Parquet file, one row group at a time; an unreadable row group is reported.

    ``image_column`` / ``caption_column`` may be ``auto``: the first of IMAGE_COLUMNS / CAPTION_COLUMNS present.
    ``meta_column`` (JSON text or bytes per row, like WebDataset's ``.json`` member) is optional: when the file has
    no such column, ``meta`` is null. A file with img2dataset's ``status`` column also lists the URLs it failed to
    download or resize (``status`` other than ``success``, no image): those rows are not samples (img2dataset
    counts them in its ``_stats.json`` as failures, not successes) and are skipped."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    names = set(pf.schema_arrow.names)
    image_column = _pick(shard, names, image_column, IMAGE_COLUMNS, "image", "data.image_column")
    caption_column = _pick(shard, names, caption_column, CAPTION_COLUMNS, "caption", "data.caption_column")
    status_column = "status" if "status" in names else None
    columns = [image_column, caption_column] + [c for c in (key_column, meta_column, status_column) if c and c in names]
    rows = _Rows(shard, rows_per_block)
    offset = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        try:
            table = pf.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as e:
            if block := rows.add(f"{shard}#rowgroup{group}", None, None, f"unreadable_row_group: {e}"):
                yield block
            offset += n
            continue
        images = table.column(image_column).to_pylist()
        captions = table.column(caption_column).to_pylist()
        keys = table.column(key_column).to_pylist() if key_column in names else range(offset, offset + n)
        metas = table.column(meta_column).to_pylist() if meta_column in names else [None] * n
        statuses = table.column(status_column).to_pylist() if status_column else ["success"] * n
        for key, image, caption, meta, status in zip(keys, images, captions, metas, statuses):
            if status != "success":
                continue
            image = image["bytes"] if isinstance(image, dict) else image  # HF-style {"bytes", "path"} structs
            caption = caption.encode("utf-8") if isinstance(caption, str) else caption
            error = "missing_image" if image is None else "missing_caption" if caption is None else ""
            meta = meta.encode("utf-8") if isinstance(meta, str) else meta
            if block := rows.add(str(key), image, caption, error, meta):
                yield block
        offset += n
    if (block := rows.flush()) is not None:
        yield block


class ShardDatasource(FileBasedDatasource):
    """Ray Data datasource for img2dataset-style shards: ``.tar`` (WebDataset) and ``.parquet`` files."""

    _FILE_EXTENSIONS = ["tar", "parquet"]

    def __init__(self, paths, *, rows_per_block: int = 256, image_exts: Sequence[str] = IMAGE_EXTENSIONS,
                 caption_ext: str = "txt", image_column: str = AUTO, caption_column: str = AUTO,
                 key_column: str | None = "key", **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.image_exts, self.caption_ext = tuple(image_exts), caption_ext
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        if path.endswith(".parquet"):
            yield from iter_parquet(f.read(), path, self.rows_per_block, self.image_column, self.caption_column,
                                    self.key_column)
        else:
            yield from iter_tar(f, path, self.rows_per_block, self.image_exts, self.caption_ext)
