"""The Ray Data input pipeline: stream shards -> decode, resize, normalise, tokenize -> per-worker batches.

Batch schema (numpy, one row per sample), produced by :class:`Preprocess` and consumed by mmray.train.loop:

    image     uint8   (N, S, S, 3)  RGB pixels, channels last as decoded, S = data.image_size; the model moves
                                    the channels first and scales them to [-1, 1] on the training worker
                                    (mmray.models.encoders.normalise_pixels), so the object store carries a quarter
                                    of the bytes of float32 and no CPU worker spends time transposing or scaling
    text_ids  int64   (N, T)        token ids, right-padded with the tokenizer's pad id, T = data.max_text_len
    caption   object  (N,)          the caption text (retrieval counts a hit when texts are equal)
    key       object  (N,)          the sample key inside its shard
    shard     object  (N,)          the shard it came from; (shard, key) names the sample (mmray.data.position)

and, from the sample's JSON metadata (WebDataset ``.json`` member) when it has any, for VQA and zero-shot:

    question_ids  int64   (N, T)    the tokenized question ([BOS] ... [EOS], padded); the empty text without QA
    answer_ids    int64   (N, A)    the tokenized answer, A = ANSWER_LEN; [BOS] then padding without QA
    question      object  (N,)      the question text ("" without QA)
    answer        object  (N,)      the answer text ("" without QA)
    qa_type       object  (N,)      the question's type, e.g. count / colour / shape / position ("" without QA)
    label         object  (N,)      the class label for zero-shot classification ("" when there is none)

A sample with several QA pairs contributes one of them, chosen by a hash of its key, so the choice is the same on
every epoch, worker and run.

Bad samples (undecodable or oversized images, missing or non-UTF-8 captions, members without their pair, truncated
shards) are dropped per sample, never per block, and counted by reason in a :class:`DataQuality` actor; the trainer
reports the counts and stops the run when their fraction exceeds ``data.max_bad_fraction``.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
import zlib
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image, ImageOps

from mmray import storage
from mmray.config import Config, webdataset_members
from mmray.data.mixing import COPY_SEPARATOR
from mmray.data.tokenizer import TextTokenizer, qa_entries, qa_text

# Images above this many pixels are refused before decoding (a decompression bomb costs memory, not just time).
MAX_IMAGE_PIXELS = 8192 * 8192
EXAMPLES_PER_REASON = 5


class BadDataError(ValueError):
    """The data set is unusable (too many bad samples, no shards, a shard without the configured columns); the message
    names the reason and examples."""

    def __str__(self) -> str:
        # Raised in a Ray Data read task, the error comes back with Ray's retry note appended to its message
        # ("Failed to read stream iteratively after 1/10 attempts ... configure retried_io_errors ..."): advice about
        # transient errors, wrong for a data set that no retry can fix.
        return super().__str__().split("\nFailed to ", 1)[0]


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> TextTokenizer:
    # Map tasks receive the tokenizer as a JSON string; parse it once per worker process.
    return TextTokenizer.from_str(tokenizer_json)


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says; as stored when it has none, or an EXIF block Pillow cannot parse
    (the pixels are fine: a damaged tag is no reason to drop the image)."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return img  # upright already: no copy (exif_transpose would make one)
        return ImageOps.exif_transpose(img)
    except Exception:  # Pillow raises SyntaxError, struct.error, ... for malformed EXIF
        return img


# JPEG colour spaces that libjpeg-turbo converts to RGB as Pillow does; CMYK / YCCK (Adobe's inverted CMYK) go
# through Pillow, which knows the Adobe convention.
_FAST_JPEG_COLORSPACES = frozenset({"YCbCr", "Gray", "RGB"})
_XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"  # how an APP1 segment of XMP metadata starts


def _jpeg_may_be_rotated(data: bytes) -> bool:
    """Whether a JPEG may carry an orientation, which Pillow reads from an EXIF block (an APP1 segment starting
    ``Exif\\0\\0``) or, without one, from XMP's ``tiff:Orientation`` (an APP1 segment in Adobe's XMP namespace).
    Walks the marker segments before the first scan (a handful, each with its length), so the cost does not grow
    with the file. Unparseable structure counts as rotated: the caller then takes Pillow's path, which decides."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return True
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: the entropy-coded data follows, no more header segments
            return False
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1:
            payload = data[i + 4:end]
            if payload.startswith(b"Exif\x00\x00") or (payload.startswith(_XMP_APP1) and b"Orientation" in payload):
                return True
        i = end
    return True


def _dct_scaled(h: int, w: int, size: int) -> tuple[int, int]:
    """The sides libjpeg-turbo decodes an (h, w) JPEG to at the smallest M/8 scale (M = 1..8) that keeps both at
    least ``size`` (or whole, for a smaller image): ceil(side * M / 8)."""
    for m in range(1, 9):
        sh, sw = -(-h * m // 8), -(-w * m // 8)
        if sh >= min(size, h) and sw >= min(size, w):
            return sh, sw
    return h, w


def _decode_jpeg_fast(data: bytes, size: int, out: np.ndarray | None = None) -> np.ndarray | None:
    """A baseline or progressive JPEG without an orientation, decoded by libjpeg-turbo through simplejpeg at the
    smallest DCT scale (M/8, M = 1..8) whose sides are at least ``size``; None when the file needs Pillow's path
    (an EXIF or XMP orientation, CMYK, an error). Pillow's draft mode scales by 1/2, 1/4 or 1/8 only, so a 256 px
    source decodes whole and is then resized to 224 px; here it decodes at 7/8, straight to 224, 2.7x cheaper (the
    resize is most of the cost). At the scales both can use the pixels are the same, bit for bit: the same library
    decodes them. With ``out`` (uint8, (size, size, 3)), an image whose scale lands on ``size`` is decoded
    straight into it."""
    import simplejpeg

    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if h * w > MAX_IMAGE_PIXELS:
        raise ValueError("image_too_large")
    if colorspace not in _FAST_JPEG_COLORSPACES or _jpeg_may_be_rotated(data):
        return None
    scale = {"colorspace": "RGB", "min_height": min(size, h), "min_width": min(size, w), "strict": True}
    if out is not None and _dct_scaled(h, w, size) == (size, size):
        try:
            return simplejpeg.decode_jpeg(data, buffer=out, **scale)
        except ValueError:
            pass  # the file needs Pillow's path after all: tried below
    try:
        # strict: a warning (a truncated file, corrupt data) falls back to Pillow, which decides as it always has
        return simplejpeg.decode_jpeg(data, **scale)
    except ValueError:
        return None


def decode_pixels(data: bytes, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 RGB (size, size, 3), channels last. Raises ValueError with a short reason on bad input.
    With ``out`` (a C-contiguous uint8 (size, size, 3) array, e.g. a row of a block's pixels), the pixels are
    written there, decoded straight into it where the decoder can, and ``out`` is returned.

    JPEGs are decoded with DCT scaling straight to the smallest scale at least ``size`` (:func:`_decode_jpeg_fast`),
    which is much cheaper than a full decode followed by a resize; other formats, and JPEGs with an orientation or
    in CMYK, go through Pillow (draft mode for JPEGs). The image is turned upright as its EXIF (or XMP) orientation
    says (a phone photo stored sideways is seen as the caption describes it), and 16-bit greyscale is scaled to 8
    bits (Pillow's RGB conversion would clip it).
    """
    if not data:
        raise ValueError("empty_image")
    pixels = _decode_jpeg_fast(data, size, out) if data[:3] == b"\xff\xd8\xff" else None
    if pixels is None:
        pixels = _decode_pillow(data, size)
    elif pixels.shape[:2] != (size, size):
        if out is not None and np.shares_memory(pixels, out):
            # decoded into the start of ``out`` at a scale other than _dct_scaled predicted; the resize fills it
            pixels = np.array(pixels)
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))
    if out is None:
        return pixels
    if pixels.__array_interface__["data"][0] != out.__array_interface__["data"][0]:
        out[...] = pixels  # not decoded in place (a resize, or Pillow's path): one copy
    return out


def _decode_pillow(data: bytes, size: int) -> np.ndarray:
    """decode_pixels through Pillow: formats other than JPEG, and JPEGs that need it (EXIF, CMYK, damage)."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError("image_too_large")
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        # 16-bit greyscale: "I;16" in current Pillow, "I" for a 16-bit PNG in older releases.
        sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # a truncated or hostile file fails here, as corrupt_image / image_too_large
        img = _upright(img)
        if sixteen_bit:
            img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
        img = img.convert("RGB")
    except ValueError as e:
        if str(e) == "image_too_large":
            raise
        raise ValueError("corrupt_image") from None
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for truncated or non-images
        raise ValueError("corrupt_image") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img)  # channels last: a (3, S, S) transpose cost 3-8% of a 224 px sample's CPU downstream


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded bytes -> float32 (3, size, size) in [-1, 1], channels first, for single images (search queries,
    tests): the same values, bit for bit, that the model computes from :func:`decode_pixels`' uint8
    (``x / 127.5 - 1``)."""
    return decode_pixels(data, size).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


def decode_caption(data: bytes | None) -> str:
    """Raw caption bytes -> stripped text; ValueError with a short reason when missing, empty or not UTF-8. A UTF-8
    byte-order mark (Windows editors write one) is not part of the text."""
    if data is None:
        raise ValueError("missing_caption")
    try:
        text = bytes(data).decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ValueError("non_utf8_caption") from None
    if not text:
        raise ValueError("empty_caption")
    return text


ANSWER_LEN = 8  # tokens of [BOS] answer [EOS]: answers are a word or two


def pick_qa(key: str, meta: dict) -> dict | None:
    """The one QA pair (``question``, ``answer``, ``type``; text) a sample contributes, or None when it has none.

    The pairs are :func:`mmray.data.tokenizer.qa_entries` (``meta["qa"]``, or top-level question / answer fields),
    each with a question and an answer (text, or a number or boolean: see :func:`mmray.data.tokenizer.qa_text`);
    entries without both are not usable. Which usable one a sample contributes is fixed by its key."""
    qa = []
    for q in qa_entries(meta):
        if (question := qa_text(q.get("question"))) and (answer := qa_text(q.get("answer"))):
            qa.append({"question": question, "answer": answer, "type": str(q.get("type") or "")})
    return qa[zlib.crc32(str(key).encode()) % len(qa)] if qa else None


def zero_shot_label(meta: dict) -> str:
    """A sample's class for zero-shot classification: its metadata's ``label``, or for a shapes scene with one
    object, that object's shape; "" when it has none."""
    if isinstance(meta.get("label"), str):
        return meta["label"]
    objects = meta.get("objects")
    if isinstance(objects, list) and len(objects) == 1 and isinstance(objects[0], dict):
        return str(objects[0].get("shape", ""))
    return ""


def decode_meta(data: bytes | None) -> dict:
    """The JSON metadata of a sample as a dict ({} when absent); ValueError ``bad_metadata`` when not a JSON object."""
    if data is None:
        return {}
    try:
        meta = json.loads(bytes(data).decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("bad_metadata") from None
    if not isinstance(meta, dict):
        raise ValueError("bad_metadata")
    return meta


# The keys of the samples one break lost after the first (KEY/1, ...), and their mixing copies (KEY~1, KEY/1~1)
LOST_KEY = re.compile(rf"(#truncated|#rowgroup\d+)(/\d+)?({re.escape(COPY_SEPARATOR)}\d+)?$")


class DataQuality:
    """A Ray actor that totals good and bad samples (by reason, with example keys) across all preprocessing tasks."""

    def __init__(self):
        self.good = 0
        self.bad: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, good: int, bad: dict[str, list[str]]) -> None:
        self.good += good
        for reason, keys in bad.items():
            self.bad[reason] += len(keys)
            kept = self.examples.setdefault(reason, [])
            for key in keys:  # distinct examples; the samples one break lost (KEY, KEY/1, ...) are one example
                key = LOST_KEY.sub(r"\1", key)
                if len(kept) >= EXAMPLES_PER_REASON:
                    break
                if key not in kept:
                    kept.append(key)

    def snapshot(self) -> dict:
        return {"good": self.good, "bad": dict(self.bad), "bad_examples": dict(self.examples)}


# A sample's id, (shard, key): the rows of a data position's consumed set (mmray.data.position).
SAMPLE_IDS = pa.schema([("shard", pa.string()), ("key", pa.string())])


class DataPosition:
    """A Ray actor, one per training run: the epoch the training datasource serves and the ids to leave out of it
    (see mmray.data.position).

    Rank 0 sets it before each epoch starts (:meth:`set`); the datasource reads it when Ray Data plans the epoch's
    reads, which happens only once every rank has asked for the epoch (the streaming split's barrier).

    It also keeps how many rows each shard the epoch's read tasks have read to its end gave and a digest of their
    keys, with the shard's signature at the planning (its size, modification time and mixing weight:
    :meth:`planned`), so that a shard whose rows have all been trained on is not read again on resume
    (mmray.data.position). Rank 0 saves them with each checkpoint (:meth:`rows_read`) and hands them back with the
    consumed ids; they survive a restart of the worker group in this actor too (the same epoch keeps them)."""

    def __init__(self):
        self.epoch, self.consumed = 0, SAMPLE_IDS.empty_table()
        self.shard_rows: dict[str, list] = {}  # shard -> [rows, signature, key digest]
        self.signatures: dict[str, str] = {}  # shard -> signature, at the epoch's planning
        self.plan = 0  # the number of the latest planning: a read task of an earlier one is not counted
        self.skipped: dict[int, int] = {}  # epoch -> shards its (last) planning left unread as trained on

    def set(self, epoch: int, consumed, shard_rows: dict[str, list] | None = None) -> None:
        if epoch != self.epoch:
            self.shard_rows = {}
        self.shard_rows = {**(shard_rows or {}), **self.shard_rows}  # this driver's own counts are the newer ones
        self.epoch, self.consumed = epoch, consumed

    def get(self):
        return self.epoch, self.consumed, dict(self.shard_rows)

    def planned(self, epoch: int, signatures: dict[str, str], skipped: int) -> int:
        """A planning of ``epoch``: each shard's signature, and how many shards it leaves unread. Returns its number,
        which its read tasks report with (:meth:`shard_read`)."""
        self.signatures, self.skipped[epoch] = signatures, skipped
        self.plan += 1
        return self.plan

    def shard_read(self, plan: int, epoch: int, shard: str, rows: int, digest: str) -> None:
        """A read task of planning ``plan`` read ``shard`` to its end in ``epoch``: it gave ``rows`` rows (the
        consumed ones included), whose keys have the ``digest`` (mmray.data.position.key_digest). A task of an
        earlier planning (one left running by a restarted worker group) is not counted: the shard may have changed
        since, and its count would be kept under the new signature."""
        if plan == self.plan and epoch == self.epoch and self.signatures.get(shard) is not None:
            self.shard_rows[shard] = [rows, self.signatures[shard], digest]

    def rows_read(self) -> tuple[int, dict[str, list]]:
        return self.epoch, dict(self.shard_rows)

    def shards_skipped(self) -> int:
        """The shards the run's resumes did not read again (the last planning of each epoch)."""
        return sum(self.skipped.values())


class RunData(DataQuality, DataPosition):
    """A training run's one data actor: the data-quality totals and the data position together, so that a run
    starts one process for them (this module does not import Ray Data, which costs a second a process)."""

    def __init__(self):
        DataQuality.__init__(self)
        DataPosition.__init__(self)


@contextmanager
def ray_running(log_to_driver: bool = True) -> Iterator[None]:
    """For a command that reads data (inspect, eval, embed, ...): join the cluster in RAY_ADDRESS, use the caller's
    Ray, or start (and then stop) a local one. Ray Data's progress bars are off: progress is our lines on stderr."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=log_to_driver)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        if started:
            ray.shutdown()


def quality_snapshot(quality, attempts: int = 5) -> dict:
    """The counts so far; retried because a busy actor can be briefly unreachable (ActorUnavailableError)."""
    import time

    import ray

    for attempt in range(attempts):
        try:
            return ray.get(quality.snapshot.remote(), timeout=60)
        except ray.exceptions.ActorUnavailableError:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


# What to check for the reasons whose usual cause is how the shards were written or are read, not a bad sample.
BAD_REASON_HINTS = {
    "missing_caption": "a sample without its caption: are captions in another member (data.caption_extension) or "
                       "Parquet column (data.caption_column)?",
    "missing_image": "a sample without its image: are images in other members (data.image_extensions) or another "
                     "Parquet column (data.image_column)?",
    "members_not_adjacent": "WebDataset needs a sample's files next to each other in the tar: write shards with "
                            "their members sorted by name (tar --sort=name, or webdataset's ShardWriter)",
    "truncated_shard": "a tar that ends early or has a corrupt header: download or write the shard again",
}


def check_quality(snapshot: dict, max_bad_fraction: float, advice: str = "") -> None:
    """Raise BadDataError when the bad fraction so far exceeds the limit; the message names reasons and examples,
    what to check for the reasons that usually come from how the shards were written or are read, then ``advice``."""
    bad = sum(snapshot["bad"].values())
    total = bad + snapshot["good"]
    if total and bad / total > max_bad_fraction:
        hints = "; ".join(f"{r}: {BAD_REASON_HINTS[r]}" for r in snapshot["bad"] if r in BAD_REASON_HINTS)
        raise BadDataError(
            f"{bad} of {total} samples ({bad / total:.1%}) are bad, over data.max_bad_fraction={max_bad_fraction}: "
            f"{snapshot['bad']}; examples: {snapshot['bad_examples']}" + (f". What to check: {hints}" if hints else "")
            + (f". {advice}" if advice else ""))


CAPTION_REASONS = ("missing_caption", "empty_caption", "non_utf8_caption")


class Preprocess:
    """Raw rows (see mmray.data.reader.RAW_SCHEMA) -> model-ready rows; bad samples are dropped and counted.

    With ``captions_required`` False (generating captions or answers, which reads no caption), a sample without a
    usable caption is kept with the caption ""."""

    def __init__(self, tokenizer_json: str | None, image_size: int, max_text_len: int, quality=None,
                 captions_required: bool = True):
        self.tokenizer_json = tokenizer_json  # None: no tokenization (data inspection)
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.quality = quality  # a DataQuality actor handle, or None to skip reporting
        self.captions_required = captions_required

    def _caption(self, data, error: str) -> str:
        reason = error.split(":")[0] if error else ""
        if reason and (self.captions_required or reason not in CAPTION_REASONS):
            raise ValueError(reason)
        try:
            return decode_caption(data)
        except ValueError:
            if self.captions_required:
                raise
            return ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions, keys, shards, qas, labels = [], [], [], [], []
        bad: dict[str, list[str]] = {}
        # Pixels are decoded straight into the block's array (no per-image array, no stacking copy afterwards).
        pixels = np.empty((len(batch["key"]), self.image_size, self.image_size, 3), np.uint8)
        metas = batch["meta"] if "meta" in batch else [None] * len(batch["key"])
        for key, shard, image, caption, meta, error in zip(batch["key"], batch["shard"], batch["image"],
                                                           batch["caption"], metas, batch["error"]):
            try:
                text = self._caption(caption, error)
                info = decode_meta(meta)
                decode_pixels(image, self.image_size, out=pixels[len(keys)])
            except ValueError as e:
                bad.setdefault(str(e), []).append(f"{shard}:{key}")
                continue
            captions.append(text)
            keys.append(key)
            shards.append(shard)
            qas.append(pick_qa(key, info) or {"question": "", "answer": "", "type": ""})
            labels.append(zero_shot_label(info))
        if self.quality is not None:  # a DataQuality actor handle, or a plain DataQuality in-process
            add = self.quality.add
            if hasattr(add, "remote"):
                import ray

                # Waited for (one short actor call a block): once a block is out, its counts are in the totals, so
                # a snapshot taken after the data was consumed (inspect, the run's summary) misses none.
                ray.get(add.remote(len(keys), bad))
            else:
                add(len(keys), bad)
        out = {"image": pixels[:len(keys)],
               "caption": np.array(captions, dtype=object), "key": np.array(keys, dtype=object),
               "shard": np.array(shards, dtype=object),
               "question": np.array([q["question"] for q in qas], dtype=object),
               "answer": np.array([q["answer"] for q in qas], dtype=object),
               "qa_type": np.array([str(q.get("type", "")) for q in qas], dtype=object),
               "label": np.array(labels, dtype=object)}
        if self.tokenizer_json is not None:
            out["text_ids"] = self._encode(captions, self.max_text_len)
            out["question_ids"] = self._encode(out["question"], self.max_text_len)
            answers = self._encode(out["answer"], min(ANSWER_LEN, self.max_text_len))
            answers[out["answer"] == "", 1:] = _tokenizer(self.tokenizer_json).pad_id  # [BOS] alone: nothing to learn
            out["answer_ids"] = answers
        return out

    def _encode(self, texts, length: int) -> np.ndarray:
        """Token ids (N, length). A sample without the text ("") gets the ids of the empty text ([BOS] [EOS] with
        the shipped tokenizer), so that every row has a real token to attend to."""
        if not len(texts):
            return np.zeros((0, length), np.int64)
        return _tokenizer(self.tokenizer_json).encode_batch(list(texts), length)


def read_raw(paths: list[str], shuffle_seed: int | None = None, weights: dict[str, float] | None = None,
             mix_seed: int = 0, position=None, shuffle_window: int = 0, **reader_options):
    """A lazily-evaluated, streaming Ray Dataset of raw samples (mmray.data.reader.RAW_SCHEMA) from the shards.

    ``weights`` (shard path -> weight, see mmray.data.mixing) repeats or drops each sample by its shard's weight,
    deterministically for ``mix_seed``; ``reader_options`` go to ShardDatasource (e.g. Parquet column names).
    With ``position`` (a :class:`mmray.data.position.DataPosition` actor), each epoch's shard order is seeded by
    ``(shuffle_seed, epoch)`` and the samples already trained on in that epoch are left out (exact resume); the
    mixing then happens in the datasource, before that filter, since each copy of a sample has its own key; and
    ``shuffle_window`` rows of each shard at a time are shuffled by a seeded hash of their keys
    (:func:`mmray.data.position.window_order`)."""
    import ray.data
    from ray.data import FileShuffleConfig

    from mmray.data.mixing import Resample
    from mmray.data.position import PositionedShardDatasource
    from mmray.data.reader import ShardDatasource

    fs, _ = storage.resolve(paths[0])
    resolved = [storage.resolve(p)[1] for p in paths]
    resample = None
    if weights and any(w != 1 for w in weights.values()):
        by_shard = {storage.resolve(p)[1]: w for p, w in weights.items()}  # as the reader's ``shard`` column names it
        resample = Resample(by_shard, mix_seed)
    # One read task per file: Ray Data fuses the read with the following map_batches (Preprocess, see
    # preprocessed()) into one task per file, ~25% less CPU a sample than passing the raw bytes through the object
    # store to separate decode tasks (bench/data_throughput.py).
    if position is not None:
        return ray.data.read_datasource(PositionedShardDatasource(
            resolved, seed=shuffle_seed or 0, position=position, resample=resample, window=shuffle_window,
            filesystem=fs, **reader_options),
            override_num_blocks=len(paths))
    source = ShardDatasource(resolved, filesystem=fs,
                             shuffle=FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None,
                             **reader_options)
    ds = ray.data.read_datasource(source, override_num_blocks=len(paths))
    if resample is not None:
        ds = ds.map_batches(resample, batch_size=None, batch_format="numpy")  # batch_size=None: fused, see above
    return ds


BLOCK_PIXEL_BYTES = 24 << 20


def block_rows(image_size: int) -> int:
    """Samples per block the shard reader emits, for images of side ``image_size``: 256, halved until a block's
    pixels would fit in 24 MiB (128 at 224 px). In one process (the reader and Preprocess without Ray) 128-row
    blocks took 2.26 ms of CPU a sample at 224 px against 2.50 ms for 256-row ones. Through Ray Data these are not
    the blocks Preprocess decodes: Ray Data's read operator merges the reader's blocks up to its
    ``target_max_block_size`` (128 MiB) before the fused map, see :func:`preprocessed`."""
    rows = 256
    while rows > 16 and rows * image_size * image_size * 3 > BLOCK_PIXEL_BYTES:
        rows //= 2
    return rows


DECODED_BATCH_BYTES = 128 << 20  # Ray Data's default target_max_block_size, applied to the decoded pixels


def decoded_rows(image_size: int) -> int:
    """The most samples one Preprocess call decodes: as many as fill DECODED_BATCH_BYTES with pixels of side
    ``image_size`` (891 at 224 px, 43,690 at 32 px)."""
    return max(1, DECODED_BATCH_BYTES // (image_size * image_size * 3))


def preprocessed(ds, pre: Preprocess):
    """``ds`` (raw samples, :func:`read_raw`) decoded by ``pre``, fused with the read into one task per shard, at
    most :func:`decoded_rows` samples a call.

    Ray Data's read operator merges the reader's blocks until one passes ``target_max_block_size`` (128 MiB) of
    encoded bytes: a 1000-sample shard of 96 KB JPEGs arrives whole, and an img2dataset shard of 10,000 256 px
    JPEGs (35 KB at quality 95) in pieces of ~3,800 samples. Decoded whole, such a piece is one 570 MB array of
    224 px pixels in each task. Batches of decoded_rows keep a task's pixel array at 128 MiB (a decoding worker's
    peak RSS on that shard: 2.1 GiB against ~3.0, bench/decode_batch_memory.py), and each leaves the task as a
    block of its own (Ray Data merges output blocks only below its target, and slices them only past 1.5 times it).
    Much smaller batches cost throughput, since every block pays Ray Data's and the object store's fixed costs:
    against whole 1000-sample shards, batches of 128 at 224 px (blocks of 19 MB) decoded 1-4% fewer samples per
    CPU-second (within this machine's noise), and batches of 256 at 32 px (786 KB) 40% fewer.

    The batches are cut here (:class:`InChunks`), not by map_batches' batch_size: Ray Data would then bundle read
    tasks, several shards to one task, until their rows reached the batch size."""
    return ds.map_batches(InChunks(pre, decoded_rows(pre.image_size)), batch_size=None, batch_format="numpy")


class InChunks:
    """``pre`` applied to a batch ``rows`` samples at a time, each result yielded as a batch of its own (Ray Data
    makes each one a block)."""

    def __init__(self, pre, rows: int):
        self.pre, self.rows = pre, rows

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        n = len(batch["key"])
        if n <= self.rows:
            yield self.pre(batch)
            return
        for start in range(0, n, self.rows):
            yield self.pre({k: v[start:start + self.rows] for k, v in batch.items()})


READER_KEYS = ("image_column", "caption_column", "image_extensions", "caption_extension", "metadata_extension")
READER_OVERRIDES = tuple(f"data.{k}" for k in READER_KEYS)  # as commands that read data accept them


def reader_options(cfg: Config) -> dict:
    """ShardDatasource options from the config's ``data`` keys in READER_KEYS: Parquet column names and WebDataset
    member extensions, and the block size for data.image_size (:func:`block_rows`). Every reader of shards
    (training, evaluation, `mmray data inspect`, inference) takes them from here."""
    image_exts, caption_ext, meta_ext = webdataset_members(cfg.data)
    return {"image_column": cfg.data.image_column, "caption_column": cfg.data.caption_column,
            "image_exts": image_exts, "caption_ext": caption_ext, "meta_ext": meta_ext,
            "rows_per_block": block_rows(cfg.data.image_size)}


def read_split(paths: list[str], cfg: Config, tokenizer: TextTokenizer, shuffle_seed: int | None = None,
               quality=None, weights: dict[str, float] | None = None, position=None):
    """Raw samples (mixed by ``weights``, seeded by train.seed) preprocessed into the batch schema, streaming
    (``position``: see :func:`read_raw`)."""
    raw = read_raw(paths, shuffle_seed, weights, cfg.train.seed, position=position,
                   shuffle_window=cfg.data.shuffle_buffer, **reader_options(cfg))
    return preprocessed(raw, Preprocess(tokenizer.to_str(), cfg.data.image_size, cfg.data.max_text_len, quality))
