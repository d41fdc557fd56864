"""`mmray data inspect`: stream a whole data set through the real read + decode path and count what is usable."""
from __future__ import annotations

import os
import time

from mmray import storage
from mmray.data.pipeline import DataQuality, Preprocess, list_shards, quality_snapshot, read_raw


def find_shards(src: str) -> list[str]:
    """Shards directly under ``src``, or under its ``train/`` and ``val/`` splits (a prepared data set)."""
    direct = list_shards(src) if _is_dir(src) else []
    if direct:
        return direct
    splits = [storage.join(src, s) for s in ("train", "val") if _is_dir(storage.join(src, s))]
    paths = [p for d in splits for p in list_shards(d)]
    if not paths:
        raise storage.StorageError(f"no .tar or .parquet shards under {src} (nor under its train/ and val/)")
    return paths


def _is_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = storage.resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def _total_bytes(paths: list[str]) -> int:
    fs, _ = storage.resolve(paths[0])
    return sum(info.size or 0 for info in fs.get_file_info([storage.resolve(p)[1] for p in paths]))


def inspect(src: str, image_size: int = 64, progress=None) -> dict:
    """Read and decode every sample of ``src``; returns the summary that `mmray data inspect` prints."""
    import ray

    paths = find_shards(src)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        quality = ray.remote(DataQuality).options(num_cpus=0).remote()
        t0 = time.perf_counter()
        ds = read_raw(paths).map_batches(Preprocess(None, image_size, 0, quality), batch_size=256,
                                         batch_format="numpy")
        seen = 0
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            seen += len(batch["key"])
            if progress:
                progress(f"{seen} usable samples decoded")
        wall = time.perf_counter() - t0
        snap = quality_snapshot(quality)
    finally:
        if started_here:
            ray.shutdown()
    return {"src": src, "samples": seen, "bad": snap["bad"], "bad_examples": snap["bad_examples"],
            "shards": len(paths), "bytes": _total_bytes(paths),
            "samples_per_s": round((seen + sum(snap["bad"].values())) / max(wall, 1e-9), 1)}
