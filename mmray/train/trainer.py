"""Driver side of a training run: resolve the data, start or join Ray, assemble and fit the TorchTrainer."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmray import storage
from mmray.config import Config, ConfigError, all_keys, check_run_name
from mmray.data.tokenizer import TextTokenizer

log = logging.getLogger("mmray")


def synthetic_dir(cfg: Config) -> str:
    """Where the embedded synthetic set for this config is cached; its name encodes everything that shapes it,
    the generator's version (:data:`mmray.data.shapes.VERSION`) included, so a set an older generator wrote is not
    reused."""
    from mmray.data.shapes import VERSION

    d = cfg.data
    name = f"shapes-v{VERSION}-n{d.synthetic_samples}-val{d.synthetic_val_samples}-seed{d.synthetic_seed}"
    return storage.join(d.cache_dir, name)


@dataclass
class DataSet:
    """The data of a run, checked before Ray starts: its tokenizer and the shard paths of each split."""

    root: str  # data.source as given, or the generated synthetic set's directory
    tokenizer: TextTokenizer
    train: list[str]
    val: list[str]
    weights: dict[str, float] | None = None  # train shard -> its part's weight (data.source_weights); None: all 1
    train_samples: int | None = None  # samples per epoch (weights applied) from the shards' _stats.json, if known


def ensure_dataset(cfg: Config) -> str:
    """The root of a prepared data set for ``cfg``: generated into the cache when the source is synthetic."""
    from mmray.data.prepare import is_prepared, parse_source, prepare_synthetic

    if not cfg.data.source.startswith("synthetic:"):
        return cfg.data.source
    try:
        parse_source(cfg.data.source)
    except ValueError as e:
        raise ConfigError(f"data.source: {e}") from None
    root = synthetic_dir(cfg)
    if not is_prepared(root):
        log.info("generating %s (%d samples) into %s", cfg.data.source, cfg.data.synthetic_samples, root)
        prepare_synthetic(root, samples=cfg.data.synthetic_samples, seed=cfg.data.synthetic_seed,
                          val_samples=cfg.data.synthetic_val_samples, progress=log.info)
    return root


def resolve_data(cfg: Config) -> DataSet:
    """Find (or generate) the data and check that it is usable; every problem names the key or path at fault.

    data.source's parts (see mmray.data.sources) give the training shards, each part weighted by
    data.source_weights; held-out shards come from data.val_source, else from the prepared data sets' val/ splits;
    the tokenizer from data.tokenizer, else from the first prepared data set."""
    from mmray.data import sources
    from mmray.data.mixing import parse_weights

    d = cfg.data
    root = ensure_dataset(cfg)
    parts = sources.parts(root)
    weights = parse_weights(d.source_weights, len(parts))
    by_shard: dict[str, float] = {}
    per_part = [part.shards("train", d.allow_missing_shards) for part in parts]
    for shards, weight in zip(per_part, weights):
        for shard in shards:
            if shard in by_shard:
                raise ConfigError(f"data.source: shard {shard} is named by more than one part of {root!r}")
            by_shard[shard] = weight
    prepared = [p for p in parts if p.prepared]
    if d.val_source:
        try:
            val = sources.split_shards(d.val_source, "val", d.allow_missing_shards)
        except sources.SourceError as e:
            raise ConfigError(f"data.val_source: {e}") from None
    elif prepared:
        for p in prepared:
            if not sources.is_dir(storage.join(p.spec, "val")):
                raise ConfigError(f"data.val_source: the prepared data set {p.spec} has no val/ split (it was prepared "
                                  "with --val-samples 0); set data.val_source to held-out shards, or prepare it again "
                                  "with validation samples.")
        val = [s for p in prepared for s in p.shards("val")]
    else:
        raise ConfigError(f"data.val_source: data.source {root!r} names shards, not a prepared data set with a val/ "
                          "split; set data.val_source to held-out shards (a prefix, files or a brace pattern).")
    if not d.tokenizer and not prepared:
        raise ConfigError(f"data.tokenizer: data.source {root!r} has no prepared data set (with its tokenizer.json); "
                          "set data.tokenizer to a tokenizer.json (e.g. one written by `mmray data prepare`).")
    tokenizer_path = d.tokenizer or storage.join(prepared[0].spec, "tokenizer.json")
    try:
        tokenizer = TextTokenizer.from_file(tokenizer_path)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    counts = sources.count_samples(by_shard, progress=log.info)
    epoch = sources.total_samples(counts, by_shard)
    for part, shards, weight in zip(parts, per_part, weights):
        n = sources.total_samples({s: counts[s] for s in shards})
        log.info("data: %s: %d shard(s), %s samples (_stats.json), weight %g", part.spec, len(shards),
                 "unknown" if n is None else n, weight)
    if epoch is not None:
        log.info("data: %d training samples per epoch", epoch)
    mixed = by_shard if any(w != 1 for w in weights) else None
    return DataSet(root, tokenizer, list(by_shard), val, mixed, epoch)


# What a checkpoint's weights and optimizer state are shaped by: a resume must keep these (model.init_* only say where
# a new run's first weights come from).
RESUME_KEYS = ("model.", "data.image_size", "data.max_text_len", "train.zero_stage")
RESUME_FREE = ("model.init_image", "model.init_text")


def check_resume_config(cfg: Config, run_dir: str) -> None:
    """Before Ray starts: when ``run_dir`` holds checkpoints, the newest one's config.yaml must agree with ``cfg`` on
    what shapes the weights and optimizer state (RESUME_KEYS). Otherwise resuming would fail on every worker after
    minutes (a shape mismatch, retried train.max_failures times), or, where the shapes happen to match (a different
    number of attention heads), silently load the weights into another model. ConfigError names the keys."""
    import yaml

    from mmray.train.checkpoint import list_checkpoints

    names = list_checkpoints(run_dir)
    if not names:
        return
    path = storage.join(run_dir, names[0], "config.yaml")
    try:
        tree = yaml.safe_load(storage.read_text(path)) or {}
    except (storage.StorageError, OSError, yaml.YAMLError):
        return  # an incomplete or damaged checkpoint: the restore refuses it and says why
    now_tree = cfg.to_dict()
    saved, now = {}, {}
    for key in all_keys():
        section, name = key.split(".", 1)
        if key.startswith(RESUME_KEYS) and key not in RESUME_FREE and name in (tree.get(section) or {}):
            saved[key], now[key] = tree[section][name], now_tree[section][name]
    changed = [k for k in saved if now[k] != saved[k]]
    if changed:
        raise ConfigError(
            f"run {cfg.run_name} resumes from {names[0]}, which was trained with "
            + ", ".join(f"{k}={saved[k]!r}" for k in changed) + "; this config has "
            + ", ".join(f"{k}={now[k]!r}" for k in changed)
            + ". A checkpoint resumes only with the model (and ZeRO stage) it was trained with: set those back, or "
              "start a new run (another run.name; to start from these weights, export them and use model.init_image"
              " / model.init_text).")


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """Start a Ray instance for this process, with its dashboard on a free loopback port.

    Why the dashboard: each Ray Train run starts a placement-group cleaner that asks Ray's state API, every second,
    whether the run's controller is alive, and the state API is served by the dashboard. Without one, the query
    goes to the cluster that /tmp/ray/ray_current_cluster names (the last `ray start` on the machine); when that
    cluster is gone, each query waits 40 s for its GCS, and every run ended up to 12 s late (the cleaner's stop
    timeout). The workers get this instance's dashboard in RAY_API_SERVER_ADDRESS, so the cleaner's queries are
    answered at once (tests/integration/test_local_ray.py checks it)."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env=runtime_env, **init_kwargs)


def init_ray(cfg: Config) -> str:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), or start a local Ray.

    Locally, Ray gets enough logical CPUs for every training worker plus the data pipeline's tasks, so that the
    pipeline never starves behind workers that reserve all the cores. Returns how Ray was reached: "joined" (the
    cluster in RAY_ADDRESS), "local" (started here) or "in-process" (already initialised by the caller).
    """
    import ray

    if ray.is_initialized():
        return "in-process"
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return "joined"
    need = cfg.train.num_workers * cfg.train.cpus_per_worker + 2
    start_local_ray(max(os.cpu_count() or 1, int(need + 0.999)))
    return "local"


def check_cluster_fits(cfg: Config, ray_mode: str = "local") -> None:
    """Fail fast, naming the keys to change, when training workers would leave Ray Data no CPU, or ask for GPUs that
    a Ray this process started cannot have (either way the run would wait forever). A joined cluster (or one a
    sweep's trial runs in) may still add GPU nodes: its autoscaler starts them on demand, so there an absent GPU is
    not an error."""
    import ray

    from mmray.config import ConfigError

    if cfg.train.use_gpu == "true" and ray_mode == "local" and not ray.cluster_resources().get("GPU", 0):
        raise ConfigError("train.use_gpu=true, but this machine has no GPU that Ray can use: set train.use_gpu=auto "
                          "(or false) to train on CPUs, or submit the run to a cluster with GPU workers "
                          "(`ray up ray-cluster.yaml`, then `ray job submit`).")
    total = ray.cluster_resources().get("CPU", 0)
    reserved = cfg.train.num_workers * cfg.train.cpus_per_worker
    if total - reserved < 1:
        raise ConfigError(
            f"the Ray cluster has {total:g} CPUs and the {cfg.train.num_workers} training workers reserve "
            f"{reserved:g} (train.num_workers x train.cpus_per_worker); the data pipeline needs at least 1 more. "
            "Lower train.cpus_per_worker or train.num_workers, or add nodes.")


def _use_gpu(cfg: Config) -> bool:
    import ray

    if cfg.train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.train.use_gpu == "true"


def torch_config(cfg: Config, use_gpu: bool):
    """The workers' process group: NCCL on GPUs, gloo on CPUs, and a collective that waits longer than
    train.collective_timeout_s for a peer fails (the worker group restarts) instead of hanging the run."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.train.collective_timeout_s)


def ordered_ingest_options():
    """Ray Train's ingest options with ``preserve_order``: the training split's blocks arrive in the order the reads
    produce them and the streaming split assigns them without locality, so the rows each worker sees are a function
    of (data, train.seed, epoch) and survive a resume (mmray.data.position)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def build_trainer(cfg: Config, data: DataSet, quality=None, cost_meter=None, callbacks: Sequence = (),
                  data_position=None):
    """A TorchTrainer whose workers each drive a DeepSpeed engine over their share of the streamed shards.

    ``callbacks`` are added to its RunConfig (Ray Train V2 user, controller and worker-group callbacks).
    ``data_position`` (a :class:`mmray.data.position.DataPosition` actor) makes resume sample-exact: each epoch
    leaves out the samples its checkpoint says were trained on, whatever the worker count."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmray.data.pipeline import read_split
    from mmray.train.loop import train_loop_per_worker

    tokenizer = data.tokenizer
    # Ray Data's progress bars are for terminals; in logs and CI they drown the training log.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    val = read_split(data.val, cfg, tokenizer)
    if cfg.eval.max_samples:
        val = val.limit(cfg.eval.max_samples)
    datasets = {"train": read_split(data.train, cfg, tokenizer, shuffle_seed=cfg.train.seed, quality=quality,
                                    weights=data.weights, position=data_position),
                "val": val}
    use_gpu = _use_gpu(cfg)
    from mmray.train.engine import ds_config

    ds_config(cfg, cfg.train.num_workers, use_gpu)  # what the resolved device cannot run fails here, not in workers
    fs, path = storage.resolve(cfg.run.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "use_gpu": use_gpu, "vocab_size": tokenizer.vocab_size,
                           "pad_id": tokenizer.pad_id, "tokenizer_json": tokenizer.to_str(), "quality": quality,
                           "cost_meter": cost_meter, "data_position": data_position},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=torch_config(cfg, use_gpu),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options={"train": ordered_ingest_options()}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures,
                                                   max_preemption_failures=cfg.train.max_preemption_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_last),
            callbacks=list(callbacks) or None,
        ),
    )


class RunFailedError(RuntimeError):
    """Training failed and Ray Train's failure budget is used up. The message names the budget, each failed rank's
    error and how to go on; ``worker_failures`` keeps Ray Train's rank -> exception mapping."""

    def __init__(self, message: str, worker_failures: dict | None = None):
        super().__init__(message)
        self.worker_failures = dict(worker_failures or {})


def _failed_for_good(cfg: Config, error: BaseException, run_dir: str) -> RunFailedError:
    """The final error of a run whose failures outlasted train.max_failures (worker crashes, lost nodes) or
    train.max_preemption_failures (announced preemptions)."""
    def first_line(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        lines = [f"rank {rank}: {first_line(e)}" for rank, e in sorted(failures.items())]
    else:
        lines = [first_line(getattr(error, "controller_failure", None) or error)]
    budget = (f"train.max_failures={cfg.train.max_failures}, "
              f"train.max_preemption_failures={cfg.train.max_preemption_failures}")
    return RunFailedError(
        f"run {cfg.run_name} failed and its failure budget is used up ({budget}); the last failure: "
        + "; ".join(lines) + f". Its complete checkpoints stay in {run_dir}: run the same command again to resume "
        "from the newest one, after fixing the cause (or with a larger train.max_failures).", failures)


def _user_error(error: BaseException) -> BaseException | None:
    """The bad-input error (bad data, bad config) that made the workers fail, if that is what happened.

    Ray wraps worker exceptions (and data-task exceptions inside them); unwrapping lets the CLI report bad input
    with exit code 2 and the original message instead of a generic training failure.
    """
    from mmray.data.pipeline import BadDataError

    pending = [error, *getattr(error, "worker_failures", {}).values()]
    seen = set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (BadDataError, ConfigError)) and not isinstance(getattr(e, "cause", None), BaseException):
            return e  # the original, not a Ray wrapper of it (RayTaskError(BadDataError), whose text is a traceback)
        pending.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def continue_legacy_run(cfg: Config, storage_root: str) -> Config:
    """``cfg`` with run.name set to the run an older mmray derived for it (see Config.legacy_run_names) when that
    run exists and the name derived now does not: its checkpoints and spend (cost.json) carry on."""
    legacy = [name for name in cfg.legacy_run_names() if name != cfg.run_name]
    if not legacy or storage.exists(storage.join(storage_root, cfg.run_name)):
        return cfg
    legacy = next((name for name in legacy if storage.exists(storage.join(storage_root, name))), None)
    if legacy is None:
        return cfg
    log.warning("continuing run %s, named as an earlier mmray named runs of this config (the name derived now "
                "would be %s); set run.name to choose", legacy, cfg.run_name)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=legacy))


def check_budget_pays_a_stop(cfg: Config, meter) -> None:
    """ConfigError when what is left of budget.usd cannot pay, at the cluster's burn rate, for the stop that the
    budget guard keeps in reserve (a checkpoint and budget.teardown_s): the guard decides only after the first step,
    so a run started without that much left could end over the cap (a rerun of a run that stopped for its budget)."""
    import ray

    from mmray.config import ConfigError
    from mmray.cost.budget import BudgetGuard, decide

    if not cfg.budget.usd:
        return
    spent, burn = ray.get([meter.spent_usd.remote(), meter.burn_usd_per_hour.remote()])
    reserve_s = BudgetGuard.for_budget(cfg.budget).reserve_s
    decision = decide(spent, burn, 0.0, cfg.budget.usd, reserve_s)
    if decision.stop:
        raise ConfigError(f"run {cfg.run_name} has ${cfg.budget.usd - spent:.4f} of its budget.usd=${cfg.budget.usd:g} "
                          f"left, less than one checkpoint and stop costs at ${burn:.2f}/h ({reserve_s:.0f} s: "
                          f"${decision.projected_usd - spent:.4f}); raise budget.usd to run it")


def train(cfg: Config, callbacks: Sequence = (), before_fit: Callable[[object], None] | None = None) -> dict:
    """Run (or resume) training for ``cfg`` and return the machine-readable summary.

    ``callbacks`` go to the Ray Train run (see :func:`build_trainer`); ``before_fit(trainer)`` is called with the
    built trainer just before it runs, and may raise to cancel the run (the sweep's trials use both)."""
    import ray
    import ray.train

    from mmray.data import sources
    from mmray.data.pipeline import RunData, quality_snapshot
    from mmray.train.checkpoint import prune_unmanaged

    from mmray.cost import meter as cost_meter
    from mmray.cost import prices as cost_prices

    t0 = time.perf_counter()
    check_run_name(cfg.run.name)
    data = resolve_data(cfg)  # bad data fails here, before any Ray resource exists
    cost_prices.load(cfg.budget.prices)  # so does a bad price table
    from mmray.train.engine import check_finetune

    check_finetune(cfg, data.tokenizer.vocab_size, data.tokenizer.pad_id)  # and bad pretrained weights
    storage_root = cfg.run.storage_path if storage.is_s3(cfg.run.storage_path) else \
        storage.resolve(cfg.run.storage_path)[1]
    cfg = continue_legacy_run(cfg, storage_root)
    run_dir = storage.join(storage_root, cfg.run_name)
    check_resume_config(cfg, run_dir)  # and so does resuming with another model
    spent = (cost_meter.read_state(run_dir) or {}).get("spent_usd", 0.0)
    if cfg.budget.usd and spent >= cfg.budget.usd:  # starting would cost money the budget no longer has
        raise ConfigError(f"run {cfg.run_name} has spent ${spent:.4f} of its budget.usd=${cfg.budget.usd:g} "
                          f"(see {cost_meter.cost_path(run_dir)}); raise budget.usd to continue it")
    ray_mode = init_ray(cfg)
    try:
        check_cluster_fits(cfg, ray_mode)
        # Zero-CPU helpers are pinned to the driver's node (as Ray Train pins its controller): on a spot worker,
        # a preemption would take them down with it.
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        quality = position = ray.remote(RunData).options(num_cpus=0, label_selector=here).remote()
        # The cost meter prices the cluster's nodes from their labels while the run trains and keeps the total in
        # RUN_DIR/cost.json; the loop asks it before each checkpoint interval when budget.usd caps the run.
        meter = cost_meter.start_meter(run_dir, budget_usd=cfg.budget.usd, prices_path=cfg.budget.prices,
                                       interval_s=cfg.budget.meter_interval_s)
        try:
            check_budget_pays_a_stop(cfg, meter)
            trainer = build_trainer(cfg, data, quality, meter, callbacks, data_position=position)
            if before_fit is not None:
                before_fit(trainer)
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise (_user_error(e) or _failed_for_good(cfg, e, run_dir)) from e
        finally:
            cost = ray.get(meter.stop.remote())  # a clean end, saved; the next start of this run continues from it
            ray.kill(meter)
        data_quality = quality_snapshot(quality)
        shards_skipped = ray.get(position.shards_skipped.remote(), timeout=60)
        # Checkpoints that an interrupted earlier start left outside Ray Train's knowledge, which it never deletes.
        prune_unmanaged(run_dir, [os.path.basename(c.path) for c, _ in result.best_checkpoints or ()],
                        cfg.run.keep_last)
    finally:
        if ray_mode != "in-process":  # flushes forwarded worker logs before the caller prints its summary
            ray.shutdown()
    metrics = dict(result.metrics or {})
    return {
        "run_dir": run_dir,
        "checkpoint": storage.join(run_dir, os.path.basename(result.checkpoint.path)) if result.checkpoint else None,
        "steps": metrics.pop("step", 0),
        "samples_seen": metrics.pop("samples_seen", 0),
        "samples_repeated": metrics.pop("samples_repeated", 0),  # trained on twice in one epoch (exact resume: 0)
        "shards_skipped": shards_skipped,  # not read again by a resume: every row already trained on in the epoch
        "wall_s": round(time.perf_counter() - t0, 2),
        "data": sources.display(data.root),
        "epoch_samples": data.train_samples,
        "ray": ray_mode,
        "data_quality": data_quality,
        "spent_usd": round(cost["spent_usd"], 6),
        "budget_usd": cfg.budget.usd,
        "stopped_for_budget": bool(metrics.pop("stopped_for_budget", False)),
        "metrics": metrics,
    }
