"""Peak memory of a decoding worker on one large shard, the way img2dataset writes them (10,000 samples a tar by
default). Prints one JSON object.

Ray Data's read operator merges the shard reader's blocks until one passes its target_max_block_size (128 MiB) of
encoded images, so the map after it gets thousands of samples at once. Two paths decode the same shard, alternating,
each twice after an unmeasured warm-up:

- whole: Preprocess on whatever the read operator hands it (map_batches with batch_size=None; mmray before cd7007a);
- chunked: mmray.data.pipeline.preprocessed, which decodes at most 128 MiB of pixels a call (decoded_rows).

Memory is the highest resident set (RSS) of any one Ray worker process, sampled every 50 ms. It counts the pages of
the object store the worker has touched, the same way for both paths. Both must deliver every sample.

    python bench/decode_batch_memory.py --samples 10000 --source-size 256 --image-size 224
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile


def _largest_worker_rss() -> int:
    """The highest RSS in bytes of any one Ray worker process under this one."""
    import psutil

    largest = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "default_worker" in " ".join(proc.cmdline()) or proc.name().startswith("ray::"):
                largest = max(largest, proc.memory_info().rss)
        except psutil.Error:
            pass
    return largest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000, help="samples in the one shard (img2dataset's default)")
    p.add_argument("--source-size", type=int, default=256, help="side of the JPEGs (img2dataset's default)")
    p.add_argument("--image-size", type=int, default=224, help="model input side")
    args = p.parse_args()

    import ray

    from data_memory import PeakSampler
    from data_throughput import _photos
    from mmray.data.pipeline import Preprocess, block_rows, decoded_rows, preprocessed, read_raw
    from mmray.data.prepare import prepare_synthetic

    root = tempfile.mkdtemp(prefix="mmray-bench-")
    prepare_synthetic(root, samples=args.samples + 16, seed=0, val_samples=16, samples_per_shard=args.samples,
                      image_size=64)
    paths = sorted(os.path.join(root, "train", f) for f in os.listdir(os.path.join(root, "train"))
                   if f.endswith(".tar"))
    _photos(paths, args.source_size)
    shard_bytes = sum(os.path.getsize(path) for path in paths)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pre, rows = Preprocess(None, args.image_size, 0), block_rows(args.image_size)

    def count(ds) -> int:
        return sum(len(b["key"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))

    paths_ds = {
        "whole": lambda: read_raw(paths, rows_per_block=rows).map_batches(pre, batch_size=None,
                                                                          batch_format="numpy"),
        "chunked": lambda: preprocessed(read_raw(paths, rows_per_block=rows), pre),
    }
    for make in paths_ds.values():
        count(make())  # warm-up: worker processes start and import
    peaks = {name: [] for name in paths_ds}
    for _ in range(2):
        for name, make in paths_ds.items():
            with PeakSampler(0.05, _largest_worker_rss) as sampler:
                samples = count(make())
            assert samples == args.samples, (name, samples)
            peaks[name].append(sampler.peak)
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    mib = {name: [round(v / 2**20) for v in values] for name, values in peaks.items()}
    print(json.dumps({
        "benchmark": "decode_batch_memory", "samples": args.samples, "source_size": args.source_size,
        "image_size": args.image_size, "shard_mb": round(shard_bytes / 1e6, 1),
        "decoded_rows": decoded_rows(args.image_size),
        "worker_peak_rss_mib": mib,
        "ratio_chunked_vs_whole": round(max(peaks["chunked"]) / max(peaks["whole"]), 3),
    }))


if __name__ == "__main__":
    main()
