"""Data pipeline throughput, side by side in one run on the same shards and cores. Prints one JSON object.

- mmray: ShardDatasource (batched tar reading) + Preprocess (JPEG decode at the DCT scale nearest the model size,
  resize, tokenize; uint8 pixels);
- decode_limit: a plain single-process loop that only decodes and resizes the same images (per core); the goal's
  limit. Also measured on every core at once (``decode_limit_all_cores``: one process per core, each timing its own
  share of the images), the per-core limit of a job that keeps every core busy as the pipeline does, a diagnostic:
  inside this benchmark it came out at 0.79x of the lone loop, but in back-to-back tests of the two loops alone on
  this VM it ranged from 0.61x to 1.27x, with or without Ray running, so whether busy cores slow each other here is
  not established and the goal stays against the lone loop;
- stock: Ray Data's read_webdataset as documented (its default decoder turns each .jpg into a full-size NumPy
  array, .txt into str, .json into a dict) + the same preprocessing in map_batches: resize to the model size,
  pick the QA pair, tokenize caption, question and answer, uint8 pixels;
- stock_reader: read_webdataset without its decoder (raw bytes) + mmray's own Preprocess, so it differs from the
  mmray path in the reader alone;
- mmray_unreserved (a diagnostic, not a setting to train with): the mmray path with Ray Data's per-operator
  resource reservation switched off. Ray Data 2.60 starts each execution with its global resource limits at zero
  until its autoscaling coordinator grants a reservation (~2.3 s on 2 busy cores), and only one task runs until then;
  and through the run each worker waits 0.25-0.45 s between two Preprocess calls with the reservation, ~0.1 s
  without (measured at 256 px: cores 82-87% busy against 96-99%; BENCHMARKS.md). Without the reservation every core
  works from the start, but nothing budgets the object store.

``first_batch_s`` is each path's time from the start of an execution to its first batch.

mmray's path also measures, inside its workers, the CPU time spent in decode_pixels (:class:`TimedPreprocess`):
``mmray_decode_share_per_core`` is that time over the run's wall time and cores, the share of the machine that
decodes. It is the per-core ratio measured within one run: the decode-only loop runs at other moments, and on a
shared VM the speed of a core moves by 20-40% from one measurement to the next. ``mmray_decode_ms_per_sample``
against ``decode_limit_ms_per_sample`` shows what decoding costs inside the pipeline against alone.

Each Ray path streams the shard list ``--passes`` times in one execution, as a data set that many times larger
would. A training epoch streams thousands of shards, so it pays Ray Data's start (its resource limits are zero for
the first ~2-3 s, see ``mmray_unreserved``) and the end (the last shard's task alone on its core) once in hours;
over the benchmark's few shards of a few seconds each, those two were ~15% of a run and measured the benchmark's
size rather than the pipeline's rate. ``first_batch_s`` reports the start on its own.

The shards hold img2dataset-style samples (KEY.jpg, KEY.txt, KEY.json). ``--content photo`` (the default) writes
photographs: random crops of the photo matplotlib ships (grace_hopper.jpg), flipped at random, resized to
``--source-size`` and saved at JPEG quality 95, img2dataset's default ``encode_quality``; ``--content shapes`` keeps
the synthetic shapes images (flat colours, ~1.7 KB at 64 px, far cheaper to decode than photographs).

All Ray paths run in one Ray instance with the same --cpus, on the same shards, and must give the same sample keys;
after one unmeasured warm-up run of each, they run in --repeats rounds. A shared VM's speed moves by 20-40% within a
minute, so a ratio of two best-ofs taken minutes apart measures the moments as much as the code: each round runs
the stock paths, then the decode-only loop (alone and on every core), mmray's path, and the decode-only loop again.
Each round's ratios set mmray's run against the mean of the two loops around it and against the same round's stock
run; the goals' ``ratio_*`` figures are the median over the rounds (``rounds`` lists each), and the ``*_samples_per_s``
figures each path's best run. Besides wall-clock rates, each run's CPU time is summed over the whole process tree
(driver, GCS, raylet, Ray workers), so ``*_samples_per_cpu_s`` is throughput per busy core, which stays meaningful on
a machine shared with other work (wall-clock rates there measure the load as much as the code).

Goals (issue 3): mmray per core >= 0.8x the decode-only limit (the lone loop), and >= 2x the stock path.

    python bench/data_throughput.py --source-size 512 --image-size 224 --samples 4000 --passes 4 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time

import numpy as np


CONSUMER_BATCH = 64  # train.micro_batch_size's default: the training loop iterates its shard in batches of this size


def _drain(ds) -> tuple[list[str], float, float]:
    """The keys of every sample, as the training loop iterates; the seconds until the first batch; and, for a path
    that reports it (:class:`TimedPreprocess`), the CPU-seconds its workers spent decoding."""
    t0, first, keys, decode_s = time.perf_counter(), None, [], 0.0
    for b in ds.iter_batches(batch_size=CONSUMER_BATCH, batch_format="numpy"):
        first = time.perf_counter() - t0 if first is None else first
        keys += list(b["key"])
        decode_s += float(b["decode_cpu_s"].sum()) if "decode_cpu_s" in b else 0.0
    return keys, first, decode_s


def _tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and every live process under it."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


PHOTO = "sample_data/grace_hopper.jpg"  # in matplotlib's mpl-data (matplotlib is a dependency: sweep plots)


def _photos(paths: list[str], side: int, seed: int = 0) -> None:
    """Rewrites each shard's .jpg members as photographs: random square crops (at least half the photo's shorter
    side) of matplotlib's sample photo, flipped at random, resized to ``side`` and saved at JPEG quality 95."""
    import io
    import random

    import matplotlib
    from PIL import Image

    photo = Image.open(os.path.join(matplotlib.get_data_path(), PHOTO)).convert("RGB")
    rng = random.Random(seed)
    for path in paths:
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        with tarfile.open(path + ".tmp", "w") as out:
            for member, data in members:
                if member.name.endswith(".jpg"):
                    s = rng.randint(min(photo.size) // 2, min(photo.size))
                    x, y = rng.randint(0, photo.size[0] - s), rng.randint(0, photo.size[1] - s)
                    image = photo.crop((x, y, x + s, y + s)).resize((side, side), Image.BICUBIC)
                    if rng.random() < 0.5:
                        image = image.transpose(Image.FLIP_LEFT_RIGHT)
                    buf = io.BytesIO()
                    image.save(buf, "JPEG", quality=95)
                    data = buf.getvalue()
                    member.size = len(data)
                out.addfile(member, io.BytesIO(data))
        os.replace(path + ".tmp", path)


class StockPreprocess:
    """The preprocessing a user of stock read_webdataset writes: its rows hold decoded full-size images (NumPy),
    the caption (str) and the metadata (dict); this resizes the image to the model size and tokenizes, giving the
    same output columns and values as mmray's Preprocess."""

    def __init__(self, tokenizer_json: str, image_size: int, max_text_len: int):
        self.tokenizer_json, self.image_size, self.max_text_len = tokenizer_json, image_size, max_text_len

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from mmray.data.pipeline import ANSWER_LEN, _tokenizer, pick_qa, zero_shot_label

        size, tok = self.image_size, _tokenizer(self.tokenizer_json)
        images, qas, labels = [], [], []
        for key, image, meta in zip(batch["__key__"], batch["jpg"], batch["json"]):
            img = Image.fromarray(np.asarray(image)).convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            images.append(np.asarray(img).transpose(2, 0, 1))
            qas.append(pick_qa(key, meta) or {"question": "", "answer": "", "type": ""})
            labels.append(zero_shot_label(meta))
        captions = [str(c).strip() for c in batch["txt"]]
        out = {"image": np.stack(images), "caption": np.array(captions, dtype=object), "key": batch["__key__"],
               "question": np.array([q["question"] for q in qas], dtype=object),
               "answer": np.array([q["answer"] for q in qas], dtype=object),
               "qa_type": np.array([str(q.get("type", "")) for q in qas], dtype=object),
               "label": np.array(labels, dtype=object)}
        out["text_ids"] = tok.encode_batch(captions, self.max_text_len)
        out["question_ids"] = tok.encode_batch(list(out["question"]), self.max_text_len)
        answers = tok.encode_batch(list(out["answer"]), min(ANSWER_LEN, self.max_text_len))
        answers[out["answer"] == "", 1:] = tok.pad_id
        out["answer_ids"] = answers
        return out


class TimedPreprocess:
    """mmray's Preprocess, with the CPU time its worker thread spends in decode_pixels (decode + resize, what the
    decode-only loop runs) added to each block as a ``decode_cpu_s`` column (the block's total in its first row).
    Two thread_time() calls an image, ~1 us against ~2 ms of decoding, charged to mmray's figures."""

    def __init__(self, pre):
        self.pre, self.image_size = pre, pre.image_size

    def __call__(self, batch: dict) -> dict:
        import mmray.data.pipeline as pipeline

        spent = [0.0]
        decode = getattr(pipeline.decode_pixels, "untimed", pipeline.decode_pixels)

        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return decode(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - t

        timed.untimed = decode
        pipeline.decode_pixels = timed  # Preprocess looks it up in the module at each call
        try:
            out = self.pre(batch)
        finally:
            pipeline.decode_pixels = decode
        out["decode_cpu_s"] = np.zeros(len(out["key"]))
        out["decode_cpu_s"][:1] = spent[0]
        return out


def _jpegs(paths: list[str], index: int = 0, count: int = 1) -> list[bytes]:
    """The .jpg members of the shards, in order; with ``count`` > 1, every ``count``-th of them from ``index``."""
    images, seen = [], 0
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    if seen % count == index:
                        images.append(tar.extractfile(member).read())
                    seen += 1
    return images


def _decode_loop(images: list[bytes], size: int) -> tuple[int, float, float]:
    """The decode-only loop: decode_pixels on each image, nothing else. (images, wall s, CPU s)"""
    from mmray.data.pipeline import decode_pixels

    t0, c0 = time.perf_counter(), time.process_time()
    for data in images:
        decode_pixels(data, size)
    return len(images), time.perf_counter() - t0, time.process_time() - c0


def _decode_share(paths: list[str], index: int, count: int, size: int) -> tuple[int, float, float]:
    """One process of the all-cores decode-only limit: the loop over its share of the images (every ``count``-th
    from ``index``), loaded first and not timed."""
    return _decode_loop(_jpegs(paths, index, count), size)


def _ready(_: int) -> None:
    """Imports what _decode_share needs and waits a moment, so that every process of the pool is up before the
    decoding starts."""
    import mmray.data.pipeline  # noqa: F401

    time.sleep(0.5)


def _stock_rows(batch: dict) -> dict:
    """read_webdataset rows (raw bytes) -> the raw schema that mmray's Preprocess takes."""
    n = len(batch["__key__"])
    return {"key": batch["__key__"], "shard": np.array(["stock"] * n, dtype=object), "image": batch["jpg"],
            "caption": batch["txt"], "meta": batch["json"], "error": np.array([""] * n, dtype=object)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--image-size", type=int, default=224, help="model input side (ViT-B/16's is 224)")
    p.add_argument("--source-size", type=int, default=512, help="side of the generated JPEGs")
    p.add_argument("--content", choices=("photo", "shapes"), default="photo",
                   help="photographs (crops of matplotlib's sample photo) or the synthetic shapes images")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--passes", type=int, default=4,
                   help="times each Ray path streams the shard list in one execution (a data set this many times "
                        "larger)")
    args = p.parse_args()

    import ray

    from mmray.data.pipeline import Preprocess, block_rows, preprocessed, read_raw
    from mmray.data.prepare import prepare_synthetic
    from mmray.data.tokenizer import TextTokenizer

    root = tempfile.mkdtemp(prefix="mmray-bench-")
    prepare_synthetic(root, samples=args.samples + 256, seed=0, val_samples=256, samples_per_shard=1000,
                      image_size=args.source_size if args.content == "shapes" else 64)
    paths = sorted(os.path.join(root, "train", f) for f in os.listdir(os.path.join(root, "train"))
                   if f.endswith(".tar"))
    if args.content == "photo":
        _photos(paths, args.source_size)
    tok = TextTokenizer.from_file(os.path.join(root, "tokenizer.json")).to_str()

    # Decode-only limit: images already in memory, nothing but decode + resize; one loop alone, and one a core at once.
    images = _jpegs(paths)

    def decode_only() -> tuple[float, float]:
        """(samples/s, samples per CPU-s) of the loop alone, in this process."""
        n, wall, cpu = _decode_loop(images, args.image_size)
        return n / wall, n / cpu

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(args.cpus, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(_ready, range(args.cpus)))

    def decode_all_cores() -> tuple[float, float]:
        """(samples/s, samples per CPU-s) of one core while every core runs the loop: the mean over the processes."""
        shares = list(pool.map(_decode_share, [paths] * args.cpus, range(args.cpus), [args.cpus] * args.cpus,
                               [args.image_size] * args.cpus))
        return (sum(n / wall for n, wall, _ in shares) / args.cpus, sum(n / cpu for n, _, cpu in shares) / args.cpus)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pre = Preprocess(tok, args.image_size, 32)

    def timed(ds) -> tuple[list[str], float, float, float, float, float]:
        """(keys, samples/s, samples per CPU-s, first batch s, decoding CPU-s per wall s, per tree CPU-s)"""
        t, c = time.perf_counter(), _tree_cpu_s()
        keys, first, decode_s = _drain(ds)
        wall, cpu = time.perf_counter() - t, _tree_cpu_s() - c
        return keys, len(keys) / wall, len(keys) / cpu, first, decode_s / wall, decode_s / cpu

    # Every path as read_split builds mmray's: one read task per file, fused with the maps; Preprocess decodes at
    # most decoded_rows samples a call (see mmray.data.pipeline.preprocessed). Each streams the shards ``passes``
    # times.
    def mmray_ds(passes: int):
        raw = read_raw(paths * passes, rows_per_block=block_rows(args.image_size))
        return preprocessed(raw, TimedPreprocess(pre))

    def mmray_unreserved_ds(passes: int):
        # A diagnostic, not a setting to train with (see the module docstring).
        ds = mmray_ds(passes)
        ds.context.op_resource_reservation_enabled = False
        return ds

    def stock_ds(passes: int):  # read_webdataset as documented: its default decoder
        stock = ray.data.read_webdataset(paths * passes, override_num_blocks=len(paths) * passes)
        return stock.map_batches(StockPreprocess(tok, args.image_size, 32), batch_size=None, batch_format="numpy")

    def stock_reader_ds(passes: int):
        stock = ray.data.read_webdataset(paths * passes, decoder=None, override_num_blocks=len(paths) * passes)
        stock = stock.map_batches(_stock_rows, batch_size=None, batch_format="numpy")
        return preprocessed(stock, pre)

    paths_ds = {"mmray": mmray_ds, "stock": stock_ds, "stock_reader": stock_reader_ds,
                "mmray_unreserved": mmray_unreserved_ds}
    # The machine's speed moves by 20-40% within a minute on a shared VM, so each goal is a ratio of runs taken next
    # to each other: in every round, mmray's run sits between two measurements of the decode-only loop (alone, then
    # on every core), and its ratio to their mean is that round's; the stock paths run in the same round. The
    # figures below are the median over the rounds (each round's too), and each path's best rate for the tables.
    for make in paths_ds.values():
        timed(make(1))  # warm-up, one pass: worker processes start and import, not measured
    runs = {name: [] for name in paths_ds}
    limit, limit_all, rounds = [], [], []
    for _ in range(args.repeats):
        for name in ("stock", "stock_reader", "mmray_unreserved"):
            runs[name].append(timed(paths_ds[name](args.passes)))
        before = decode_only(), decode_all_cores()
        runs["mmray"].append(timed(mmray_ds(args.passes)))
        after = decode_only(), decode_all_cores()
        limit += [before[0], after[0]]
        limit_all += [before[1], after[1]]
        # the loops around mmray's run: (samples/s, per CPU-s), alone and on every core
        alone, all_cores = [[(b + a) / 2 for b, a in zip(before[i], after[i])] for i in (0, 1)]
        rate, cpu = runs["mmray"][-1][1:3]
        rounds.append({
            "vs_decode_limit_all_cores_per_core": rate / args.cpus / all_cores[0],
            "vs_decode_limit_all_cores_per_cpu_s": cpu / all_cores[1],
            "vs_decode_limit_per_core": rate / args.cpus / alone[0],
            "vs_decode_limit_per_cpu_s": cpu / alone[1],
            "vs_stock": rate / runs["stock"][-1][1], "vs_stock_per_cpu_s": cpu / runs["stock"][-1][2],
            "vs_stock_reader_per_cpu_s": cpu / runs["stock_reader"][-1][2],
            "unreserved_vs_decode_limit_all_cores_per_core": runs["mmray_unreserved"][-1][1] / args.cpus / all_cores[0],
        })
    ray.shutdown()
    pool.shutdown()
    shutil.rmtree(root, ignore_errors=True)  # the generated shards
    best = {k: (max(r[1] for r in v), max(r[2] for r in v)) for k, v in runs.items()}
    first_batch = {k: min(r[3] for r in v) for k, v in runs.items()}
    fastest = max(runs["mmray"], key=lambda r: r[1])  # mmray's fastest run: its decoding share of the machine
    (mmray_rate, mmray_cpu), (stock_rate, stock_cpu) = best["mmray"], best["stock"]
    decode_per_core, decode_per_cpu_s = max(r[0] for r in limit), max(r[1] for r in limit)
    all_per_core, all_per_cpu_s = max(r[0] for r in limit_all), max(r[1] for r in limit_all)

    def median(name: str) -> float:
        return round(statistics.median(r[name] for r in rounds), 3)

    keys = {k: sorted(v[0][0]) for k, v in runs.items()}
    assert len(keys["mmray"]) == args.samples * args.passes and all(k == keys["mmray"] for k in keys.values()), \
        "the paths read different samples"
    print(json.dumps({
        "benchmark": "data_throughput", "samples": args.samples, "passes": args.passes, "content": args.content,
        "image_size": args.image_size,
        "source_size": args.source_size, "cpus": args.cpus, "load_average": [round(x, 1) for x in os.getloadavg()],
        # each path's best run, and the decode-only loop's best measurement
        "mmray_samples_per_s": round(mmray_rate, 1),
        "mmray_samples_per_s_per_core": round(mmray_rate / args.cpus, 1),
        "mmray_samples_per_cpu_s": round(mmray_cpu, 1),
        "stock_samples_per_s": round(stock_rate, 1),
        "stock_samples_per_cpu_s": round(stock_cpu, 1),
        "stock_reader_samples_per_s": round(best["stock_reader"][0], 1),
        "stock_reader_samples_per_cpu_s": round(best["stock_reader"][1], 1),
        "unreserved_samples_per_s": round(best["mmray_unreserved"][0], 1),
        "decode_limit_samples_per_s_per_core": round(decode_per_core, 1),
        "decode_limit_samples_per_cpu_s": round(decode_per_cpu_s, 1),
        "decode_limit_all_cores_samples_per_s_per_core": round(all_per_core, 1),
        "decode_limit_all_cores_samples_per_cpu_s": round(all_per_cpu_s, 1),
        # the goals' ratios: the median over the rounds of each round's own ratio (see above)
        **{f"ratio_{name}": median(name) for name in rounds[0]},
        "rounds": [{name: round(v, 3) for name, v in r.items()} for r in rounds],
        "first_batch_s": {k: round(v, 2) for k, v in first_batch.items()},
        "mmray_decode_share_per_core": round(fastest[4] / args.cpus, 3),
        "mmray_decode_share_per_cpu_s": round(fastest[5], 3),
        "mmray_decode_ms_per_sample": round(fastest[4] / fastest[1] * 1000, 3),
        "decode_limit_ms_per_sample": round(1000 / decode_per_cpu_s, 3),
        "decode_limit_all_cores_ms_per_sample": round(1000 / all_per_cpu_s, 3),
        "goals": {"ratio_vs_decode_limit_per_core": 0.8, "ratio_vs_stock": 2.0},
    }))


if __name__ == "__main__":
    main()
