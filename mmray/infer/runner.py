"""What every batch inference command shares: the export's facts, Ray, the actor pool, and the driver loop.

The pipeline is ``read (with end-of-shard rows) -> Decode -> model actors -> driver`` (see ``build_dataset``). Each
actor of the pool loads the export once and then serves batches; the driver assembles the rows of each input shard
and writes its output as soon as the shard is complete, so an interrupted run keeps every shard it finished.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import yaml

from mmray import config as config_lib
from mmray import storage
from mmray.config import ConfigError
from mmray.data.pipeline import READER_OVERRIDES, ray_running, reader_options
from mmray.data.tokenizer import TextTokenizer
from mmray.export import MANIFEST_FILE, WEIGHTS_FILE, ExportError, _sha256, read_manifest
from mmray.infer import DEVICES
from mmray.infer.inputs import Decode, LeftOut, Rows, merge_staged, read_counted
from mmray.infer.outputs import OutputDir, ShardAssembler

log = logging.getLogger("mmray")


@dataclass(frozen=True)
class ExportInfo:
    """An export's config and tokenizer (checked against its manifest) and its weights' sha256, not the weights."""

    path: str
    cfg: config_lib.Config
    tokenizer: TextTokenizer
    weights_sha256: str

    @property
    def tokenizer_json(self) -> str:
        return self.tokenizer.to_str()


def absolute(export_dir: str) -> str:
    """A local export's absolute path (``s3://`` as given): the workers, whose working directory may be another, and
    OUT's manifest, which `mmray search OUT` reads from anywhere, get a path that names the same export."""
    return export_dir if storage.is_s3(export_dir) else storage.resolve(export_dir)[1]


def read_export(path: str, reader_overrides: list[str] | None = None) -> ExportInfo:
    """The small files of an export, verified, so that bad input is found before Ray starts and without reading the
    weights (each actor reads and verifies those through :func:`mmray.export.load`). ``reader_overrides``
    (``data.KEY=VALUE`` of the data-reading keys, READER_OVERRIDES) change how the data is read, for data laid out
    unlike the export's training data."""
    manifest_path = storage.join(path, MANIFEST_FILE)
    if not storage.exists(manifest_path):
        raise ExportError(f"{manifest_path} is missing: not an mmray export, or an unfinished one")
    files = read_manifest(manifest_path)["files"]
    missing = [name for name in ("config.yaml", "tokenizer.json", WEIGHTS_FILE) if name not in files]
    if missing:
        raise ExportError(f"{manifest_path} lists no {', '.join(missing)}: not an mmray export")
    texts = {}
    for name in ("config.yaml", "tokenizer.json"):
        data = storage.read_bytes(storage.join(path, name))
        if _sha256(data) != files[name]["sha256"]:
            raise ExportError(f"{storage.join(path, name)} does not match its sha256 in {MANIFEST_FILE}")
        texts[name] = data.decode()
    cfg = config_lib.from_dict(yaml.safe_load(texts["config.yaml"]))
    cfg = config_lib.with_overrides(cfg, reader_overrides or [], READER_OVERRIDES,
                                    allowed=f"the data-reading keys ({', '.join(READER_OVERRIDES)})")
    return ExportInfo(path, cfg, TextTokenizer.from_str(texts["tokenizer.json"]), files[WEIGHTS_FILE]["sha256"])


def load_model(export_dir: str, use_gpu: bool = False, threads: int | None = None):
    """``(model, cfg, tokenizer, device)``: the export on the GPU or the CPU, in eval mode."""
    import torch

    from mmray.export import load

    if threads:
        torch.set_num_threads(threads)
    model, cfg, tokenizer = load(export_dir)
    device = torch.device("cuda" if use_gpu else "cpu")
    return model.to(device), cfg, tokenizer, device


@dataclass(frozen=True)
class Pool:
    """The model actors: how many, on which device, and what each reserves."""

    use_gpu: bool
    size: int
    cpus_per_actor: float

    def remote_args(self) -> dict:
        return {"num_gpus": 1} if self.use_gpu else {"num_cpus": self.cpus_per_actor}

    def read_args(self) -> dict:
        """CPU pools hold every CPU and decode in the actors, so the read tasks (I/O and tar parsing only) reserve
        none; their number is capped instead. Beside GPU actors they take CPUs as usual."""
        return {} if self.use_gpu else {"num_cpus": 0, "concurrency": max(2, self.size)}

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_actor))


def check_options(batch_size: int, device: str, actors: int | None, cpus_per_actor: float,
                  max_bad_fraction: float | None) -> None:
    """The run options, checked before Ray starts; ConfigError names the option."""
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not supported; allowed values: {', '.join(DEVICES)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if actors is not None and actors < 1:
        raise ConfigError(f"--actors must be at least 1, got {actors}")
    if cpus_per_actor <= 0:
        raise ConfigError(f"--cpus-per-actor must be positive, got {cpus_per_actor}")
    if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
        raise ConfigError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")


def plan_pool(device: str = "auto", actors: int | None = None, cpus_per_actor: float = 1.0) -> Pool:
    """One actor per GPU when the cluster has GPUs (or ``device='gpu'``); else CPU actors on every CPU."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    use_gpu = device == "gpu" or (device == "auto" and gpus >= 1)
    if use_gpu and gpus < 1:
        raise ConfigError("--device gpu was asked for, but the Ray cluster has no GPU")
    if use_gpu:
        return Pool(True, actors or gpus, cpus_per_actor)
    size = actors or max(1, int(cpus // cpus_per_actor))
    if size * cpus_per_actor > cpus:  # the pool would wait forever for actors that cannot be placed
        raise ConfigError(f"{size} CPU actor(s) x {cpus_per_actor:g} CPUs (--actors x --cpus-per-actor) do not fit "
                          f"on a Ray cluster of {cpus:g} CPUs; lower them, or add nodes")
    return Pool(False, size, cpus_per_actor)


class DecodeAndRun:
    """A CPU actor that decodes its own batches before running the model: no decoded images cross the object store,
    and no decode task waits for a CPU the actors hold."""

    def __init__(self, decode: Decode, worker: type, *worker_args):
        self.decode, self.worker = decode, worker(*worker_args)

    def __call__(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.worker(self.decode(raw))


def build_dataset(job: "Job", todo: list[tuple[str, str]], pool: Pool, quality):
    """read -> decode -> model actors. On GPUs, decoding runs in CPU tasks beside the GPU actors; on CPUs, in the
    actors themselves (see DecodeAndRun)."""
    import ray.data

    cfg = job.info.cfg
    decode = Decode(job.info.tokenizer_json, cfg.data.image_size, cfg.data.max_text_len, quality, job.rows,
                    job.captions_required)
    ds = read_counted([uri for uri, _ in todo], reader_options(cfg), **pool.read_args())
    worker_args = (*job.worker_args, pool.use_gpu, pool.threads)
    if pool.use_gpu:
        ds = ds.map_batches(decode, batch_size=job.batch_size, batch_format="numpy")
        fn, args = job.worker, worker_args
    else:
        fn, args = DecodeAndRun, (decode, job.worker, *worker_args)
    return ds.map_batches(fn, fn_constructor_args=args, batch_size=job.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=pool.size), **pool.remote_args())


@dataclass
class Job:
    """One run of a command over the shards still to do; ``to_table`` turns a shard's rows into its output."""

    name: str                                     # "embed" or "generate", for the progress lines
    info: ExportInfo
    sources: list[tuple[str, str]]                # (shard URI, output name) of every shard SRC names
    outputs: OutputDir
    worker: type                                  # the actor class; constructed with worker_args
    worker_args: tuple
    to_table: Callable[[dict[str, np.ndarray], str], pa.Table]
    rows: Rows                                    # the decoded columns the worker needs
    batch_size: int = 256
    device: str = "auto"                          # see plan_pool
    actors: int | None = None
    cpus_per_actor: float = 1.0
    max_bad_fraction: float | None = None         # None: the export's data.max_bad_fraction
    captions_required: bool = True                # False: generation, which reads no caption

    def __post_init__(self) -> None:
        check_options(self.batch_size, self.device, self.actors, self.cpus_per_actor, self.max_bad_fraction)


def run(job: Job, progress: Callable[[str], None] | None = None, staged: dict | None = None) -> dict:
    """Compute the shards of ``job`` that OUT does not hold yet; returns the summary fields every command shares:
    ``samples`` (usable samples of this run), ``rows`` (rows written: one per sample, or per question for VQA),
    ``samples_read`` (usable and bad), ``bad`` (count per reason), ``shards_written``, ``shards_skipped``,
    ``samples_per_s`` (usable samples per second of the pipeline, actor start-up included) and ``wall_s``.
    ``staged``: the samples that staging each folder or index left out (see mmray.infer.inputs.stage_sources);
    they count in ``bad`` and against the bad-sample limit, with the reader's, in proportion to the share of their
    source that this run reads (mmray.infer.inputs.LeftOut)."""
    import ray

    from mmray.data.pipeline import DataQuality, check_quality, quality_snapshot

    say = progress or log.info
    started = time.perf_counter()
    todo, skipped = job.outputs.plan(job.sources)
    left_out = LeftOut(staged or {}, [uri for uri, _ in todo])
    say(f"{job.name}: {len(job.sources)} shards, {skipped} already written, {len(todo)} to do -> {job.outputs.out}")
    summary = {"out": job.outputs.out, "shards": len(job.sources), "shards_written": 0, "shards_skipped": skipped,
               "samples": 0, "rows": 0, "samples_read": 0, "bad": {}, "bad_examples": {}}
    if not todo:
        return {**summary, "samples_per_s": 0.0, "wall_s": round(time.perf_counter() - started, 3)}
    max_bad = job.info.cfg.data.max_bad_fraction if job.max_bad_fraction is None else job.max_bad_fraction
    by_inner = {storage.resolve(uri)[1]: (uri, name) for uri, name in todo}
    with ray_running():
        pool = plan_pool(job.device, job.actors, job.cpus_per_actor)
        quality = ray.remote(DataQuality).options(num_cpus=0).remote()
        ds = build_dataset(job, todo, pool, quality)
        say(f"{job.name}: {pool.size} {'GPU' if pool.use_gpu else 'CPU'} actor(s), batches of {job.batch_size}")
        assembler = ShardAssembler(list(by_inner))
        t0 = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for shard, rows, raw_rows in assembler.add(batch):
                uri, name = by_inner[shard]
                # Checked before the shard is written: a shard that takes the run over the limit is not recorded
                # as done, so a rerun reads it again (and stops again) instead of passing without a word.
                left_out.add(uri, raw_rows)
                check_quality(merge_staged(quality_snapshot(quality), left_out.counts()), max_bad)
                record = job.outputs.write(name, uri, job.to_table(rows, uri), raw_rows)
                summary["shards_written"] += 1
                summary["rows"] += record["rows"]
                summary["samples_read"] += record["raw_rows"]
                rate = summary["samples_read"] / max(time.perf_counter() - t0, 1e-9)
                say(f"{job.name}: shard {summary['shards_written']}/{len(todo)} written: {record['file']} "
                    f"({record['rows']} rows, {record['bad']} bad samples); {summary['samples_read']} samples "
                    f"read, {rate:.1f}/s")
        elapsed = time.perf_counter() - t0
        if assembler.pending():
            raise RuntimeError(f"the stream ended before these shards were complete: {assembler.pending()}")
        snap = quality_snapshot(quality)  # complete: Preprocess waits for each block's counts before passing it on
    return {**merge_staged({**summary, "bad": snap["bad"], "bad_examples": snap["bad_examples"]}, left_out.counts()),
            "samples": snap["good"], "device": "gpu" if pool.use_gpu else "cpu", "actors": pool.size,
            "samples_per_s": round(snap["good"] / max(elapsed, 1e-9), 1),
            "wall_s": round(time.perf_counter() - started, 3)}
