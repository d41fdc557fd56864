"""Run (or resume) a sweep: check everything, start or join Ray, fit the Tuner, write the results.

The sweep directory (``sweep.storage_path``/``sweep.name``) holds::

    sweep.yaml          the sweep as it was started (base config + sweep section); --resume checks against it
    ledger.json         the budget ledger (mmray.sweep.budget)
    cost.json           the sweep's cost meter: the whole cluster's dollars while the sweep ran (mmray.cost.meter)
    asha.json           ASHA's rungs, so that a resumed sweep keeps stopping against them (mmray.sweep.tuning)
    tune/               Ray Tune's experiment (restored by --resume through Tuner.restore)
    runs/<trial id>/    each trial's training run: checkpoints, cost.json
    placement_groups/   the Train runs' placement groups, released if a killed trial leaves one behind
    results.csv  best_config.yaml  metric_vs_cost.png  best_per_fusion.png  learning_curves.png
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Sequence

from mmray import storage
from mmray.config import ConfigError
from mmray.sweep import report
from mmray.cost import meter as cost_meter
from mmray.sweep.budget import LEDGER_FILE, Ledger, Limits, MeteredCost, WallClockCost, price_trial
from mmray.sweep.spec import SweepSpec

log = logging.getLogger("mmray")

SWEEP_FILE = "sweep.yaml"
TUNE_DIR = "tune"


def _init_ray(spec: SweepSpec) -> str:
    """Join RAY_ADDRESS, start a local Ray sized for the sweep, or use the Ray already initialised (tests)."""
    import ray

    if ray.is_initialized():
        return "in-process"
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return "joined"
    t = spec.config.train
    need = spec.max_concurrent * t.num_workers * t.cpus_per_worker + 2
    from mmray.train.trainer import start_local_ray

    start_local_ray(max(os.cpu_count() or 1, int(need + 0.999)))
    return "local"


def _concurrency(spec: SweepSpec, cluster_cpus: float) -> int:
    """max_concurrent, lowered to what the cluster runs at once: a trial waiting for workers would be paid for."""
    per_trial = spec.config.train.num_workers * spec.config.train.cpus_per_worker
    if cluster_cpus - per_trial < 1:
        raise ConfigError(f"the Ray cluster has {cluster_cpus:g} CPUs and one trial's {spec.config.train.num_workers} "
                          f"training workers reserve {per_trial:g} (train.num_workers x train.cpus_per_worker); the "
                          "data pipeline needs at least 1 more. Lower them or add nodes.")
    fits = max(1, int((cluster_cpus - 1) // per_trial)) if per_trial else spec.max_concurrent
    if fits < spec.max_concurrent:
        log.warning("sweep.max_concurrent=%d, but the cluster's %g CPUs run %d trial(s) of %g CPUs at once (plus "
                    "one CPU for data): running %d at a time", spec.max_concurrent, cluster_cpus, fits, per_trial,
                    fits)
    return min(spec.max_concurrent, fits)


def _check_directory(spec: SweepSpec, resume: bool) -> None:
    """A new sweep needs a fresh directory; a resumed one needs its own, started with the same sweep."""
    path = storage.join(spec.sweep_dir, SWEEP_FILE)
    if not resume:
        if storage.exists(path):
            raise ConfigError(f"sweep directory {spec.sweep_dir} already holds a sweep: pass --resume to continue "
                              "it, or set sweep.name to start another.")
        return
    if not storage.exists(path):
        raise ConfigError(f"nothing to resume: no sweep in {spec.sweep_dir} (sweep.name={spec.name}).")
    import yaml

    saved, given = yaml.safe_load(storage.read_text(path)), yaml.safe_load(spec.to_yaml())
    for d in (saved, given):  # what may change on resume: how many trials run at once
        d["sweep"].pop("max_concurrent", None)
    if saved != given:
        differ = sorted({f"{s}.{k}" for s in set(saved) | set(given) if isinstance(saved.get(s, {}), dict)
                         for k in set(saved.get(s) or {}) | set(given.get(s) or {})
                         if (saved.get(s) or {}).get(k) != (given.get(s) or {}).get(k)})
        raise ConfigError(f"--resume continues the sweep in {spec.sweep_dir} as it was started; the config differs "
                          f"in: {', '.join(differ)}. Resume with the config in {path}.")


def _ledger(spec: SweepSpec, cluster_cpus: float, gpus_available: bool) -> Ledger:
    from mmray.cost import prices

    b = spec.budget
    instance = prices.load(spec.config.budget.prices).get(b.instance_type)
    price = price_trial(spec.resources_per_trial(gpus_available), instance, b.market, cluster_cpus)
    limits = Limits(usd=b.usd, gpu_hours=b.gpu_hours, safety=b.safety, stop_reserve_s=b.stop_reserve_s,
                    step_s=b.step_s, startup_s=b.startup_s)
    return Ledger(path=storage.join(spec.sweep_dir, LEDGER_FILE), price=price, limits=limits,
                  max_steps=spec.config.train.max_steps, cost_source=MeteredCost(spec.sweep_dir))


def _collect(result_grid, ledger: Ledger, now: float) -> tuple[list[dict], dict]:
    """Plain per-trial records (for mmray.sweep.report) and each trial's learning curve."""
    records, curves = [], {}
    for result in result_grid:
        trial_id = os.path.basename(result.path.rstrip("/"))
        metrics = dict(result.metrics or {})
        error = result.error
        record = {"trial_id": trial_id, "config": dict(result.config or {}), "metrics": metrics,
                  "error": f"{type(error).__name__}: {_root_message(error)}" if error else ""}
        if trial_id in ledger.trials:
            record["config"] = record["config"] or dict(ledger.trials[trial_id].get("params") or {})
            record.update(wall_s=ledger.trial_seconds(trial_id, now), cost_usd=ledger.trial_spent(trial_id, now, "usd"),
                          gpu_hours=ledger.trial_spent(trial_id, now, "gpu_hours"),
                          stopped_for_budget=ledger.trials[trial_id]["stopped_for_budget"],
                          done=ledger.trials[trial_id]["done"])
        records.append(record)
        frame = result.metrics_dataframe
        if frame is not None and "step" in frame:
            curves[trial_id] = frame
    return records, curves


def _root_message(error: BaseException) -> str:
    """The innermost message of a (Tune-, Train- or Ray-wrapped) trial error."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or getattr(e, "cause", None)
        if nxt is None or not isinstance(nxt, BaseException):
            break
        e = nxt
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def _curves(frames: dict, metric: str) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for trial_id, frame in frames.items():
        if metric in frame:
            rows = frame[["step", metric]].dropna()
            out[trial_id] = [(float(s), float(v)) for s, v in rows.itertuples(index=False)]
    return out


def run_sweep(spec: SweepSpec, resume: bool = False, callbacks: Sequence = ()) -> dict:
    """Run the sweep (or continue it with ``resume``) and return the machine-readable summary.

    ``callbacks`` are extra Ray Tune callbacks (tests use one to interrupt a sweep).
    """
    import ray
    from ray import tune

    from mmray.sweep import tuning
    from mmray.sweep.trial import PLACEMENT_GROUPS_DIR, release_placement_groups
    from mmray.train.trainer import resolve_data

    t0 = time.time()
    _check_directory(spec, resume)
    resolve_data(spec.config)  # generated once here, not by every trial at once; bad data fails before Ray starts
    if not resume:
        storage.write_text(storage.join(spec.sweep_dir, SWEEP_FILE), spec.to_yaml())
    ray_mode = _init_ray(spec)
    try:
        cluster = ray.cluster_resources()
        max_concurrent = _concurrency(spec, cluster.get("CPU", 0))
        ledger = _ledger(spec, cluster.get("CPU", 0), cluster.get("GPU", 0) >= 1)
        log.info("sweep %s: %s search over %s, %s, metric %s (%s), up to %d trial(s) at a time -> %s", spec.name,
                 spec.search, ", ".join(d.key for d in spec.space), spec.scheduler.name, spec.metric, spec.mode,
                 max_concurrent, spec.sweep_dir)
        log.info("a trial costs $%.4f/h (%.3g of a %s %s instance at $%.3f/h) and %g GPU-h/h; budget: %s",
                 ledger.price.usd_per_hour, ledger.price.share, ledger.price.instance_type, ledger.price.market,
                 ledger.price.instance_usd_per_hour, ledger.price.gpus,
                 ", ".join(f"{v:g} {u}" for u, v in (("USD", spec.budget.usd), ("GPU-h", spec.budget.gpu_hours))
                           if v) or "no cap")
        fs, tune_root = storage.resolve(spec.sweep_dir)
        pg_dir = storage.join(spec.sweep_dir, PLACEMENT_GROUPS_DIR)
        space = tuning.param_space(spec)
        if resume:
            tuner = tune.Tuner.restore(storage.join(spec.sweep_dir, TUNE_DIR) if storage.is_s3(spec.sweep_dir)
                                       else os.path.join(tune_root, TUNE_DIR), trainable=tuning.trainable(spec),
                                       resume_unfinished=True, resume_errored=False, restart_errored=False,
                                       param_space=space, storage_filesystem=fs if storage.is_s3(spec.sweep_dir)
                                       else None)
        else:
            tuner = tune.Tuner(
                tuning.trainable(spec),
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples + len(spec.points),
                    search_alg=tuning.BudgetGate(tuning.search_algorithm(spec, max_concurrent), ledger),
                    scheduler=tuning.scheduler(spec), reuse_actors=False,
                    trial_name_creator=tuning.trial_dirname, trial_dirname_creator=tuning.trial_dirname),
                run_config=tune.RunConfig(
                    name=TUNE_DIR, storage_path=tune_root, storage_filesystem=fs,
                    stop=tuning.BudgetStopper(ledger),
                    callbacks=[tuning.LedgerCallback(ledger), tuning.ReleaseCallback(pg_dir), *callbacks],
                    failure_config=tune.FailureConfig(max_failures=0), verbose=1),
            )
        release_placement_groups(pg_dir)  # left by trials of an interrupted run of this sweep in this Ray
        # The sweep's meter prices the whole cluster from its nodes' labels while the sweep runs, in
        # SWEEP_DIR/cost.json (continued by --resume); the budget decisions read it through the ledger.
        meter = cost_meter.start_meter(spec.sweep_dir, budget_usd=spec.budget.usd,
                                       prices_path=spec.config.budget.prices,
                                       interval_s=spec.config.budget.meter_interval_s)
        try:
            result_grid = tuner.fit()
        finally:
            release_placement_groups(pg_dir)  # an interrupted fit kills its running trials without their cleanup
            try:
                metered = ray.get(meter.stop.remote(), timeout=60)  # a clean end; a resumed sweep continues it
            except Exception as e:  # noqa: BLE001 - the saved cost.json stands; never hide fit()'s own error
                log.warning("the sweep's cost meter did not stop cleanly (%s); using its last saved total", e)
                metered = {"spent_usd": (cost_meter.read_state(spec.sweep_dir) or {}).get("spent_usd", 0.0)}
            finally:
                ray.kill(meter)
    finally:
        if ray_mode == "local":
            ray.shutdown()
    now = time.time()
    ledger.restore()  # as the Tune adapters left it (on --resume, they hold the copy Tune restored, not this one)
    interrupted = not ledger.search_done or bool(ledger.active())
    records, frames = _collect(result_grid, ledger, now)
    table = report.rows(records, spec)
    print(report.format_table(table, spec), file=sys.stderr)
    outputs = report.write_outputs(table, _curves(frames, spec.metric), spec, spec.sweep_dir)
    top = report.best(table, spec)
    spent = ledger.spent(now)
    summary = {
        "sweep_dir": spec.sweep_dir,
        "best_config": {k: top[k] for k in spec.keys if top[k] != ""} if top else None,
        "best_metric": top[spec.metric] if top else None,
        "best_trial": top["trial_id"] if top else None,
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": len(table),
        "errored": sum(r["status"] == "ERROR" for r in table),
        "stopped_early": sum(r["stopped_early"] for r in table),
        "stopped_for_budget": bool(ledger.exhausted),
        "spent_usd": round(max(spent["usd"], metered["spent_usd"]), 6),
        "metered_usd": round(metered["spent_usd"], 6),
        "trials_usd": round(WallClockCost().spent_usd(ledger, now), 6),
        "budget_usd": spec.budget.usd,
        "spent_gpu_hours": round(spent["gpu_hours"], 6),
        "budget_gpu_hours": spec.budget.gpu_hours,
        "interrupted": interrupted,
        "wall_s": round(time.time() - t0, 2),
        "ray": ray_mode,
        "outputs": outputs,
    }
    if top:
        log.info("best: %s %s=%.4f (%s); spent $%.4f of %s", top["trial_id"], spec.metric, top[spec.metric],
                 ", ".join(f"{k}={v}" for k, v in summary["best_config"].items()), summary["spent_usd"],
                 f"${spec.budget.usd:g}" if spec.budget.usd else "no cap")
    if interrupted:
        log.warning("the sweep was interrupted; continue it with: mmray sweep --resume --config ...")
    return summary
