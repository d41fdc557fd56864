"""Data sources as users write them: turn ``data.source`` / ``data.val_source`` / ``mmray data inspect SRC`` into
lists of shard files, checked before Ray starts.

A source is one or more *parts* joined by ``::`` (as in webdataset and OpenCLIP's ``--train-data "a::b"``). A part
is, locally or on S3:

- a prepared data set (a directory with ``train/`` and ``val/`` splits, as `mmray data prepare` writes): its
  ``train/`` shards for training, its ``val/`` shards for held-out evaluation, its ``tokenizer.json``;
- a prefix with shards directly under it (img2dataset's layout: ``00000.tar``, ``00000.parquet``,
  ``00000_stats.json``, ... with no splits). When a ``NNNNN.tar`` has a ``NNNNN.parquet`` beside it, the Parquet
  file is img2dataset's metadata table for that tar (no image column), not a shard, and is skipped;
- one shard file (``.tar``, a compressed tar: ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.zst``, ``.tar.lz4``; or
  ``.parquet``);
- a brace pattern of shard files, as webdataset and img2dataset users write them: ``{00000..00099}.tar`` (a
  numeric range; zero-padded to the width of its ends when either end has a leading zero; an optional step
  ``{0..98..2}``) and ``{a,b}`` (a list), several and nested braces expanding left to right.

Every shard that a pattern or a file part names must exist: a missing one fails fast with a StorageError that names
its path, unless ``allow_missing`` (``data.allow_missing_shards``) is set, in which case it is skipped with a warning
naming it (and a part left with no shard at all is still an error).

img2dataset writes ``NNNNN_stats.json`` beside each shard (``{"count", "successes", "failed_to_download",
"failed_to_resize", "duration", "status_dict", ...}``, see its ``logger.write_stats``); ``successes`` is the number
of samples the shard holds. :func:`count_samples` sums them, so that sample totals are known without reading shards.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mmray import storage

log = logging.getLogger("mmray")

# WebDataset tars, plain or compressed as the webdataset library reads them (``.tar.gz``, ``.tgz``), the codecs
# decompressed as a stream by Arrow (see mmray.data.reader.iter_tar); the codec each suffix means.
TAR_CODECS = {".tar": None, ".tar.gz": "gzip", ".tgz": "gzip", ".tar.bz2": "bz2", ".tar.zst": "zstd",
              ".tar.lz4": "lz4"}
SHARD_SUFFIXES = (*TAR_CODECS, ".parquet")
SHARD_NAMES = ".tar, .tar.gz, .tgz, .tar.bz2, .tar.zst, .tar.lz4 or .parquet"  # for messages
UNSTREAMABLE_TARS = (".tar.xz", ".txz", ".tar.lzma", ".tar.z")  # compressed tars Arrow has no stream codec for
_SHARD_LIKE = re.compile(r"\d{3,}$")  # a name ending in a shard number (00012, shard-000012)
PART_SEPARATOR = "::"
STATS_SUFFIX = "_stats.json"
SPLITS = ("train", "val")
_STATS_THREADS = 32  # each _stats.json is one small GET; S3 latency, not bandwidth, is the cost
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


class SourceError(ValueError):
    """A source spec that cannot be parsed (a bad brace pattern, an empty part); the message names the problem."""


# ------------------------------------------------------------------------------------------------ parsing


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise SourceError(f"unbalanced '{{' at position {start} in {text!r}")


def _split_top_level(body: str) -> list[str]:
    """``a,b{1,2},c`` -> ``['a', 'b{1,2}', 'c']``: commas inside nested braces do not split."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    items.append(body[start:])
    return items


def _range(body: str, pattern: str) -> list[str]:
    match = _RANGE.match(body)
    if not match:
        raise SourceError(f"{{{body}}} in {pattern!r} is neither a list {{a,b}} nor a numeric range {{00000..00099}}")
    first, last, step = match.group(1), match.group(2), match.group(3)
    a, b, s = int(first), int(last), abs(int(step or 1))
    if s == 0:
        raise SourceError(f"{{{body}}} in {pattern!r}: the step of a range cannot be 0")
    padded = any(len(e.lstrip("-")) > 1 and e.lstrip("-").startswith("0") for e in (first, last))
    width = max(len(first), len(last)) if padded else 0
    values = range(a, b + 1, s) if a <= b else range(a, b - 1, -s)
    return [f"{v:0{width}d}" for v in values]


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{N..M}`` / ``{N..M..S}`` numeric ranges, left to right, nested braces included.

    ``shard-{00000..00002}.tar`` -> ``shard-00000.tar, shard-00001.tar, shard-00002.tar``; a range keeps the width
    of its zero-padded ends (``{0..2}`` is not padded, ``{000..2}`` pads to 3). Duplicates are dropped (the first
    stays). A pattern without braces is itself. SourceError for unbalanced braces or a brace that is neither form.
    """
    if "}" in pattern and "{" not in pattern:
        raise SourceError(f"unbalanced '}}' in {pattern!r}")
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _matching_brace(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    if "}" in head:
        raise SourceError(f"unbalanced '}}' in {pattern!r}")
    alternatives = _split_top_level(body)
    if len(alternatives) == 1:
        alternatives = _range(body, pattern)
    out: dict[str, None] = {}
    for alternative in alternatives:
        for expanded in expand_braces(head + alternative + tail):
            out.setdefault(expanded)
    return list(out)


def split_parts(spec: str) -> list[str]:
    """``"a::b"`` -> ``["a", "b"]`` (surrounding whitespace stripped); SourceError for an empty spec or part."""
    parts = [p.strip() for p in spec.split(PART_SEPARATOR)]
    if not spec.strip() or not all(parts):
        raise SourceError(f"{spec!r} has an empty part; join sources with '::', e.g. 's3://b/laion/::s3://b/cc12m/'")
    return parts


def check_spec(spec: str) -> list[str]:
    """Parse a spec without touching storage (for config validation): its parts, each brace pattern expanded once
    to check it (SourceError names the problem)."""
    parts = split_parts(spec)
    for part in parts:
        expand_braces(part)
    return parts


# ------------------------------------------------------------------------------------------------ storage


def _file_type(path: str):
    fs, inner = storage.resolve(path)
    return fs.get_file_info(inner).type


def is_dir(path: str) -> bool:
    """True for a local directory or a non-empty S3 prefix."""
    import pyarrow.fs as pafs

    return _file_type(path) == pafs.FileType.Directory


def shard_suffix(path: str) -> str | None:
    """The :data:`SHARD_SUFFIXES` entry a path ends with, in any case (``00001.TAR`` is a shard: file systems that
    ignore case, and the tools that wrote to them, leave such names); None for other files."""
    name = path.lower()
    return next((s for s in SHARD_SUFFIXES if name.endswith(s)), None)


def is_shard(path: str) -> bool:
    return shard_suffix(path) is not None


def is_parquet(path: str) -> bool:
    return shard_suffix(path) == ".parquet"


def shard_stem(path: str) -> str:
    """A shard's path without its suffix (``.../00000.tar.gz`` -> ``.../00000``); ValueError for other files."""
    suffix = shard_suffix(path)
    if suffix is None:
        raise ValueError(f"{path} is not a shard ({SHARD_NAMES})")
    return path[:-len(suffix)]


def tar_codec(path: str) -> str | None:
    """The compression of a tar shard, by its suffix (:data:`TAR_CODECS`); None for a plain tar."""
    return TAR_CODECS.get(shard_suffix(path) or "")


def list_shards(directory: str) -> list[str]:
    """The shards (:data:`SHARD_SUFFIXES`) directly under ``directory``, sorted; other files (stats, manifests) and
    img2dataset's metadata Parquet beside a tar of the same name (``00000.parquet`` next to ``00000.tar``) skipped."""
    names = storage.list_files(directory)
    for p in names:
        suffix = next((s for s in UNSTREAMABLE_TARS if p.lower().endswith(s)), None)
        if suffix is not None:
            if _SHARD_LIKE.search(p[:-len(suffix)]):
                # named like a shard: reading the others alone would leave it out without a word
                raise not_a_shard(p, f" (under {directory})")
            log.warning("ignoring %s: a tar compressed with a codec Arrow cannot stream", p)
    files = [p for p in names if is_shard(p)]
    tars: dict[str, str] = {}
    for p in files:
        if not is_parquet(p):
            if (other := tars.setdefault(shard_stem(p), p)) != p:
                raise storage.StorageError(f"{other} and {p} are one shard under two names: its samples would be "
                                           "read twice; keep one of them")
    return [p for p in files if not is_parquet(p) or shard_stem(p) not in tars]


def image_files(directory: str, recursive: bool = False) -> list[str]:
    """The image files (the extensions `mmray data prepare` ingests) under a directory, hidden ones left out."""
    from mmray.data.ingest import IMAGE_EXTENSIONS

    names = storage.list_files(directory, recursive=recursive)
    return [p for p in names if not posixpath.basename(p).startswith(".")
            and posixpath.splitext(p)[1][1:].lower() in IMAGE_EXTENSIONS]


def is_file(path: str) -> bool:
    import pyarrow.fs as pafs

    return _file_type(path) == pafs.FileType.File


def not_a_shard(path: str, where: str = "") -> storage.StorageError:
    """The error for a file given where shards (or a directory of them) belong, with what to do about it; ``where``
    says how it was named when it was not given on its own."""
    name = path.lower()
    if name.endswith((".csv", ".jsonl")):
        hint = (f"it is an index of images: write them as shards first, `mmray data prepare {path} DEST`, and "
                "read DEST")
    elif name.endswith(UNSTREAMABLE_TARS):
        hint = ("it is a tar compressed with a codec that Arrow cannot stream; decompress it, or recompress it as "
                ".tar.gz or .tar.zst")
    else:
        hint = "give a shard, a directory of them, or a prepared data set"
    what = f"{path}{where} is not a shard" if where else f"{path} is a file but not a shard"
    return storage.StorageError(f"{what} ({SHARD_NAMES}); {hint}")


class NoShards(storage.StorageError):
    """A directory without shards (which may be a folder of images to ingest: see mmray.infer.inputs)."""


def no_shards(directory: str) -> NoShards:
    """The error for a directory without shards; when it holds images, it says how to make shards of them."""
    message = f"no shards ({SHARD_NAMES}) under {directory}"
    try:
        images = image_files(directory, recursive=True)
    except storage.StorageError:
        images = []
    if images:
        message += (f"; it holds {len(images)} image file(s) (e.g. {images[0]}): write them as shards first, "
                    f"`mmray data prepare {directory} DEST`, and read DEST")
    return NoShards(message)


def _parent(path: str) -> str:
    if storage.is_s3(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return posixpath.dirname(storage.resolve(path)[1])


def _normal(path: str) -> str:
    """Local paths absolute (as listings return them), URIs as they are."""
    return path if storage.is_s3(path) else storage.resolve(path)[1]


def _check_exist(paths: list[str], what: str, allow_missing: bool) -> list[str]:
    """``paths`` that exist, found by listing each parent directory once (not one request per file)."""
    present: set[str] = set()
    for parent in dict.fromkeys(_parent(p) for p in paths):
        try:
            present.update(storage.list_files(parent))
        except storage.StorageError:
            pass  # a missing directory: all its shards are missing, and are named below
    found = [p for p in paths if _normal(p) in present]
    missing = [p for p in paths if _normal(p) not in present]
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise storage.StorageError(f"shard does not exist: {missing[0]}{more}, named by {what}; set "
                                   "data.allow_missing_shards=true (`--allow-missing-shards` for `mmray data inspect`) "
                                   "to skip missing shards")
    if missing:
        log.warning("skipping %d missing shard(s) of %s (data.allow_missing_shards): %s", len(missing), what,
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if not found:
        raise storage.StorageError(f"none of the {len(paths)} shard(s) named by {what} exists (first: {paths[0]})")
    return [_normal(p) for p in found]


@dataclass(frozen=True)
class Part:
    """One ``::`` part of a source: a prepared data set (``prepared``) or shards (a prefix, file or pattern)."""

    spec: str
    prepared: bool

    def shards(self, split: str = "train", allow_missing: bool = False) -> list[str]:
        """The part's shard files, sorted as listed or in pattern order; StorageError names what is missing."""
        if self.prepared:
            directory = storage.join(self.spec, split)
            paths = list_shards(directory)
            if not paths:
                raise no_shards(directory)
            return paths
        names = expand_braces(self.spec)
        if len(names) > 1 or is_shard(names[0]):
            bad = [n for n in names if not is_shard(n)]
            if bad:
                raise not_a_shard(bad[0], f" (from {self.spec})")
            return _check_exist(names, self.spec, allow_missing)
        if is_file(self.spec):
            raise not_a_shard(self.spec)
        paths = list_shards(self.spec)
        if not paths:
            raise no_shards(self.spec)
        return paths


def parts(spec: str) -> list[Part]:
    """The parts of a source, each classified: a directory with a ``train/`` split is a prepared data set."""
    out = []
    for part in split_parts(spec):
        shards_named = "{" in part or is_shard(part)
        out.append(Part(part, prepared=not shards_named and is_dir(storage.join(part, "train"))))
    return out


def split_shards(spec: str, split: str, allow_missing: bool = False) -> list[str]:
    """Every shard a spec names for one split, in part order: the ``split`` shards of its prepared data sets and the
    shards of its other parts (held-out data: data.val_source, `mmray eval --data`). StorageError names what is
    missing; SourceError a shard that two parts name (it would be read twice)."""
    return _once([s for part in parts(spec) for s in part.shards(split, allow_missing)], spec)


def _once(found: list[str], spec: str) -> list[str]:
    """``found``, after checking that no shard is in it twice (two parts naming it: it would be read twice)."""
    seen: set[str] = set()
    for shard in found:
        if shard in seen:
            raise SourceError(f"shard {shard} is named by more than one part of {spec!r}")
        seen.add(shard)
    return found


def inspect_shards(spec: str, allow_missing: bool = False) -> list[str]:
    """Every shard a spec names, for `mmray data inspect`: a prepared data set gives both splits. SourceError names
    a shard that two parts name (it would be read twice)."""
    found = []
    for part in parts(spec):
        if part.prepared:
            found += [p for split in SPLITS if is_dir(storage.join(part.spec, split)) for p in part.shards(split)]
        else:
            found += part.shards(allow_missing=allow_missing)
    return _once(found, spec)


def display(spec: str) -> str:
    """The spec with local parts made absolute (for summaries)."""
    return PART_SEPARATOR.join(_normal(p) for p in split_parts(spec))


# ------------------------------------------------------------------------------------------------ stats


def stats_path(shard: str) -> str:
    """``.../00000.tar`` -> ``.../00000_stats.json`` (img2dataset's name for a shard's stats)."""
    return shard_stem(shard) + STATS_SUFFIX


def read_stats(shard: str) -> int | None:
    """The sample count (``successes``) in a shard's ``_stats.json``, or None when it has none or it is unreadable."""
    try:
        data = storage.read_bytes(stats_path(shard))
    except storage.StorageError:
        return None
    return parse_stats(data, stats_path(shard))


def parse_stats(data: bytes, where: str) -> int | None:
    """The ``successes`` of a ``_stats.json``'s bytes (read from ``where``), or None, with a warning, when they are
    not JSON or hold no count."""
    try:
        stats = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring %s: not JSON", where)
        return None
    successes = stats.get("successes") if isinstance(stats, dict) else None
    if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
        log.warning("ignoring %s: no integer 'successes'", where)
        return None
    return successes


def count_samples(shards: Iterable[str], progress: Callable[[str], None] | None = None) -> dict[str, int | None]:
    """Each shard's sample count from its ``_stats.json`` (None where unknown), read in parallel threads."""
    shards = list(shards)
    if progress and len(shards) > 100:
        progress(f"reading the _stats.json of {len(shards)} shards")
    with ThreadPoolExecutor(min(_STATS_THREADS, max(1, len(shards)))) as pool:
        return dict(zip(shards, pool.map(read_stats, shards)))


def total_samples(counts: dict[str, int | None], weights: dict[str, float] | None = None) -> int | None:
    """The expected samples of an epoch over these shards (each times its weight), or None if any count is
    unknown."""
    if not counts or any(n is None for n in counts.values()):
        return None
    return round(sum(n * (weights or {}).get(path, 1.0) for path, n in counts.items()))
