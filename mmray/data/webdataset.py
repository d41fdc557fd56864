"""Write (and, for checks, read back) img2dataset-style WebDataset shards, locally or on S3.

The layout is the one img2dataset produces, so the same pipeline reads our synthetic sets and real
img2dataset downloads: ``00000.tar, 00001.tar, ...`` each holding ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` per
sample (adjacent, in key order, as Ray's ``read_webdataset`` requires), and ``00000_stats.json`` beside each tar.

Tars are built in memory with fixed member metadata (mtime 0, uid/gid 0, mode 0644, ustar), so the same samples
always give byte-identical shards, wherever they are written.

The same writer can also write img2dataset-style Parquet shards (``00000.parquet``: columns ``key``, ``jpg``, ``txt``,
``json``, the ones :func:`mmray.data.reader.iter_parquet` reads by default). Images may be PIL images (re-encoded as
JPEG) or already-encoded bytes kept as they are (:meth:`ShardWriter.write_encoded`); in a tar their member keeps its
extension (``.png``, ``.webp``, ...), in Parquet every image goes into the ``jpg`` column whatever its encoding.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmray import storage

SHARD_DIGITS = 5  # img2dataset's default oom_shard_count
MIN_SAMPLE_DIGITS = 4  # img2dataset writes ceil(log10(samples_per_shard)) digits: 4 for its default of 10000
JPEG_QUALITY = 95
FORMATS = {"webdataset": ".tar", "parquet": ".parquet"}  # shard format -> file suffix
PARQUET_SCHEMA = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string()), ("json", pa.string())])
PARQUET_ROW_GROUP = 256  # rows per row group: the reader decodes one row group at a time


def key_digits(samples_per_shard: int) -> int:
    """Digits of the within-shard index in a key: 4, more only if a shard holds more than 10,000 samples."""
    return max(MIN_SAMPLE_DIGITS, len(str(samples_per_shard - 1)))


def make_key(shard_id: int, index_in_shard: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard id (5 digits) then index within the shard, e.g. shard 1, sample 42 -> ``000010042``."""
    return f"{shard_id:0{SHARD_DIGITS}d}{index_in_shard:0{key_digits(samples_per_shard)}d}"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image. Pillow's encoder is deterministic for the same pixels and settings."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class ShardInfo:
    """What one finished shard holds; passed to the ``on_shard`` callback and kept in ``ShardWriter.shards``."""

    shard_id: int
    path: str
    count: int
    sha256: str = ""  # of the shard file's bytes
    size: int = 0     # the shard file's bytes


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # defaults: mtime 0, uid/gid 0, no user/group names: reproducible
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Collect samples and write them as numbered shards of ``samples_per_shard`` samples under ``dest_dir``.

    Use as a context manager: leaving the block writes the last, possibly smaller, shard (unless an exception is
    propagating: a partial data set must not look finished). ``dest_dir`` may be local or ``s3://``.
    """

    def __init__(self, dest_dir: str, samples_per_shard: int, jpeg_quality: int = JPEG_QUALITY,
                 on_shard: Callable[[ShardInfo], None] | None = None, format: str = "webdataset"):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        if format not in FORMATS:
            raise ValueError(f"unknown shard format {format!r}; supported: {', '.join(FORMATS)}")
        self.dest_dir = dest_dir
        self.samples_per_shard = samples_per_shard
        self.jpeg_quality = jpeg_quality
        self.on_shard = on_shard
        self.format = format
        self.shards: list[ShardInfo] = []
        self._samples: list[tuple[str, str, bytes, str, bytes]] = []  # (key, image ext, image, caption, json)
        self._count = 0
        self._start_time = 0.0

    @property
    def samples(self) -> int:
        """Samples written so far, in finished shards and in the one being filled."""
        return sum(s.count for s in self.shards) + self._count

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()

    def write(self, image: Image.Image, caption: str, extra: dict | None = None) -> str:
        """Add one sample (the image is encoded as JPEG); returns its key. ``extra`` fields are added to the sample's
        json metadata."""
        return self._add(encode_jpeg(image, self.jpeg_quality), "jpg", image.width, image.height, caption, extra)

    def write_encoded(self, data: bytes, ext: str, caption: str, width: int, height: int,
                      extra: dict | None = None) -> str:
        """Add one sample whose image is already encoded: ``data`` is stored byte for byte, as member ``KEY.ext`` in
        a tar (``ext`` without its dot, e.g. ``png``). ``width``/``height`` go into the metadata. Returns the key."""
        ext = ext.lower().lstrip(".")
        if not ext or "." in ext or "/" in ext:
            raise ValueError(f"bad image extension {ext!r}")
        return self._add(data, ext, width, height, caption, extra)

    def _add(self, data: bytes, ext: str, width: int, height: int, caption: str, extra: dict | None) -> str:
        if self._count == 0:
            self._start_time = time.time()
        shard_id = len(self.shards)
        key = make_key(shard_id, self._count, self.samples_per_shard)
        meta = {
            "key": key,
            "caption": caption,
            "status": "success",
            "error_message": None,
            "width": width,
            "height": height,
            "original_width": width,
            "original_height": height,
            "sha256": hashlib.sha256(data).hexdigest(),
            **(extra or {}),
        }
        # img2dataset indents this json; compact keeps json's C encoder (5x faster here) and smaller shards.
        self._samples.append((key, ext, data, caption, json.dumps(meta).encode("utf-8")))
        self._count += 1
        if self._count == self.samples_per_shard:
            self._flush()
        return key

    def close(self) -> None:
        """Write the shard being filled, if it holds any sample."""
        if self._count:
            self._flush()

    def _flush(self) -> None:
        shard_id = len(self.shards)
        base = storage.join(self.dest_dir, shard_name(shard_id))
        path = base + FORMATS[self.format]
        data = build_tar(self._tar_members()) if self.format == "webdataset" else build_parquet(self._samples)
        storage.write_bytes(path, data)
        end_time = time.time()
        storage.write_text(base + "_stats.json", json.dumps(self._stats(end_time), indent=4))
        info = ShardInfo(shard_id=shard_id, path=path, count=self._count, sha256=hashlib.sha256(data).hexdigest(),
                         size=len(data))
        self.shards.append(info)
        self._samples, self._count = [], 0
        if self.on_shard is not None:
            self.on_shard(info)

    def _tar_members(self) -> list[tuple[str, bytes]]:
        return [member for key, ext, image, caption, meta in self._samples
                for member in ((f"{key}.{ext}", image), (f"{key}.txt", caption.encode("utf-8")), (f"{key}.json", meta))]

    def _stats(self, end_time: float) -> dict:
        """img2dataset's per-shard ``_stats.json`` fields; a generated sample never fails to download or resize."""
        return {
            "count": self._count,
            "successes": self._count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": end_time - self._start_time,
            "start_time": self._start_time,
            "end_time": end_time,
            "status_dict": {"success": self._count},
        }


def build_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive of (name, data) pairs in the given order, with fixed metadata so it is reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _tar_member(tar, name, data)
    return buf.getvalue()


def build_parquet(samples: list[tuple[str, str, bytes, str, bytes]]) -> bytes:
    """A Parquet file of (key, ext, image, caption, json) samples in img2dataset's columns; reproducible bytes.

    Images are stored uncompressed (they are compressed already); the text columns with zstd."""
    table = pa.table({"key": [s[0] for s in samples], "jpg": [s[2] for s in samples],
                      "txt": [s[3] for s in samples], "json": [s[4].decode("utf-8") for s in samples]},
                     schema=PARQUET_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=PARQUET_ROW_GROUP, use_dictionary=False,
                   compression={"key": "zstd", "jpg": "none", "txt": "zstd", "json": "zstd"})
    return sink.getvalue().to_pybytes()


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key runs to the first dot of the file's base name, the extension is the rest."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_tar_samples(data: bytes) -> Iterator[dict]:
    """Samples of a WebDataset tar as dicts ``{"__key__": key, ext: bytes, ...}``, in archive order.

    Members of one sample must be adjacent (as the WebDataset format requires); a key seen again later is an error
    rather than a silently split sample.
    """
    seen: set[str] = set()
    current: dict | None = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if current is None or key != current["__key__"]:
                if key in seen:
                    raise ValueError(f"members of sample {key!r} are not adjacent in the tar")
                if current is not None:
                    yield current
                seen.add(key)
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current
