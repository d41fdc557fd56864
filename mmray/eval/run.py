"""`mmray eval MODEL --data SRC`: evaluate an export or a training checkpoint on a data set.

MODEL is an export directory (``mmray export``), a checkpoint directory, or a run directory (its newest complete
checkpoint); local or ``s3://``. SRC takes data.source's forms (see :func:`eval_shards`). The data streams through
Ray Data with the training pipeline's reader and decode path, so bad samples are skipped and counted the same way;
the model's own tokenizer and image size are used, and its config's data-reading keys (Parquet columns, WebDataset
member extensions) unless overridden.
"""
from __future__ import annotations

import time

import yaml

from mmray import config as config_lib
from mmray import storage
from mmray.data.pipeline import READER_OVERRIDES


def _is_export(path: str) -> bool:
    from mmray.export import MANIFEST_FILE, WEIGHTS_FILE

    return storage.exists(storage.join(path, MANIFEST_FILE)) and storage.exists(storage.join(path, WEIGHTS_FILE))


def load_model(path: str):
    """``(model, cfg, tokenizer, source)``: an export loaded through its manifest, or a checkpoint consolidated from
    its ZeRO shards (weights-only), with the config and tokenizer it was trained with."""
    import tempfile

    from mmray import export as export_lib
    from mmray.data.tokenizer import TextTokenizer
    from mmray.train.checkpoint import local_copy

    if _is_export(path):
        model, cfg, tokenizer = export_lib.load(path)
        return model, cfg, tokenizer, path
    checkpoint = export_lib.resolve_checkpoint(path)
    cfg = config_lib.from_dict(yaml.safe_load(storage.read_text(storage.join(checkpoint, "config.yaml"))))
    tokenizer = TextTokenizer.from_str(storage.read_text(storage.join(checkpoint, "tokenizer.json")))
    fs, inner = storage.resolve(checkpoint)
    with tempfile.TemporaryDirectory(prefix="mmray-eval-") as tmp:
        state = export_lib.consolidate(local_copy(inner, fs, tmp), cfg.train.zero_stage)
    model = export_lib.build_model(cfg, tokenizer)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, tokenizer, checkpoint


def eval_shards(src: str, split: str, allow_missing: bool = False) -> list[str]:
    """The shards to evaluate, from SRC in data.source's forms (mmray.data.sources): the ``split`` shards of a
    prepared data set; a prefix with shards directly under it; a shard file; a brace pattern; several of these
    joined by '::'; local or s3://. A missing shard fails naming its path, unless ``allow_missing``."""
    from mmray.data import sources

    try:
        sources.check_spec(src)
        return sources.split_shards(src, split, allow_missing)
    except sources.SourceError as e:
        raise config_lib.ConfigError(f"--data: {e}") from None


# Besides eval.*, `mmray eval` may override how the data at --data is read: it may be laid out unlike the training
# data (other Parquet columns or WebDataset member extensions, shards missing from a pattern).
DATA_KEYS = ("data.allow_missing_shards", *READER_OVERRIDES)


def run_eval(model_path: str, data: str, split: str = "val", max_samples: int | None = None,
             overrides: list[str] | None = None, progress=None) -> dict:
    """Evaluate; returns the JSON summary (metrics, data quality, timings) that `mmray eval` prints."""
    import ray

    from mmray.data.pipeline import DataQuality, quality_snapshot, ray_running, read_split
    from mmray.eval.evaluate import evaluate

    if max_samples is not None and max_samples < 0:
        raise config_lib.ConfigError(f"--max-samples must be >= 0 (0: every sample), got {max_samples}")
    t0 = time.perf_counter()
    model, cfg, tokenizer, source = load_model(model_path)
    # Evaluation and data-reading settings only: the model's architecture comes from its own config.
    cfg = config_lib.with_overrides(cfg, overrides or [], DATA_KEYS, sections=("eval",),
                                    allowed=f"eval.* keys and the data-reading keys ({', '.join(DATA_KEYS)})")
    limit = cfg.eval.max_samples if max_samples is None else max_samples
    paths = eval_shards(data, split, cfg.data.allow_missing_shards)
    with ray_running(log_to_driver=False):
        quality = ray.remote(DataQuality).options(num_cpus=0).remote()
        ds = read_split(paths, cfg, tokenizer, quality=quality)
        if limit:
            ds = ds.limit(limit)
        if progress:
            progress(f"evaluating {source} on {len(paths)} shard(s) of {data}")
        metrics = evaluate(model, ds.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"), tokenizer,
                           cfg, max_samples=limit)
        snapshot = quality_snapshot(quality)
    return {"model": source, "data": data, "shards": len(paths), "fusion": cfg.model.fusion,
            "metrics": metrics, "bad": snapshot["bad"], "bad_examples": snapshot["bad_examples"],
            "wall_s": round(time.perf_counter() - t0, 2)}
