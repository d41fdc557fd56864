"""`mmray data prepare` from real data: a folder of images with captions, or a CSV / JSONL index of them.

Sources (local or ``s3://``):

- a folder, searched recursively, of images (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, any case; JPEGs named
  ``.jfif``, ``.jpe`` or ``.jif`` too, stored as ``.jpg``) each with a same-named ``.txt`` caption (``cats/001.jpg`` +
  ``cats/001.txt``) and optionally a same-named ``.json`` object of metadata. Hidden files and folders (``.name``)
  are skipped. Symlinked folders are followed, each folder once (a second name for one, or a link back up the
  tree, adds nothing). Samples are taken in order of their path.
- a ``.csv`` (with a header row) or ``.jsonl`` index with one sample per row: the image path in column ``image``
  (else ``path``, ``filepath``, ``file_name``; or ``image_column``) and the caption in ``caption`` (else ``text``; or
  ``caption_column``), chosen once for the file (a JSON line without the chosen field has no image or no caption,
  and is counted so). Relative paths resolve against the index file's directory; absolute local paths, ``~/...``,
  ``file://`` and ``s3://`` URIs are used as they are; a path without an extension (as downloaders often save
  files) is read as the JPEG, PNG or WebP its bytes say it is. The row's other fields are kept in the sample's
  metadata (those the shard writer sets itself, RESERVED_META, under ``source_meta``). Samples are taken in row
  order. A malformed row, or a CSV header naming a column twice, is an error that names the file and line.

A sample that cannot be used is skipped and counted by reason, with a few examples: ``missing_caption``,
``missing_image``, ``corrupt_image`` (it does not decode with Pillow), ``image_too_large``, ``empty_caption``,
``non_utf8_caption``, ``bad_metadata`` (its ``.json`` is not a JSON object, or cannot be read), ``unreadable_image``
/ ``unreadable_caption`` (a local file that cannot be read, e.g. without permission; an index row naming a directory
is ``missing_image``),
``unsupported_image_type`` (an index row naming another kind of file, or an image in a folder in a format the shard
readers do not take: ``.gif``, ``.bmp``, ``.tif``, ...; convert those to PNG or JPEG first), ``unsupported_url``
(http(s) images are not downloaded).

Output: the layout of :mod:`mmray.data.prepare` (train/ and val/ shards, tokenizer.json, dataset.json written last),
as WebDataset tars or Parquet files. Images are stored as their original bytes, never re-encoded. Validation takes
``val_samples`` usable samples chosen by a shuffle of the images seeded with ``seed`` (written in that shuffled
order); an image that an index lists on several rows (several captions, as COCO has) goes to one split with all its
rows, so validation may hold a few more than ``val_samples``. Training takes all other usable samples, in source
order. The output is a pure function of the source and
the arguments (save the timings in ``*_stats.json``).
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import random
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace

import pyarrow.fs as pafs
from PIL import Image

from mmray import storage
from mmray.data.pipeline import MAX_IMAGE_PIXELS
from mmray.data.prepare import (MANIFEST, TOKENIZER, default_val_samples, remove_stale_shards, split_manifest)
from mmray.data.tokenizer import MIN_VOCAB_SIZE, TextTokenizer, sample_texts, train_tokenizer
from mmray.data.webdataset import FORMATS, ShardInfo, ShardWriter

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Other names of JPEG files (Windows saves web images as .jfif): ingested, stored in the shards as .jpg
JPEG_ALIASES = ("jfif", "jpe", "jif")
# Image files in a folder that are not ingested (the shard readers take IMAGE_EXTENSIONS): each counts as a bad
# sample, unsupported_image_type, so that a folder of GIFs or TIFFs is not taken for one without images.
OTHER_IMAGE_EXTENSIONS = ("gif", "bmp", "tif", "tiff", "heic", "heif", "avif", "jxl", "jp2", "ico", "ppm", "pgm",
                          "pbm", "tga", "svg")
INDEX_KINDS = {".csv": "csv", ".jsonl": "jsonl"}
IMAGE_COLUMNS = ("image", "path", "filepath", "file_name")  # file_name: Hugging Face ImageFolder metadata
CAPTION_COLUMNS = ("caption", "text")
EXAMPLES_PER_REASON = 5
READ_THREADS = 16  # images are read (S3 round trips) and decode-checked in threads, in order
READ_AHEAD = 64
# Metadata fields the shard writer sets itself; a source's own fields of these names are kept under SOURCE_META.
RESERVED_META = ("key", "caption", "status", "error_message", "width", "height", "original_width",
                 "original_height", "sha256", "source")
SOURCE_META = "source_meta"


@dataclass(frozen=True)
class Candidate:
    """One sample as the source lists it, before anything is read."""

    ref: str                          # how a bad example names it: the image path, or ``index.csv:12: path``
    image: str                        # path or URI of the image ("" when the row has none)
    ext: str = ""                     # image extension, lowercase, no dot
    caption: str | None = None        # the caption text (index sources) ...
    caption_path: str | None = None   # ... or the file that holds it (folder sources)
    meta_path: str | None = None      # a folder sample's .json
    extra: dict = field(default_factory=dict)  # an index row's other fields
    bad: str = ""                     # a reason already known from the listing
    caption_optional: bool = False    # no caption is "" (captioning images that have none), not a bad sample


@dataclass(frozen=True)
class Loaded:
    """A usable sample: its image bytes (as stored in the source), caption and metadata."""

    image: bytes
    ext: str
    caption: str
    width: int
    height: int
    meta: dict


# ---------------------------------------------------------------------------------------------------- discovery


def find_source(src: str) -> str:
    """The kind of source at ``src``: ``folder``, ``csv`` or ``jsonl``. ValueError (StorageError) naming the path
    when it does not exist or is a file of another kind."""
    fs, inner = storage.resolve(src)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        return "folder"
    if kind == pafs.FileType.File:
        suffix = os.path.splitext(src)[1].lower()
        if suffix in INDEX_KINDS:
            return INDEX_KINDS[suffix]
        raise storage.StorageError(f"data source {src} is a file but not a .csv or .jsonl index")
    raise storage.StorageError(f"data source does not exist: {src}")


def _ext(path: str) -> str:
    """The lowercase extension of a path's file name, without its dot ("" when it has none)."""
    name = path.rsplit("/", 1)[-1]
    return name.rpartition(".")[2].lower() if "." in name else ""


def _stored_ext(ext: str) -> str:
    """The extension an image is stored under in a shard: a JPEG alias (.jfif, ...) as .jpg."""
    return "jpg" if ext in JPEG_ALIASES else ext


def _same_case(paths: list[str], ext: str, upper: bool = False) -> str | None:
    """The one of a stem's caption (or metadata) files to use for an image: when a case-sensitive file system holds
    both ``a.txt`` and ``a.TXT``, the one whose extension has the image's case (``a.JPG`` takes ``a.TXT``)."""
    wanted = "." + (ext.upper() if upper else ext)
    return min(paths, key=lambda p: (not p.endswith(wanted), p)) if paths else None


def discover_folder(src: str) -> list[Candidate]:
    """Every image under ``src`` (recursively, hidden files skipped), in path order, with its caption and metadata
    files. An image without a ``.txt`` is a candidate already marked ``missing_caption``."""
    fs, inner = storage.resolve(src)
    root = storage.S3_SCHEME + inner if storage.is_s3(src) else inner
    # path without extension -> {lowercase extension: paths}; a.jpg and a.JPG are two images (sharing a.txt)
    groups: dict[str, dict[str, list[str]]] = {}
    for path in storage.list_files(src, recursive=True):
        rel = path[len(root):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stem, dot, ext = rel.rpartition(".")
        if dot and "/" not in ext:
            groups.setdefault(stem, {}).setdefault(ext.lower(), []).append(path)
    candidates = []
    for stem in sorted(groups):
        files = groups[stem]
        for ext in sorted(e for e in files if e in IMAGE_EXTENSIONS or e in JPEG_ALIASES):
            for image in files[ext]:
                upper = image.rpartition(".")[2].isupper()
                caption = _same_case(files.get("txt", []), "txt", upper)
                meta = _same_case(files.get("json", []), "json", upper)
                candidates.append(Candidate(ref=image, image=image, ext=_stored_ext(ext), caption_path=caption,
                                            meta_path=meta,
                                            bad="" if caption else "missing_caption"))
        for ext in sorted(e for e in files if e in OTHER_IMAGE_EXTENSIONS):
            candidates += [Candidate(ref=p, image=p, ext=ext, bad="unsupported_image_type") for p in files[ext]]
    if not candidates:
        raise ValueError(f"no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) found under {src}")
    return candidates


def _pick_column(where: str, names: Iterable[str], explicit: str | None, fallbacks: tuple[str, ...], what: str,
                 flag: str) -> str:
    names = list(names)
    if explicit is not None:
        if explicit in names:
            return explicit
        raise ValueError(f"{where}: no {what} column {explicit!r} ({flag}); it has {names}")
    for name in fallbacks:
        if name in names:
            return name
    looked = " or ".join(repr(n) for n in fallbacks)
    raise ValueError(f"{where}: no {what} column: looked for {looked}; it has {names}. Name it with {flag}")


def _csv_rows(src: str, text: str, image_column: str | None,
              caption_column: str | None) -> Iterator[tuple[int, str, str | None, dict]]:
    """(line, image, caption, other fields) per data row of a CSV file with a header row."""
    # Python's csv refuses fields over 128 KiB by default; a long caption is a valid field (the file is in memory)
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{src} is empty: expected a header row naming the image and caption columns") from None
    except csv.Error as e:
        raise ValueError(f"{src}:{reader.line_num}: malformed CSV header: {e}") from None
    image_col = _pick_column(src, header, image_column, IMAGE_COLUMNS, "image", "--image-column")
    caption_col = _pick_column(src, header, caption_column, CAPTION_COLUMNS, "caption", "--caption-column")
    if twice := [name for name in dict.fromkeys((image_col, caption_col)) if header.count(name) > 1]:
        raise ValueError(f"{src}:{reader.line_num}: the header names {', '.join(map(repr, twice))} more than once: "
                         "which column is meant is ambiguous; rename the duplicates")
    line = reader.line_num + 1  # where the next record starts (a quoted field may span lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{src}:{line}: malformed CSV row: {e}") from None
        start, line = line, reader.line_num + 1
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise ValueError(f"{src}:{start}: malformed CSV row: {len(row)} fields, the header has {len(header)}")
        record = dict(zip(header, row))
        extra = {k: v for k, v in record.items() if k not in (image_col, caption_col)}
        yield start, record[image_col], record[caption_col], extra


def _jsonl_rows(src: str, text: str, image_column: str | None,
                caption_column: str | None) -> Iterator[tuple[int, str, str | None, dict]]:
    """(line, image, caption, other fields) per non-blank line of a JSON Lines file.

    The image and caption fields are chosen once for the file (the first of the fallbacks that any line has), as a
    CSV's header chooses them: a line without the chosen field (writers such as Spark and jq leave out null
    fields) has no image or no caption, and is counted so, never captioned from another field."""
    records = []
    for number, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}:{number}: malformed JSON line: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{src}:{number}: malformed JSON line: expected an object, got {type(record).__name__}")
        records.append((number, record))
    fields = list(dict.fromkeys(k for _, record in records for k in record))
    image_col = _pick_column(src, fields, image_column, IMAGE_COLUMNS, "image", "--image-column")
    caption_col = _pick_column(src, fields, caption_column, CAPTION_COLUMNS, "caption", "--caption-column")
    for number, record in records:
        where = f"{src}:{number}"
        image, caption = record.get(image_col), record.get(caption_col)
        if not isinstance(image, str) and image is not None:
            raise ValueError(f"{where}: {image_col!r} must be a path (a string), got {json.dumps(image)[:80]}")
        if not isinstance(caption, str) and caption is not None:
            raise ValueError(f"{where}: {caption_col!r} must be a string, got {json.dumps(caption)[:80]}")
        extra = {k: v for k, v in record.items() if k not in (image_col, caption_col)}
        yield number, image or "", caption, extra


def resolve_path(index: str, path: str) -> str:
    """An index row's image path: ``s3://`` and absolute local paths as they are (``~/...`` and ``file://`` URIs
    as the local paths they name), others relative to the index."""
    if path.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
    elif path.startswith("~"):
        path = os.path.expanduser(path)
    if storage.is_s3(path) or os.path.isabs(path):
        return path
    if storage.is_s3(index):
        base = posixpath.dirname(index[len(storage.S3_SCHEME):])
        return storage.S3_SCHEME + posixpath.normpath(posixpath.join(base, path))
    return os.path.normpath(os.path.join(os.path.dirname(storage.resolve(index)[1]), path))


def discover_index(src: str, kind: str, image_column: str | None = None,
                   caption_column: str | None = None) -> list[Candidate]:
    """The samples a ``.csv`` / ``.jsonl`` index lists, in row order."""
    try:
        text = storage.read_bytes(src).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{src} is not UTF-8 text: {e}") from None
    rows = (_csv_rows if kind == "csv" else _jsonl_rows)(src, text, image_column, caption_column)
    candidates = []
    for line, image, caption, extra in rows:
        image = image.strip()
        ref = f"{src}:{line}: {image}"
        path = resolve_path(src, image) if image else ""
        ext = _stored_ext(_ext(path))
        bad = ("missing_image" if not image else
               "unsupported_url" if image.lower().startswith(("http://", "https://")) else
               "unsupported_image_type" if ext and ext not in IMAGE_EXTENSIONS else
               "missing_caption" if caption is None else "")
        candidates.append(Candidate(ref=ref, image=path, ext=ext, caption=caption, extra=extra, bad=bad))
    if not candidates:
        raise ValueError(f"{src} lists no samples")
    return candidates


# -------------------------------------------------------------------------------------------------- reading


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image that Pillow decodes whole; ValueError ``corrupt_image`` /
    ``image_too_large`` / ``empty_image`` otherwise. JPEGs are decoded at reduced scale (every byte is still read)."""
    if not data:
        raise ValueError("empty_image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError("image_too_large")
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except ValueError as e:
        if str(e) == "image_too_large":
            raise
        raise ValueError("corrupt_image") from None
    except Image.DecompressionBombError:
        raise ValueError("image_too_large") from None
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for broken files
        raise ValueError("corrupt_image") from None
    return width, height


# Pillow's format names -> IMAGE_EXTENSIONS; MPO is a JPEG with more JPEGs after it (phone and camera photos)
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


def sniff_extension(data: bytes) -> str:
    """The IMAGE_EXTENSIONS entry for encoded image bytes, as Pillow identifies them (the header only); "" for
    anything else."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return FORMAT_EXTENSIONS.get(img.format, "")
    except Exception:  # PIL raises UnidentifiedImageError and others for what is not an image it knows
        return ""


class _Unreadable(Exception):
    """A local file that exists but cannot be read (permissions, a link loop, a directory): ``reason`` is the bad
    sample's reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read(path: str, reason: str) -> bytes:
    """The bytes at ``path``. A local file that cannot be read raises :class:`_Unreadable` with ``reason``; on S3 an
    OSError is a storage failure (retried below S3's client), never a verdict on the sample, so it propagates; a
    missing file raises storage.StorageError."""
    try:
        return storage.read_bytes(path)
    except OSError:  # storage.StorageError (a missing file) is a ValueError: it passes
        if storage.is_s3(path):
            raise
        raise _Unreadable(reason) from None


def load(candidate: Candidate) -> Loaded | str:
    """Read and check one sample: a Loaded, or the reason it is bad. An image path without an extension (as
    downloaders often save files) is taken by its bytes' signature."""
    if candidate.bad:
        return candidate.bad
    try:
        data = _read(candidate.image, "unreadable_image")
    except storage.StorageError:
        return "missing_image"
    except _Unreadable as e:
        # a local path that is a directory (an index row naming a folder), or a file this user may not read
        return "missing_image" if os.path.isdir(candidate.image) else e.reason
    if not candidate.ext:
        if not (ext := sniff_extension(data)):
            return "unsupported_image_type" if data else "empty_image"
        candidate = replace(candidate, ext=ext)
    caption = candidate.caption
    if candidate.caption_path is not None:
        try:
            caption = _read(candidate.caption_path, "unreadable_caption").decode("utf-8-sig")  # a BOM is not text
        except storage.StorageError:
            return "missing_caption"
        except _Unreadable as e:
            return e.reason
        except UnicodeDecodeError:
            if not candidate.caption_optional:
                return "non_utf8_caption"
            caption = ""
    caption = (caption or "").strip()
    if not caption and not candidate.caption_optional:
        return "empty_caption"
    meta = dict(candidate.extra)
    if candidate.meta_path is not None:
        try:
            own = json.loads(_read(candidate.meta_path, "bad_metadata"))
        except (storage.StorageError, ValueError):
            return "bad_metadata"
        except _Unreadable as e:
            return e.reason
        if not isinstance(own, dict):
            return "bad_metadata"
        meta.update(own)
    try:
        width, height = check_image(data)
    except ValueError as e:
        return str(e)
    own = {k: v for k, v in meta.items() if k in RESERVED_META or k == SOURCE_META}
    meta = {k: v for k, v in meta.items() if k not in own}
    if own:  # kept, under a name of their own: the writer sets these fields itself
        meta[SOURCE_META] = own
    meta["source"] = candidate.image
    return Loaded(image=data, ext=candidate.ext, caption=caption, width=width, height=height, meta=meta)


def _ordered_map(items: Iterable[tuple[int, Candidate]], threads: int) -> Iterator[tuple[int, Loaded | str]]:
    """``(i, load(candidate))`` for each item, in input order, with up to READ_AHEAD loads running in threads.
    Stopping early cancels the loads not yet started."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        try:
            for i, candidate in items:
                pending.append((i, pool.submit(load, candidate)))
                if len(pending) >= READ_AHEAD:
                    i, future = pending.popleft()
                    yield i, future.result()
            while pending:
                i, future = pending.popleft()
                yield i, future.result()
        finally:
            for _, future in pending:
                future.cancel()


# -------------------------------------------------------------------------------------------------- writing


def _inside(child: str, parent: str) -> bool:
    """Whether ``child`` is ``parent`` or below it (both local, or both S3)."""
    if storage.is_s3(child) != storage.is_s3(parent):
        return False
    if storage.is_s3(child):
        return (child.rstrip("/") + "/").startswith(parent.rstrip("/") + "/")
    c, p = os.path.realpath(storage.resolve(child)[1]), os.path.realpath(storage.resolve(parent)[1])
    return c == p or c.startswith(p.rstrip(os.sep) + os.sep)


def _check_args(fmt: str, samples_per_shard: int, val_samples: int | None, vocab_size: int,
                tokenizer: str | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if val_samples is not None and val_samples < 0:
        raise ValueError(f"val_samples must be at least 0, got {val_samples}")
    if tokenizer is None and vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")


class _Bad:
    """Bad samples: a count per reason and the first few examples of each."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, candidate: Candidate) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(candidate.ref)

    def __str__(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items())) or "none"


def _hint(src: str, kind: str, reasons) -> str:
    """What to check when a source gave no (or too few) usable samples, from the reasons it gave."""
    if kind != "folder" and reasons.get("missing_image"):
        where = posixpath.dirname(src) if storage.is_s3(src) else os.path.dirname(storage.resolve(src)[1])
        return f". An index's relative image paths are relative to its own folder, {where}"
    if kind == "folder" and reasons.get("missing_caption"):
        index = [name for name in ("metadata.csv", "metadata.jsonl") if storage.exists(storage.join(src, name))]
        if index:  # Hugging Face ImageFolder keeps the captions in an index beside the images
            return f". The captions may be in {storage.join(src, index[0])}: pass that index as SRC"
    return ""


def _writer(dest: str, split: str, fmt: str, samples_per_shard: int, say: Callable[[str], None]) -> ShardWriter:
    done = [0]

    def report(info: ShardInfo) -> None:
        done[0] += info.count
        say(f"{split}: shard {info.shard_id + 1} written ({info.count} samples, {done[0]} in {split} so far)")

    return ShardWriter(storage.join(dest, split), samples_per_shard, on_shard=report, format=fmt)


def _write(writer: ShardWriter, sample: Loaded) -> None:
    writer.write_encoded(sample.image, sample.ext, sample.caption, sample.width, sample.height, sample.meta)


def prepare_ingest(src: str, dest: str, format: str = "webdataset", samples_per_shard: int = 1000,
                   val_samples: int | None = None, seed: int = 0, tokenizer: str | None = None,
                   vocab_size: int = 512, image_column: str | None = None, caption_column: str | None = None,
                   progress: Callable[[str], None] | None = None, threads: int = READ_THREADS,
                   captions_required: bool = True) -> dict:
    """Write the images and captions of ``src`` (a folder, or a .csv / .jsonl index) to ``dest`` and return a
    summary. See the module docstring for the sources, the bad-sample reasons and the split.

    ``val_samples`` defaults to ``default_val_samples`` of the samples that have a caption. ``tokenizer`` is an
    existing tokenizer.json (local or s3://) copied as DEST/tokenizer.json; without it a tokenizer of at most
    ``vocab_size`` tokens is trained on the training captions. Everything that can be checked before writing (the
    source, the columns of an index, the tokenizer, DEST outside SRC) is, and raises ValueError naming the problem.
    With ``captions_required`` False (staging images to caption them), an image without a caption is written with
    an empty one instead of being counted bad.
    """
    started = time.perf_counter()
    say = progress or (lambda message: None)
    _check_args(format, samples_per_shard, val_samples, vocab_size, tokenizer)
    kind = find_source(src)
    if kind == "folder":
        if image_column is not None or caption_column is not None:
            raise ValueError("image_column / caption_column apply to a .csv or .jsonl index, not to a folder")
        if _inside(dest, src):
            raise ValueError(f"DEST {dest} is inside SRC {src}: choose a DEST outside the source folder")
    tokenizer_bytes = None
    if tokenizer is not None:
        TextTokenizer.from_file(tokenizer)  # a missing or invalid file is an error naming it, before any writing
        tokenizer_bytes = storage.read_bytes(tokenizer)

    candidates = discover_folder(src) if kind == "folder" else discover_index(src, kind, image_column, caption_column)
    if not captions_required:
        candidates = [replace(c, caption_optional=True, bad="" if c.bad == "missing_caption" else c.bad)
                      for c in candidates]
    eligible = sum(1 for c in candidates if not c.bad)
    say(f"{src}: {len(candidates)} samples listed ({kind}), {len(candidates) - eligible} without a usable listing")
    if not eligible:
        reasons = Counter(c.bad for c in candidates)
        raise ValueError(f"no usable samples in {src}: {dict(reasons)}; e.g. {candidates[0].ref}"
                         f"{_hint(src, kind, reasons)}")
    n_val = default_val_samples(eligible) if val_samples is None else val_samples
    if n_val >= eligible:
        raise ValueError(f"val_samples={n_val} leaves no training sample: {src} has {eligible} samples with captions")

    manifest_path = storage.join(dest, MANIFEST)
    storage.delete(manifest_path)  # while we rewrite, the data set is not complete
    bad = _Bad()
    suffix = FORMATS[format]

    # Validation: the first n_val usable samples in a seeded shuffle of the images, each image with all its rows (an
    # index may list one image with several captions, as COCO does: held-out images must not be trained on).
    rows_of: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        rows_of.setdefault(c.image or c.ref, []).append(i)
    groups = list(rows_of.values())
    random.Random(seed).shuffle(groups)
    group_of = {i: g for g, rows in enumerate(groups) for i in rows}
    taken: set[int] = set()  # read in this pass: chosen for validation, or found bad
    eligible_order = ((i, candidates[i]) for rows in groups for i in rows if not candidates[i].bad)
    last_group = -1
    with _writer(dest, "val", format, samples_per_shard, say) as val, \
            closing(_ordered_map(eligible_order if n_val else (), threads)) as results:
        for i, result in results:
            if val.samples >= n_val and group_of[i] != last_group:
                break  # enough, and the last image's rows are all in
            last_group = group_of[i]
            taken.add(i)
            if isinstance(result, str):
                bad.add(result, candidates[i])
                continue
            _write(val, result)
    if val.samples < n_val:
        given = "" if val_samples is not None else \
            f" (the default for {eligible} listed samples; set --val-samples to choose)"
        raise ValueError(f"only {val.samples} usable samples in {src} (bad: {bad}; examples: {bad.examples}); "
                         f"val_samples={n_val}{given} needs more{_hint(src, kind, bad.counts)}")

    # Training: every other sample, in listing order.
    texts: list[str] = []
    rest = ((i, c) for i, c in enumerate(candidates) if i not in taken)
    with _writer(dest, "train", format, samples_per_shard, say) as train, \
            closing(_ordered_map(rest, threads)) as results:
        for i, result in results:
            if isinstance(result, str):
                bad.add(result, candidates[i])
                continue
            _write(train, result)
            texts += sample_texts(result.caption, result.meta)
    if not train.samples:
        took = (f"; validation took {val.samples} samples (whole images, with every row that lists them): lower "
                f"--val-samples" if val.samples else "")
        raise ValueError(f"no usable training samples in {src} (bad: {bad}); examples: {bad.examples}{took}"
                         f"{_hint(src, kind, bad.counts)}")
    for split, writer in (("train", train), ("val", val)):
        remove_stale_shards(storage.join(dest, split), len(writer.shards), suffix)

    tokenizer_path = storage.join(dest, TOKENIZER)
    if tokenizer_bytes is not None:
        storage.write_bytes(tokenizer_path, tokenizer_bytes)
        say(f"tokenizer: copied {tokenizer}")
    else:
        trained = TextTokenizer(train_tokenizer(texts, vocab_size=vocab_size))
        trained.save(tokenizer_path)
        say(f"tokenizer: {trained.vocab_size} tokens trained on the training captions")

    manifest = {
        "name": src,
        "source": src,
        "format": format,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "train": split_manifest("train", train.shards),
        "val": split_manifest("val", val.shards),
        "tokenizer": TOKENIZER,
        "bad": dict(sorted(bad.counts.items())),
        "bad_examples": {reason: bad.examples[reason] for reason in sorted(bad.examples)},
    }
    storage.write_text(manifest_path, json.dumps(manifest, indent=2))
    say(f"done: {train.samples} train + {val.samples} val samples written to {dest}; bad samples: {bad}")
    return {
        "src": src,
        "dest": dest,
        "format": format,
        "train_samples": train.samples,
        "val_samples": val.samples,
        "train_shards": len(train.shards),
        "val_shards": len(val.shards),
        "bad": dict(sorted(bad.counts.items())),
        "bad_examples": {reason: bad.examples[reason] for reason in sorted(bad.examples)},
        "tokenizer": tokenizer_path,
        "wall_s": round(time.perf_counter() - started, 3),
    }
