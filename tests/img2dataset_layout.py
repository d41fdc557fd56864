"""Write shards exactly as img2dataset lays them out (its writer.py / logger.py), for tests of reading real downloads.

``--output_format webdataset``: ``NNNNN.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample, the json indented
by 4), beside it ``NNNNN.parquet`` (the shard's metadata table: one row per input URL, failures included, no image
column) and ``NNNNN_stats.json``. ``--output_format parquet``: ``NNNNN.parquet`` with ``key``, ``jpg`` (null for a
failed URL) and the metadata columns (``url``, ``caption``, ``status``, ``error_message``, ``width``, ...), and
``NNNNN_stats.json``. The stats file holds ``count`` (URLs tried), ``successes``, ``failed_to_download``,
``failed_to_resize``, ``duration``, ``start_time``, ``end_time`` and ``status_dict``.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmray import storage
from mmray.data.webdataset import build_tar


def jpeg(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def write_img2dataset(dest: str, shards: int, urls_per_shard: int, output_format: str = "webdataset",
                      failed_every: int = 0, first_shard: int = 0, seed: int = 0) -> dict[str, list[str]]:
    """Write ``shards`` shards under ``dest``; every ``failed_every``-th URL failed to download. Returns each shard
    file's successful keys, in order."""
    written = {}
    for shard_id in range(first_shard, first_shard + shards):
        name = f"{shard_id:05d}"
        members, metas, ok = [], [], []
        for i in range(urls_per_shard):
            key = f"{shard_id:05d}{i:04d}"
            failed = bool(failed_every) and (i + 1) % failed_every == 0
            image = None if failed else jpeg(seed * 100000 + shard_id * 1000 + i)
            meta = {"url": f"https://example.com/{key}.jpg", "caption": f"photo {seed} {key}", "key": key,
                    "status": "failed_to_download" if failed else "success",
                    "error_message": "HTTP Error 404: Not Found" if failed else None,
                    "width": None if failed else 16, "height": None if failed else 16,
                    "original_width": None if failed else 16, "original_height": None if failed else 16}
            metas.append({**meta, "jpg": image} if output_format == "parquet" else meta)
            if not failed:
                ok.append(key)
                members += [(f"{key}.jpg", image), (f"{key}.txt", meta["caption"].encode()),
                            (f"{key}.json", json.dumps(meta, indent=4).encode())]
        if output_format == "webdataset":
            storage.write_bytes(storage.join(dest, name + ".tar"), build_tar(members))
            written[storage.join(dest, name + ".tar")] = ok
        else:
            written[storage.join(dest, name + ".parquet")] = ok
        storage.write_bytes(storage.join(dest, name + ".parquet"), _parquet(metas))
        failures = urls_per_shard - len(ok)
        stats = {"count": urls_per_shard, "successes": len(ok), "failed_to_download": failures,
                 "failed_to_resize": 0, "duration": 1.5, "start_time": 1700000000.0, "end_time": 1700000001.5,
                 "status_dict": {"success": len(ok), **({"HTTP Error 404: Not Found": failures} if failures else {})}}
        storage.write_text(storage.join(dest, name + "_stats.json"), json.dumps(stats, indent=4))
    return written
