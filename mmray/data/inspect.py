"""`mmray data inspect`: stream a whole data set through the real read + decode path and count what is usable."""
from __future__ import annotations

import time

from mmray import storage
from mmray.data.pipeline import (DataQuality, Preprocess, block_rows, preprocessed, quality_snapshot, ray_running,
                                 read_raw)
from mmray.data.sources import count_samples, inspect_shards, total_samples


def find_shards(src: str, allow_missing: bool = False) -> list[str]:
    """Every shard SRC names (see mmray.data.sources): shards under a prefix, files, brace patterns, '::'-joined
    parts; a prepared data set gives its train/ and val/ shards."""
    return inspect_shards(src, allow_missing)


def _total_bytes(paths: list[str]) -> int:
    fs, _ = storage.resolve(paths[0])
    return sum(info.size or 0 for info in fs.get_file_info([storage.resolve(p)[1] for p in paths]))


def inspect(src: str, image_size: int = 64, progress=None, allow_missing: bool = False,
            reader: dict | None = None) -> dict:
    """Read and decode every sample of ``src``; returns the summary that `mmray data inspect` prints.

    ``reader`` holds the reader's options (:func:`mmray.data.pipeline.reader_options`: Parquet columns, WebDataset
    member extensions; default: the config's defaults). ``expected_samples`` is the sum of the shards'
    ``_stats.json`` sample counts (img2dataset's ``successes``), or null when a shard has none; progress lines
    count against it."""
    import ray

    paths = find_shards(src, allow_missing)
    expected = total_samples(count_samples(paths, progress))
    with ray_running():
        quality = ray.remote(DataQuality).options(num_cpus=0).remote()
        t0 = time.perf_counter()
        options = {**(reader or {}), "rows_per_block": block_rows(image_size)}  # for the size decoded here
        ds = preprocessed(read_raw(paths, **options), Preprocess(None, image_size, 0, quality))
        seen = 0
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            seen += len(batch["key"])
            if progress:
                progress(f"{seen}{'' if expected is None else f'/{expected}'} usable samples decoded")
        wall = time.perf_counter() - t0
        snap = quality_snapshot(quality)
    return {"src": src, "samples": seen, "expected_samples": expected, "bad": snap["bad"],
            "bad_examples": snap["bad_examples"], "shards": len(paths), "bytes": _total_bytes(paths),
            "samples_per_s": round((seen + sum(snap["bad"].values())) / max(wall, 1e-9), 1)}
