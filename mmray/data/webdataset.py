"""Write (and, for checks, read back) img2dataset-style WebDataset shards, locally or on S3.

The layout is the one img2dataset produces, so the same pipeline reads our synthetic sets and real
img2dataset downloads: ``00000.tar, 00001.tar, ...`` each holding ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` per
sample (adjacent, in key order, as Ray's ``read_webdataset`` requires), and ``00000_stats.json`` beside each tar.

Tars are built in memory with fixed member metadata (mtime 0, uid/gid 0, mode 0644, ustar), so the same samples
always give byte-identical shards, wherever they are written.
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

from PIL import Image

from mmray import storage

SHARD_DIGITS = 5  # img2dataset's default oom_shard_count
MIN_SAMPLE_DIGITS = 4  # img2dataset writes ceil(log10(samples_per_shard)) digits: 4 for its default of 10000
JPEG_QUALITY = 95


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
                 on_shard: Callable[[ShardInfo], None] | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        self.dest_dir = dest_dir
        self.samples_per_shard = samples_per_shard
        self.jpeg_quality = jpeg_quality
        self.on_shard = on_shard
        self.shards: list[ShardInfo] = []
        self._members: list[tuple[str, bytes]] = []
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
        """Add one sample; returns its key. ``extra`` fields are added to the sample's json metadata."""
        if self._count == 0:
            self._start_time = time.time()
        shard_id = len(self.shards)
        key = make_key(shard_id, self._count, self.samples_per_shard)
        jpg = encode_jpeg(image, self.jpeg_quality)
        meta = {
            "key": key,
            "caption": caption,
            "status": "success",
            "error_message": None,
            "width": image.width,
            "height": image.height,
            "original_width": image.width,
            "original_height": image.height,
            "sha256": hashlib.sha256(jpg).hexdigest(),
            **(extra or {}),
        }
        self._members += [
            (f"{key}.jpg", jpg),
            (f"{key}.txt", caption.encode("utf-8")),
            # img2dataset indents this json; compact keeps json's C encoder (5x faster here) and smaller shards.
            (f"{key}.json", json.dumps(meta).encode("utf-8")),
        ]
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
        storage.write_bytes(base + ".tar", build_tar(self._members))
        end_time = time.time()
        storage.write_text(base + "_stats.json", json.dumps(self._stats(end_time), indent=4))
        info = ShardInfo(shard_id=shard_id, path=base + ".tar", count=self._count)
        self.shards.append(info)
        self._members, self._count = [], 0
        if self.on_shard is not None:
            self.on_shard(info)

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
