"""`mmray search`: brute-force cosine top-k over the embeddings that `mmray embed` wrote.

Text to image: the query text is embedded by the export's text tower and compared with every ``image_embedding``.
Image to text: the query image is embedded by the image tower and compared with every ``text_embedding``; rows
with the same caption are one hit (the best-scoring row), since they are the same text.

The embeddings are streamed from OUT in record batches and a running top-k is kept, so memory stays bounded by the
batch and k, not the catalogue. A contact sheet (PNG) shows the hits' images, read back from their source shards
through mmray's reader.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mmray import storage
from mmray.config import ConfigError
from mmray.infer.outputs import MANIFEST, OutputDir

DIRECTIONS = {"text": "image_embedding", "image": "text_embedding"}  # query modality -> column searched
CELL = 160  # contact sheet: side of each image, in pixels


def embeddings_info(out: str) -> dict:
    """OUT's manifest; StorageError when OUT was not written by `mmray embed`."""
    manifest = OutputDir(out).manifest()
    if manifest is None or manifest.get("kind") != "embeddings":
        raise storage.StorageError(f"{storage.join(out, MANIFEST)} is missing or not from `mmray embed`: "
                                   f"{out} holds no embeddings")
    return manifest


def iter_embeddings(out: str, column: str, batch_rows: int = 65536) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """(metadata batch: key, shard, caption and, from outputs that have it, source; embeddings (n, E) float32) over
    every finished output of OUT."""
    import pyarrow.dataset as pads

    files = OutputDir(out).files()
    if not files:
        raise storage.StorageError(f"{out} has no finished embedding shards")
    fs, _ = storage.resolve(out)
    dataset = pads.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet")
    meta = [name for name in ("key", "shard", "source", "caption") if name in dataset.schema.names]
    for batch in dataset.to_batches(columns=[*meta, column], batch_size=batch_rows):
        if batch.num_rows == 0:
            continue
        flat = pc.list_flatten(batch.column(column)).to_numpy(zero_copy_only=False)
        yield batch, flat.astype(np.float32, copy=False).reshape(batch.num_rows, -1)


def _top(scores: np.ndarray, captions: list[str], k: int, unique_captions: bool) -> list[int]:
    """Indices of the k best scores, best first; with ``unique_captions`` the best row of each of k captions."""
    if not unique_captions:
        top = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
        return sorted(top.tolist(), key=lambda i: -scores[i])
    chosen, seen = [], set()
    for i in np.argsort(-scores, kind="stable"):
        if captions[i] not in seen:
            seen.add(captions[i])
            chosen.append(int(i))
            if len(chosen) == k:
                break
    return chosen


def search_vector(out: str, query: np.ndarray, against: str, k: int = 5, unique_captions: bool = False) -> list[dict]:
    """The ``k`` rows of OUT whose ``against`` embedding (``image_embedding`` / ``text_embedding``) has the highest
    cosine with ``query`` (E,), best first: ``{"key", "caption", "score", "shard", "source"}`` (``source``: the
    original image file or URL, see mmray.infer.embed.OUTPUT_SCHEMA). With ``unique_captions``, one
    row per distinct caption (its best)."""
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    q = np.asarray(query, np.float32).reshape(-1)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    best: list[dict] = []
    for meta, emb in iter_embeddings(out, against):
        if emb.shape[1] != q.shape[0]:
            raise ConfigError(f"the query embedding has {q.shape[0]} dimensions but {out} holds {emb.shape[1]}: "
                              "embed the query with the export that wrote OUT")
        scores = emb @ q / np.maximum(np.linalg.norm(emb, axis=1), 1e-12)           # (n,) cosines
        cols = {name: meta.column(name).to_pylist() for name in meta.schema.names}
        sources = cols.get("source") or [""] * len(scores)  # outputs written before the column existed
        best += [{"key": cols["key"][i], "caption": cols["caption"][i], "score": float(scores[i]),
                  "shard": cols["shard"][i], "source": sources[i]}
                 for i in _top(scores, cols["caption"], k, unique_captions)]
        merged = np.array([h["score"] for h in best], np.float32)
        best = [best[i] for i in _top(merged, [h["caption"] for h in best], k, unique_captions)]
    return best


def _query_embedding(model, cfg, tokenizer, text: str | None, image: str | None) -> np.ndarray:
    from mmray.data.pipeline import decode_image
    from mmray.infer.embed import image_embeddings, text_embeddings

    with torch.inference_mode():
        if text is not None:
            ids = torch.from_numpy(tokenizer.encode_batch([text], cfg.data.max_text_len))
            return text_embeddings(model, ids)[0].numpy()
        data = storage.read_bytes(image)
        try:
            pixels = decode_image(data, cfg.data.image_size)
        except ValueError as e:  # the reason, as the data pipeline names it: corrupt_image, image_too_large
            raise ConfigError(f"--image {image}: not a readable image ({e})") from None
        return image_embeddings(model, torch.from_numpy(pixels)[None])[0].numpy()


def search(out: str, text: str | None = None, image: str | None = None, k: int = 5, export_dir: str | None = None,
           contact_sheet: str | None = None) -> dict:
    """Text-to-image (``text``) or image-to-text (``image``, a path or URI) top-k; returns the summary to print."""
    from mmray.data.pipeline import reader_options
    from mmray.infer.embed import check_can_embed
    from mmray.infer.runner import load_model, read_export

    if (text is None) == (image is None):
        raise ConfigError("give a query text, or --image PATH, but not both")
    if text is not None and not text.strip():
        raise ConfigError("the query text is empty: give words to search for, or --image PATH")
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    manifest = embeddings_info(out)
    export_dir = export_dir or manifest["export"]
    info = read_export(export_dir)
    if info.weights_sha256 != manifest["weights_sha256"]:
        raise ConfigError(f"export {export_dir} is not the one that wrote {out} (weights sha256 differ): the "
                          "query would be embedded in another space")
    check_can_embed(info.cfg)
    model, cfg, tokenizer, _ = load_model(export_dir)
    query = _query_embedding(model, cfg, tokenizer, text, image)
    direction = "text" if text is not None else "image"
    hits = search_vector(out, query, DIRECTIONS[direction], k, unique_captions=direction == "image")
    summary = {"command": "search", "out": out, "export": export_dir,
               "query": {"text": text} if text is not None else {"image": image},
               "direction": "text->image" if text is not None else "image->text", "k": k, "hits": hits}
    if contact_sheet:
        title = f'"{text}"' if text is not None else f"image {image}"
        storage.write_bytes(contact_sheet, render_contact_sheet(hits, title, reader_options(cfg)))
        summary["contact_sheet"] = contact_sheet
    return summary


def hit_images(hits: list[dict], reader: dict | None = None) -> list[bytes | None]:
    """The encoded image of each hit, read back from its source shard through mmray's reader (None if gone), with
    the reader options the shards were embedded with (:func:`mmray.data.pipeline.reader_options`)."""
    from mmray.config import Config
    from mmray.data.pipeline import reader_options
    from mmray.data.reader import iter_parquet, iter_tar
    from mmray.data.sources import is_parquet, tar_codec

    opts = reader or reader_options(Config())
    wanted: dict[str, set[str]] = {}
    for hit in hits:
        wanted.setdefault(hit["shard"], set()).add(hit["key"])
    found: dict[tuple[str, str], bytes] = {}
    for shard, keys in wanted.items():
        try:
            data = storage.read_bytes(shard)
        except storage.StorageError:
            continue
        fs_path = storage.resolve(shard)[1]
        blocks = (iter_parquet(data, fs_path, 4096, opts["image_column"], opts["caption_column"], "key")
                  if is_parquet(shard)
                  else iter_tar(io.BytesIO(data), fs_path, 4096, opts["image_exts"], opts["caption_ext"],
                                opts["meta_ext"], codec=tar_codec(shard)))
        for block in blocks:
            for key, img in zip(block.column("key").to_pylist(), block.column("image").to_pylist()):
                if key in keys and img is not None:
                    found[(shard, key)] = img
    return [found.get((h["shard"], h["key"])) for h in hits]


def render_contact_sheet(hits: list[dict], title: str, reader: dict | None = None) -> bytes:
    """PNG bytes: a grid of the hits' images (read back with ``reader``'s options, see :func:`hit_images`), each
    with its rank, score and caption under it."""
    from PIL import Image, ImageDraw, ImageFont

    from mmray.data.pipeline import decode_pixels

    font = ImageFont.load_default()
    cols = min(len(hits), 5) or 1
    rows = math.ceil(len(hits) / cols) or 1
    text_h, head = 48, 24
    sheet = Image.new("RGB", (cols * CELL, head + rows * (CELL + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"query: {title}"[:120], fill="black", font=font)
    for i, (hit, data) in enumerate(zip(hits, hit_images(hits, reader))):
        x, y = (i % cols) * CELL, head + (i // cols) * (CELL + text_h)
        try:  # decoded as the model saw it: upright, CMYK and 16-bit greyscale converted
            img = Image.fromarray(decode_pixels(data, CELL - 8)) if data else None
        except ValueError:  # a hit whose image no longer decodes still gets its cell
            img = None
        if img is not None:
            sheet.paste(img, (x + 4, y + 4))
        else:
            draw.rectangle((x + 4, y + 4, x + CELL - 4, y + CELL - 4), outline="gray")
            draw.text((x + 10, y + CELL // 2), "image unavailable", fill="gray", font=font)
        caption = hit["caption"]
        draw.text((x + 4, y + CELL), f"#{i + 1} {hit['score']:.3f}", fill="black", font=font)
        draw.text((x + 4, y + CELL + 14), caption[:26], fill="black", font=font)
        draw.text((x + 4, y + CELL + 28), caption[26:52], fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
