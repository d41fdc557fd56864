"""Batch embedding throughput: `mmray embed` against the bare model over preloaded tensors, side by side in one
run, on the same samples and cores. Prints one JSON object.

- embed: mmray.infer.embed.embed end to end (read shards, decode, tokenize, actor pool, write Parquet), on a local
  Ray with ``--cpus`` CPUs; the time runs from the start of the pipeline to the last shard written, actor
  start-up included.
- limit: the same model computation (image and text towers, projections, normalisation) in one process with
  ``--cpus`` threads, over images and token ids decoded beforehand and held in memory: what the model alone allows.

Goal (issue 9): embed >= 0.7x the limit on CPU. Each path is run ``--repeats`` times, alternating, best kept. The
model has random weights (throughput does not depend on them), built from ``--preset``.

    python bench/inference_throughput.py --samples 8000 --preset tiny --image-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
import time

import numpy as np
import torch


def write_random_export(out: str, cfg, tokenizer) -> None:
    """An export (mmray.export layout) of a freshly initialised model."""
    from mmray.export import build_model, write_export

    torch.manual_seed(0)
    write_export(out, build_model(cfg, tokenizer).state_dict(), cfg.to_yaml(), tokenizer.to_str(), source="random")


def limit_rate(export_dir: str, paths: list[str], batch_size: int, threads: int) -> tuple[int, float]:
    """Samples/s of the bare embedding computation over tensors decoded and tokenized beforehand."""
    from mmray.data.pipeline import decode_caption, decode_image
    from mmray.infer.embed import image_embeddings, text_embeddings
    from mmray.infer.runner import load_model

    model, cfg, tok, _ = load_model(export_dir, threads=threads)
    images, captions = [], []
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    images.append(decode_image(tar.extractfile(m).read(), cfg.data.image_size))
                elif m.name.endswith(".txt"):
                    captions.append(decode_caption(tar.extractfile(m).read()))
    images_t = torch.from_numpy(np.stack(images))
    ids_t = torch.from_numpy(tok.encode_batch(captions, cfg.data.max_text_len))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images_t), batch_size):
            image_embeddings(model, images_t[i:i + batch_size])
            text_embeddings(model, ids_t[i:i + batch_size])
    return len(images_t), len(images_t) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--actors", type=int, default=None, help="embed's actors (default: its own choice)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import ray

    from mmray import config
    from mmray.data.prepare import prepare_synthetic
    from mmray.data.tokenizer import TextTokenizer
    from mmray.infer.embed import embed

    root = tempfile.mkdtemp(prefix="mmray-bench-infer-")
    data = os.path.join(root, "data")
    prepare_synthetic(data, samples=args.samples + 256, seed=0, val_samples=256, samples_per_shard=1000,
                      image_size=64)
    paths = sorted(os.path.join(data, "train", f) for f in os.listdir(os.path.join(data, "train"))
                   if f.endswith(".tar"))
    cfg = config.load(None, [f"model.preset={args.preset}", f"data.image_size={args.image_size}"])
    export_dir = os.path.join(root, "export")
    write_random_export(export_dir, cfg, TextTokenizer.from_file(os.path.join(data, "tokenizer.json")))

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[float]] = {"embed": [], "limit": []}
    actors = 0
    for repeat in range(args.repeats):
        summary = embed(export_dir, [os.path.join(data, "train")], os.path.join(root, f"out{repeat}"),
                        batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                        progress=lambda message: None)
        assert summary["samples"] == args.samples, summary
        runs["embed"].append(summary["samples_per_s"])
        actors = summary["actors"]
        n, rate = limit_rate(export_dir, paths, args.batch_size, args.cpus)
        assert n == args.samples
        runs["limit"].append(rate)
    ray.shutdown()
    embed_rate, limit = max(runs["embed"]), max(runs["limit"])
    print(json.dumps({
        "benchmark": "inference_throughput", "samples": args.samples, "preset": args.preset,
        "image_size": args.image_size, "cpus": args.cpus, "actors": actors, "cpus_per_actor": args.cpus_per_actor,
        "batch_size": args.batch_size, "embed_samples_per_s": round(embed_rate, 1),
        "limit_samples_per_s": round(limit, 1), "ratio_vs_limit": round(embed_rate / limit, 3),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()}, "goal": {"ratio_vs_limit": 0.7},
    }))


if __name__ == "__main__":
    main()
