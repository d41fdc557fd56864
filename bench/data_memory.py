"""Peak memory of the streaming training pipeline while the data set grows 10x. Prints one JSON object.

The pipeline is the training one (mmray.data.pipeline.read_split with a DataPosition actor: shard reader, shuffled
shard order, rows shuffled in windows of data.shuffle_buffer, decode, resize, tokenize) consumed like the training
loop consumes it (iter_batches of train.micro_batch_size, with Ray Data's preserve_order as the trainer sets it),
with a short sleep per batch standing in for a training step, so that the producers run ahead of the consumer and
Ray Data's backpressure has to hold them.

Memory is the resident set (RSS) summed over the driver and every process under it: Ray's GCS, raylet (which holds
the object store's shared memory) and the worker processes, sampled every --interval seconds. Shared pages mapped by
several processes count once per process, which overstates the total but the same way for both sizes.

The large data set is the small one's shards copied --factor times under new names (the pipeline reads every copy:
--factor times the samples, bytes and files), so the two runs differ only in size. Runs alternate small, large,
small, large after one unmeasured warm-up run; each size reports its highest peak. Goal: the large set's peak at most
1.2x the small set's.

    python bench/data_memory.py --samples 2000 --factor 10
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time


def _tree_rss() -> int:
    """Bytes resident in this process and all its descendants (processes that exit meanwhile are skipped)."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakSampler:
    """Samples ``measure()`` (default: the process tree's RSS) in a thread; ``peak`` is the highest seen between
    start and stop."""

    def __init__(self, interval: float, measure=_tree_rss):
        self.interval, self.peak, self.measure = interval, 0, measure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000, help="training samples of the small data set (N)")
    p.add_argument("--factor", type=int, default=10, help="the large data set has factor x N samples")
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=5.0, help="sleep per consumed batch (a stand-in training step)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between RSS samples")
    args = p.parse_args()

    import ray

    from mmray import config
    from mmray.data.pipeline import read_split
    from mmray.data.position import DataPosition
    from mmray.data.prepare import prepare_synthetic
    from mmray.data.tokenizer import TextTokenizer

    root = tempfile.mkdtemp(prefix="mmray-bench-mem-")
    try:
        prepare_synthetic(root, samples=args.samples + 64, seed=0, val_samples=64,
                          samples_per_shard=args.samples_per_shard)
        train = os.path.join(root, "train")
        small = sorted(os.path.join(train, f) for f in os.listdir(train) if f.endswith(".tar"))
        large = []
        for copy in range(args.factor):
            for path in small:
                name = os.path.join(root, "large", f"{copy:03d}-{os.path.basename(path)}")
                os.makedirs(os.path.dirname(name), exist_ok=True)
                shutil.copyfile(path, name)
                large.append(name)
        cfg = config.load(None, [])
        tokenizer = TextTokenizer.from_file(os.path.join(root, "tokenizer.json"))

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False

        def consume(paths: list[str]) -> tuple[int, int, float]:
            position = ray.remote(DataPosition).options(num_cpus=0).remote()
            ds = read_split(paths, cfg, tokenizer, shuffle_seed=cfg.train.seed, position=position)
            ds.context.execution_options.preserve_order = True  # as the trainer runs its split (ordered_ingest_options)
            t0, n = time.perf_counter(), 0
            with PeakSampler(args.interval) as sampler:
                for batch in ds.iter_batches(batch_size=cfg.train.micro_batch_size, drop_last=True,
                                             batch_format="numpy"):
                    n += len(batch["key"])
                    time.sleep(args.step_ms / 1000)
            return n, sampler.peak, time.perf_counter() - t0

        consume(small)  # warm-up: worker processes start, imports, first tasks
        runs: dict[str, list] = {"small": [], "large": []}
        for _ in range(args.repeats):
            runs["small"].append(consume(small))
            runs["large"].append(consume(large))
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mib = 1 << 20
    peak = {k: max(r[1] for r in v) for k, v in runs.items()}
    samples = {k: v[0][0] for k, v in runs.items()}
    batch = cfg.train.micro_batch_size
    assert samples["small"] == args.samples // batch * batch, samples
    assert samples["large"] == args.samples * args.factor // batch * batch, samples
    print(json.dumps({
        "benchmark": "data_memory", "cpus": args.cpus, "factor": args.factor,
        "samples": samples, "shards": {"small": len(small), "large": len(large)},
        "peak_rss_mib": {k: round(v / mib, 1) for k, v in peak.items()},
        "peak_rss_mib_runs": {k: [round(r[1] / mib, 1) for r in v] for k, v in runs.items()},
        "seconds_runs": {k: [round(r[2], 1) for r in v] for k, v in runs.items()},
        "ratio_large_to_small": round(peak["large"] / peak["small"], 3),
        "goal": {"ratio_large_to_small_at_most": 1.2},
    }))


if __name__ == "__main__":
    main()
