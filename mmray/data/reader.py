"""mmray's shard reader: WebDataset tars and Parquet files into Arrow blocks of raw samples, many rows per block.

Built on Ray Data's datasource API (``FileBasedDatasource``). Ray's stock ``read_webdataset`` builds one block per
sample; this reader groups members by key and emits a block every ``rows_per_block`` samples, so the per-sample
overhead is a few list appends. Nothing is decoded here: decoding happens in :class:`mmray.data.pipeline.Preprocess`.

Every row has the same schema (see :data:`RAW_SCHEMA`). Problems that can be seen while reading (a member without
its pair, a truncated tar, an unreadable Parquet row group) are not fatal: the sample is emitted with ``error`` set
to the reason, so that it is counted and reported downstream instead of being lost silently.
"""
from __future__ import annotations

import functools
import json
import logging
import posixpath
import tarfile
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from mmray.data.sources import SHARD_SUFFIXES, is_parquet, parse_stats, stats_path, tar_codec

log = logging.getLogger("mmray")
Count = Callable[[], "int | None"]  # a shard's sample count, looked up only when it is needed

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # data.image_extensions' default, in order of preference
CAPTION_EXTENSION, METADATA_EXTENSION = "txt", "json"  # data.caption_extension, data.metadata_extension

RAW_SCHEMA = pa.schema([
    ("key", pa.string()),        # the sample key (WebDataset member stem, or the Parquet key column / row number)
    ("shard", pa.string()),      # the file it came from
    ("image", pa.binary()),      # encoded image bytes, null when missing
    ("caption", pa.binary()),    # raw caption bytes (UTF-8 expected), null when missing
    ("meta", pa.binary()),       # the sample's JSON metadata (WebDataset ``.json`` member), null when absent
    ("error", pa.string()),      # "" when the sample was read whole, else the reason
])


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000010042.jpg`` -> (``dir/000010042``, ``jpg``): the key ends at the first dot of the basename. A name
    whose bytes are not UTF-8 (GNU tar in a Latin-1 locale) keeps them as ``\\xNN`` escapes in its key."""
    if not name.isascii():
        name = _text(name)
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem) if dirname else stem, ext.lower()


def _text(name: str) -> str:
    """A member name decoded with ``surrogateescape`` as text that Arrow can store: bytes that were not UTF-8
    become ``\\xNN`` escapes (the same name always gives the same key)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def binary_array(values: list) -> pa.Array | list:
    """A binary Arrow column of ``values`` (bytes, or None for null) in one exact-size copy of the bytes.

    ``pa.array`` appends the values to a buffer that it grows as it goes, each growth a reallocation and a copy: for
    a block of images that was half of the reader's own CPU time (py-spy, 96 KB JPEGs). The column is the same.
    Columns past 2 GiB (binary's 32-bit offsets), and values other than bytes (a Parquet string column named as
    the image column), are left to ``pa.array`` (which splits the first into chunks and encodes the second)."""
    if not all(v is None or type(v) is bytes for v in values):
        return values
    n = len(values)
    present = [v is not None for v in values]
    lengths = np.fromiter((len(v) if v is not None else 0 for v in values), np.int64, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        return values
    nulls = n - sum(present)
    validity = pa.py_buffer(np.packbits(np.array(present, bool), bitorder="little")) if nulls else None
    data = pa.py_buffer(b"".join(v for v in values if v is not None))
    return pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offsets.astype(np.int32)), data], nulls)


class _Rows:
    """Accumulates rows column-wise and flushes them as Arrow tables of at most ``size`` rows."""

    def __init__(self, shard: str, size: int):
        self.shard, self.size = shard, size
        self.cols: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        self.added = 0  # rows of this shard so far

    def add(self, key: str, image: bytes | None, caption: bytes | None, error: str = "",
            meta: bytes | None = None) -> pa.Table | None:
        for name, value in zip(RAW_SCHEMA.names, (key, self.shard, image, caption, meta, error)):
            self.cols[name].append(value)
        self.added += 1
        return self.flush() if len(self.cols["key"]) >= self.size else None

    def lost(self, key: str, error: str, least: int, expected: Count | None = None) -> Iterator[pa.Table]:
        """The samples that could not be read (a cut tar's rest, an unreadable row group): as many as ``expected()``
        (the shard's sample count, from its ``_stats.json``; asked only here) says the rows so far leave missing
        (none: the damage is logged), else ``least``. One bad row each with ``error``, so that the bad-sample counts and
        data.max_bad_fraction weigh them. Their keys are ``key``, ``key/1``, ``key/2``, ...: distinct, as samples'
        keys are, so that mixing weights (which pick copies by key) weigh them one by one."""
        count = expected() if expected is not None else None
        missing = max(count - self.added, 0) if count is not None else least
        if count is not None and missing != least:
            error += f"; {missing} of its {count} samples (_stats.json) not read"
        if not missing:  # e.g. a tar whose end blocks are missing, all its samples read: damage, but no sample lost
            log.warning("%s: %s", self.shard, error)
        for i in range(missing):
            if block := self.add(f"{key}/{i}" if i else key, None, None, error):
                yield block

    def flush(self) -> pa.Table | None:
        if not self.cols["key"]:
            return None
        table = pa.table({name: binary_array(values) if RAW_SCHEMA.field(name).type == pa.binary() else values
                          for name, values in self.cols.items()}, schema=RAW_SCHEMA)
        self.cols = {name: [] for name in RAW_SCHEMA.names}
        return table


def _sample_row(key: str, members: dict[str, bytes], image_exts: Sequence[str], caption_ext: str,
                meta_ext: str = METADATA_EXTENSION):
    """(key, image, caption, error, meta) for one grouped WebDataset sample."""
    image = next((members[e] for e in image_exts if e in members), None)
    caption = members.get(caption_ext)
    error = "missing_image" if image is None else "missing_caption" if caption is None else ""
    return key, image, caption, error, members.get(meta_ext)


class StreamError(Exception):
    """Reading the underlying file failed (a storage or network error, not a bad tar): re-raised as the original
    error so that the read is retried (pyarrow's S3 retries, then Ray Data's ``retried_io_errors``) or fails, instead
    of being mistaken for a truncated shard and silently changing the samples read."""


class _Source:
    """The raw stream under a decompressing one: remembers its own read error, so that a storage error is told apart
    from corrupt compressed data (both reach the reader as an OSError of the decompressing stream)."""

    closed = False

    def __init__(self, stream):
        self.stream, self.error = stream, None

    def read(self, n: int = -1) -> bytes:
        try:
            return self.stream.read(n)
        except Exception as e:
            self.error = e
            raise

    def close(self) -> None:
        self.closed = True  # the stream itself is its opener's to close


class _Blocks:
    """Reads a stream in large chunks and hands out exact byte counts, so that parsing a tar costs no read call per
    512-byte header. Errors of the stream itself are wrapped in StreamError so that they are not taken for a corrupt
    tar.

    With ``codec`` (an Arrow codec: gzip, bz2, zstd), the stream is compressed and is decompressed as it is read by
    Arrow's ``CompressedInputStream``; compressed data that is corrupt or cut short is a tarfile.ReadError (a bad
    shard), a failing read of the stream under it a StreamError. Arrow fails the whole read that meets the damage,
    so a compressed stream is read exactly as far as the tar needs (Arrow buffers what it decompresses; the cost
    a sample was the same as in 16 KiB reads): a damaged shard loses nothing past the member being read, and bytes
    after the tar's end (the zero padding some writers add after the compressed data) are never read."""

    CHUNK = 1 << 20

    def __init__(self, stream, codec: str | None = None):
        self.source, self.codec, self.chunk = None, codec, self.CHUNK
        if codec is not None:
            self.source = _Source(stream)
            stream = pa.CompressedInputStream(pa.PythonFile(self.source, mode="r"), codec)
            self.chunk = 0
        self.stream, self.buf, self.pos, self.offset = stream, b"", 0, 0  # offset: bytes handed out so far

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes, or fewer at the end of the stream."""
        if self.pos + n > len(self.buf):
            parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
            while have < n:
                try:
                    data = self.stream.read(max(self.chunk, n - have))
                except Exception as e:
                    if self.source is not None and self.source.error is None:
                        raise tarfile.ReadError(f"corrupt {self.codec} data after {self.offset + have} bytes of the "
                                                f"tar: {e}") from None
                    raise StreamError() from (self.source.error if self.source is not None else e)
                if not data:
                    break
                parts.append(data)
                have += len(data)
            self.buf, self.pos = b"".join(parts), 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        self.offset += len(out)
        return out


_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LINK_TYPES = (tarfile.LNKTYPE, tarfile.SYMTYPE)


class CutMember(tarfile.ReadError):
    """The archive ends inside the data of member ``name``: every member before it was read whole."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def _octal(field: bytes, what: str) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0x80, 0xFF):
        return int.from_bytes(field[1:], "big", signed=field[0] == 0xFF)
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"bad {what} field {field!r}") from None


def _pax(data: bytes) -> dict[str, str]:
    """The records (``LEN KEY=VALUE\\n``) of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def tar_members(blocks: _Blocks) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of each regular file of a tar stream, in order, and (name, None) of each hard or symbolic link
    (a link holds no data: which member it names is not followed); tarfile.ReadError on a corrupt or cut archive
    (CutMember when it ends inside a member's data).

    A minimal reader of the formats Python's tarfile and GNU tar write (ustar, GNU long names, pax headers) that
    costs a few microseconds a member where ``tarfile``'s stream mode costs tens: a WebDataset sample is 2-3 members
    of a few KB, so header parsing was as costly as decoding the image. It is stricter than ``tarfile``, which ends
    an archive silently at a bad header after the first: here a bad checksum is a corrupt shard, and an archive
    must end with its end-of-archive blocks."""
    long_name, pax = None, {}
    while True:
        header = blocks.take(_BLOCK)
        if header == _ZERO_BLOCK:
            if len(blocks.take(_BLOCK)) < _BLOCK:  # the second end-of-archive block
                raise tarfile.ReadError(f"archive ends at byte {blocks.offset} without its end-of-archive blocks")
            return
        if len(header) < _BLOCK:
            raise tarfile.ReadError(f"archive ends at byte {blocks.offset} "
                                    + ("inside a header" if header else "without its end-of-archive blocks"))
        chksum, unsigned = _octal(header[148:156], "checksum"), sum(header[:148]) + 256 + sum(header[156:])
        if chksum != unsigned and chksum != unsigned - 256 * sum(b > 127 for b in header):  # some tars sum signed
            raise tarfile.ReadError(f"bad header checksum at byte {blocks.offset - _BLOCK}")
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136], "size")
        kind = header[156:157]
        name = _member_name(header, pax, long_name) if kind in _FILE_TYPES + _LINK_TYPES else ""
        try:
            data = blocks.take(size)
        except tarfile.ReadError as e:  # compressed data cut or corrupt inside this member
            raise CutMember(f"{e} (inside member {_text(name) or '(a header)'})", name) from None
        if len(data) < size:
            raise CutMember(f"archive ends at byte {blocks.offset} inside member {_text(name) or '(a header)'}",
                            name)
        blocks.take(-size % _BLOCK)  # padding to the next block
        if kind == tarfile.XHDTYPE:
            pax = _pax(data)
            continue
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind in (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):  # global pax header, a link's long target
            continue
        long_name, pax = None, {}
        if kind in _FILE_TYPES:
            yield name, data
        elif kind in _LINK_TYPES:
            yield name, None
        # directories, devices, ...: not samples


def _member_name(header: bytes, pax: dict[str, str], long_name: str | None) -> str:
    """A member's name: its pax ``path`` record, its GNU long name, or the ustar header's prefix and name."""
    name = pax.get("path") or long_name
    if name is None:
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name


def iter_tar(stream, shard: str, rows_per_block: int, image_exts: Sequence[str] = IMAGE_EXTENSIONS,
             caption_ext: str = CAPTION_EXTENSION, meta_ext: str = METADATA_EXTENSION,
             codec: str | None = None, expected: Count | None = None) -> Iterator[pa.Table]:
    """Stream a WebDataset tar (members grouped by key, as the format requires) into blocks of raw samples;
    ``codec`` (gzip, bz2, zstd) when the tar is compressed (see mmray.data.sources.TAR_CODECS).

    A tar that is cut short or corrupt keeps the samples read whole before the damage; the rest are bad samples
    ``truncated_shard`` (keys ``SHARD#truncated``, ``SHARD#truncated/1``, ...): as many as ``expected()`` (the
    shard's sample count, from its ``_stats.json``; asked only then) says are missing, else one, since how many the
    rest held is unknown.

    A member's extension is everything after the first dot of its file name, lower-cased (``000123.image.png``:
    ``image.png``); the sample's image is its member with the first of ``image_exts`` present, its caption the
    ``caption_ext`` member, its metadata the ``meta_ext`` member. Other members are ignored."""
    rows = _Rows(shard, rows_per_block)
    try:
        yield from _iter_tar_members(_Blocks(stream, codec), shard, rows, image_exts, caption_ext, meta_ext,
                                     expected)
    except StreamError as e:
        raise e.__cause__ from None


def _iter_tar_members(blocks: _Blocks, shard: str, rows: _Rows, image_exts: Sequence[str],
                      caption_ext: str, meta_ext: str, expected: Count | None) -> Iterator[pa.Table]:
    seen: set[str] = set()  # keys whose group has ended: WebDataset keeps a sample's members adjacent

    def sample(k: str, m: dict[str, bytes | None]):
        if k in twice:
            return k, None, None, "duplicate_member", None
        if any(v is None for v in m.values()):
            return k, None, None, "linked_member", None
        if k in seen:
            # Its other members came earlier, apart from these (a tar written as `tar cf x.tar dir/`, in directory
            # order, not sorted by name): the first part was emitted without its pair, this part is counted under
            # its own reason, which tells what to fix.
            return k, None, None, "members_not_adjacent", None
        return _sample_row(k, m, image_exts, caption_ext, meta_ext)

    key, members, twice = None, {}, set()  # twice: keys with two members of one extension
    try:
        for name, data in tar_members(blocks):
            k, ext = _split_name(name)
            if not ext or not k or k.endswith("/"):
                # Not a sample's member (WebDataset names them KEY.EXT): a README, a `.DS_Store` or `._x.jpg`
                # macOS leaves, a dot-file. Skipped as webdataset's own reader skips them.
                continue
            if k != key:
                if key is not None:
                    if block := rows.add(*sample(key, members)):
                        yield block
                    seen.add(key)
                key, members = k, {}
            if ext in members:  # which of the two is the sample's is not known (webdataset refuses the tar)
                twice.add(k)
            members[ext] = data
    except StreamError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # A truncated or corrupt tar: the samples read whole are kept; the one cut off and the rest are counted as
        # bad samples of this shard (see iter_tar), rather than lost silently. The sample being grouped was read
        # whole only when the archive breaks inside a member of another sample; a cut between two members, inside a
        # header or inside one of its own members may have cut it short.
        whole = isinstance(e, CutMember) and bool(e.name) and _split_name(e.name)[0] != key
        if key is not None and whole and (block := rows.add(*sample(key, members))):
            yield block
        key, members = None, {}
        yield from rows.lost(f"{shard}#truncated", f"truncated_shard: {e}", 1, expected)
    if key is not None and (block := rows.add(*sample(key, members))):
        yield block
    if (block := rows.flush()) is not None:
        yield block


IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")  # img2dataset names the column after --encode_format
# img2dataset writes `caption` (its input's caption column), some versions `txt`; Hugging Face datasets use `text`
CAPTION_COLUMNS = ("txt", "caption", "text")
AUTO = "auto"


def _bad_data(message: str) -> ValueError:
    """A shard that cannot be read as configured (a missing column, a column of the wrong type): the whole data set
    is, so this is the pipeline's BadDataError, which the CLI reports as bad input (exit 2) with this message."""
    from mmray.data.pipeline import BadDataError

    return BadDataError(message)


def _pick(shard: str, names: set[str], wanted: str, auto: tuple[str, ...], what: str, key: str) -> str:
    """The column to read: ``wanted``, or with ``auto`` the first of ``auto`` present; BadDataError names the
    options."""
    choices = auto if wanted == AUTO else (wanted,)
    found = next((c for c in choices if c in names), None)
    if found is None:
        looked = f"any of {list(auto)}" if wanted == AUTO else repr(wanted)
        raise _bad_data(f"{shard}: Parquet file has no {what} column ({looked}); it has {sorted(names)}. "
                         f"Set {key}.")
    return found


def _plain(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column's value type (pandas writes a Categorical this way; its cells read as values)."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_binary(t: pa.DataType) -> bool:
    t = _plain(t)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_text(t: pa.DataType) -> bool:
    t = _plain(t)
    return _is_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _caption_reader(shard: str, column: str, t: pa.DataType):
    """How to turn a caption cell into bytes, for the column's Arrow type; BadDataError names a type that holds no
    text.

    Text (string or binary) is used as it is. A list of texts (several captions per image, as Hugging Face's
    Flickr30k and COCO captions store them) gives its first non-empty caption. Dictionary-encoded columns read as
    their values."""
    t = _plain(t)
    if _is_text(t):
        return lambda v: v.encode("utf-8") if isinstance(v, str) else v
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and _is_text(t.value_type):
        def first(v):
            text = next((c for c in v or () if c is not None and (c.strip() if isinstance(c, str) else c)), None)
            return text.encode("utf-8") if isinstance(text, str) else text
        return first
    raise _bad_data(f"{shard}: Parquet caption column {column!r} holds {t}, not text (a string, binary, or a list "
                     f"of strings); set data.caption_column to the column with the captions.")


def _meta_bytes(value) -> bytes | None:
    """A metadata cell as JSON bytes: text as it is; a struct, map or list (a JSON column that Hugging Face datasets
    or pandas stored as nested Arrow types) written back as JSON."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):  # an Arrow map
        value = dict(value) if all(isinstance(k, str) for k, _ in value) else value
    return json.dumps(value, default=str).encode("utf-8")


IMG2DATASET_FAILURES = ("failed_to_download", "failed_to_resize")  # its status for a URL it has no image of


def iter_parquet(data: bytes, shard: str, rows_per_block: int, image_column: str = AUTO,
                 caption_column: str = AUTO, key_column: str | None = "key",
                 meta_column: str | None = "json", expected: Count | None = None) -> Iterator[pa.Table]:
    """Blocks of raw samples from a Parquet file, one row group at a time; the rows of an unreadable row group are
    bad samples ``unreadable_row_group`` (key ``SHARD#rowgroupN``), one a row. In a file with a ``status`` column
    (below) not every row is a sample: there the unreadable groups count as many as ``expected()`` (the file's
    sample count, from its ``_stats.json``) says are missing, else one each, under the first one's key.

    ``image_column`` / ``caption_column`` may be ``auto``: the first of IMAGE_COLUMNS / CAPTION_COLUMNS present.
    ``meta_column`` (JSON text or bytes per row, like WebDataset's ``.json`` member) is optional: when the file has
    no such column, ``meta`` is null. A file with img2dataset's ``status`` column (text, beside its
    ``error_message`` column) also lists the URLs it failed to
    download or resize (``status`` ``failed_to_download`` or ``failed_to_resize``, no image): those rows are not
    samples (img2dataset counts them in its ``_stats.json`` as failures, not successes) and are skipped. Any other
    row is read, whatever its ``status`` says (a column of that name in another tool's file means something else)."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    names = set(pf.schema_arrow.names)
    image_column = _pick(shard, names, image_column, IMAGE_COLUMNS, "image", "data.image_column")
    caption_column = _pick(shard, names, caption_column, CAPTION_COLUMNS, "caption", "data.caption_column")
    schema = pf.schema_arrow
    status_type = schema.field("status").type if "status" in names else None
    # img2dataset's own: text, beside its error_message column (another tool's `status` is just metadata)
    status_column = "status" if status_type and _is_text(status_type) and not _is_binary(status_type) \
        and "error_message" in names else None
    image_type = schema.field(image_column).type
    struct = pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0
    if not (_is_binary(image_type) or struct):  # a string column holds paths or URLs (or base64), never an image
        raise _bad_data(f"{shard}: Parquet image column {image_column!r} holds {image_type}, not encoded image "
                         f"bytes (binary, or a struct with a 'bytes' field); a column of paths or URLs is not "
                         f"read (img2dataset downloads them into shards); set data.image_column.")
    caption_bytes = _caption_reader(shard, caption_column, schema.field(caption_column).type)
    columns = [image_column, caption_column] + [c for c in (key_column, meta_column, status_column) if c and c in names]
    rows = _Rows(shard, rows_per_block)
    offset, unread = 0, []  # (key, error) of the unreadable groups whose sample counts are not known
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        try:
            table = pf.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as e:
            key, error = f"{shard}#rowgroup{group}", f"unreadable_row_group: {e}"
            if status_column is None:  # every row a sample
                yield from rows.lost(key, error, n)
            else:
                unread.append((key, error))
            offset += n
            continue
        images = table.column(image_column).to_pylist()
        captions = table.column(caption_column).to_pylist()
        keys = table.column(key_column).to_pylist() if key_column in names else range(offset, offset + n)
        metas = table.column(meta_column).to_pylist() if meta_column in names else [None] * n
        statuses = table.column(status_column).to_pylist() if status_column else [None] * n
        for key, image, caption, meta, status in zip(keys, images, captions, metas, statuses):
            image = image["bytes"] if isinstance(image, dict) else image  # HF-style {"bytes", "path"} structs
            if image is None and status in IMG2DATASET_FAILURES:
                continue
            caption = caption_bytes(caption)
            error = "missing_image" if image is None else "missing_caption" if caption is None else ""
            meta = _meta_bytes(meta)
            if block := rows.add(str(key), image, caption, error, meta):
                yield block
        offset += n
    if unread:  # counted once the readable groups are: the missing samples, under the first unreadable group
        yield from rows.lost(*unread[0], len(unread), expected)
    if (block := rows.flush()) is not None:
        yield block


class ShardDatasource(FileBasedDatasource):
    """Ray Data datasource for img2dataset-style shards: ``.tar`` (WebDataset) and ``.parquet`` files.

    ``image_exts`` / ``caption_ext`` / ``meta_ext`` name the WebDataset members (data.image_extensions, ...; see
    :func:`iter_tar`), ``image_column`` / ``caption_column`` the Parquet columns (see :func:`iter_parquet`)."""

    _FILE_EXTENSIONS = sorted({suffix.rsplit(".", 1)[1] for suffix in SHARD_SUFFIXES})

    def __init__(self, paths, *, rows_per_block: int = 256, image_exts: Sequence[str] = IMAGE_EXTENSIONS,
                 caption_ext: str = CAPTION_EXTENSION, meta_ext: str = METADATA_EXTENSION, image_column: str = AUTO,
                 caption_column: str = AUTO, key_column: str | None = "key", **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.image_exts = tuple(e.lower() for e in image_exts)  # member extensions are compared lower-cased
        self.caption_ext, self.meta_ext = caption_ext.lower(), meta_ext.lower()
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column

    def resolve_compression(self, path: str, open_args: dict) -> None:
        """Files are opened as stored: a compressed tar is decompressed by :func:`iter_tar`, which tells a storage
        error (retried, or fatal) from corrupt compressed data (a bad shard, counted), where Ray Data's own
        decompression (by file suffix) would make both the same OSError."""
        return None

    def _stats_count(self, path: str) -> int | None:
        """The shard's sample count from the ``_stats.json`` beside it, or None: read only when a damaged shard
        needs it (a read task carries no table of counts, which every task of a 40,000-shard data set would)."""
        stats = stats_path(path)
        try:
            with self._filesystem.open_input_stream(stats, compression=None) as f:
                data = f.read()
        except FileNotFoundError:  # none: the count is unknown
            return None
        except OSError as e:  # unreadable after the filesystem's retries: unknown too, but say so
            log.warning("the sample count of %s is unknown (%s cannot be read: %s); its damage counts as one bad "
                        "sample", path, stats, e)
            return None
        return parse_stats(data, stats)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        count = functools.partial(self._stats_count, path)
        if is_parquet(path):
            yield from iter_parquet(f.read(), path, self.rows_per_block, self.image_column, self.caption_column,
                                    self.key_column, expected=count)
        else:
            yield from iter_tar(f, path, self.rows_per_block, self.image_exts, self.caption_ext, self.meta_ext,
                                codec=tar_codec(path), expected=count)
