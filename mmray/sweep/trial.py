"""One trial of a sweep: a whole mmray training (a Ray Train V2 run) launched from inside a Ray Tune trial.

This is the Train V2 way of tuning: the Tune trainable builds and fits a TorchTrainer (here through
:func:`mmray.train.trainer.train`, so a trial trains exactly like ``mmray train``), and a Train callback on the run's
controller forwards every ``ray.train.report`` of the workers to the Tune trial, as Ray's
``ray.tune.integration.ray_train.TuneReportCallback`` does. :class:`ReportBridge` is that callback, adapted to what a
scheduler needs from mmray's reports:

- the loop reports held-out metrics (``val_*``) only every ``eval.every`` steps and the loss every
  ``train.log_every`` steps; Tune requires the sweep's metric in every result, so the latest ``val_*`` values are
  carried forward and reports before the first evaluation are held back;
- each result carries ``trial_wall_s`` (since the trial started), from which the budget measures step times, and
  the wall time and step of the trial's first report (the benchmark's time to first step).

The trainable is a class (:class:`SweepTrial`) rather than Ray's usual function, for one reason: when Tune stops a
trial (ASHA, the budget), it ends the trial's process, and the Train run's controller dies with it; Ray Train then
relies on a detached cleaner that asks the State API whether the controller is alive, which fails without the
dashboard (local Ray, CI) or with several Ray instances on one machine, so the run's placement group and its CPUs /
GPUs leak (until the driver's job ends) and the next trials wait forever. ``SweepTrial.cleanup`` runs before the
process ends and aborts the Train run, which releases them. Where Tune kills trials without that hook (an
interrupted sweep), :class:`RunWatcher` has recorded each run's placement group and the driver releases it
(:func:`release_placement_groups`). A class trainable also gives PBT its checkpoints: ``save_checkpoint`` names the
run's latest Train checkpoint, and a trial that PBT restarts from another trial's checkpoint continues a copy of
that trial's run (:func:`adopt_run`).

Every trial trains in its own run directory, SWEEP_DIR/runs/<trial id>, with its own checkpoints and data pipeline;
a trial restarted by ``mmray sweep --resume`` resumes its run from its latest checkpoint like ``mmray train`` does.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2.api.callback import UserCallback

from mmray import storage
from mmray.sweep.spec import SweepSpec

log = logging.getLogger("mmray")

RUNS_DIR = "runs"
PLACEMENT_GROUPS_DIR = "placement_groups"
ABORT_TIMEOUT_S = 60.0


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


class ReportBridge(UserCallback):
    """Forwards the Train run's reports to the Tune trial through a Ray queue (runs on the Train controller)."""

    def __init__(self, queue, started_at: float, metric: str):
        self.queue, self.started_at, self.metric = queue, started_at, metric
        self._held: dict[str, Any] = {}  # the latest val_* metrics, carried into reports without an evaluation
        self._first: tuple[float, int] | None = None

    def after_report(self, run_context, metrics, checkpoint):
        reported = {k: v for k, v in metrics[0].items() if _scalar(v)}  # rank 0's: every rank evaluates alike
        self._held.update({k: v for k, v in reported.items() if k.startswith("val_")})
        result = {**self._held, **reported, "trial_wall_s": round(time.time() - self.started_at, 3)}
        if self._first is None and "step" in result:
            self._first = (result["trial_wall_s"], int(result["step"]))
        if self._first is not None:
            result["first_report_wall_s"], result["first_report_step"] = self._first
        if self.metric not in result:
            return  # before the first evaluation: Tune requires the metric in every result
        self.queue.put({"metrics": result, "checkpoint": checkpoint.path if checkpoint is not None else None})


class RunWatcher(ControllerCallback, WorkerGroupCallback):
    """Runs on the Train controller: sends the controller's handle to the trial as soon as it starts, so that the
    trial can abort the run whenever Tune stops it (even before its first report), and records the placement group
    of each worker group it starts (PLACEMENT_GROUPS_DIR/<trial id>.<id>), so that the driver can release what a
    killed trial leaves behind (:func:`release_placement_groups`).

    These hooks are Ray Train internals (the ones its own placement-group cleaner uses); the public ``UserCallback``
    has no start hook.
    """

    def __init__(self, queue, record_dir: str, trial_id: str):
        self.queue, self.record_dir, self.trial_id = queue, record_dir, trial_id

    def after_controller_start(self, train_run_context):
        self.queue.put({"controller": ray.get_runtime_context().current_actor})

    def after_worker_group_start(self, worker_group):
        try:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            storage.write_text(storage.join(self.record_dir, f"{self.trial_id}.{pg.id.hex()}"), "")
        except Exception as e:  # best effort: Ray's own cleaner may still release it
            log.warning("could not record the placement group of trial %s: %s", self.trial_id, e)


def release_placement_groups(record_dir: str, trial_ids=None) -> int:
    """Remove the placement groups that the Train runs of ``trial_ids`` (all: None) recorded and left behind.

    A placement group created by a Train controller outlives the controller when the trial's process is killed
    (Tune kills the trials when a sweep is interrupted); Ray Train's own cleaner needs the State API, which is
    missing without the dashboard. Call this only for trials that are not running. Returns how many were removed.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not storage.exists(record_dir):
        return 0
    removed = 0
    for path in storage.list_files(record_dir):
        trial_id, _, pg_hex = path.rstrip("/").rsplit("/", 1)[-1].rpartition(".")
        if trial_ids is not None and trial_id not in trial_ids:
            continue
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
        try:
            if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                remove_placement_group(pg)
                removed += 1
        except Exception as e:
            log.warning("could not release placement group %s of trial %s: %s", pg_hex, trial_id, e)
            continue
        storage.delete(path)
    return removed


class TrialStopped(RuntimeError):
    """Tune stopped the trial before its Train run was built."""


def train_with_callbacks(cfg, callbacks: list, stopping: threading.Event | None = None,
                         built: threading.Event | None = None) -> dict:
    """:func:`mmray.train.trainer.train` with ``callbacks`` added to its Ray Train RunConfig. Once ``stopping`` is
    set no trainer runs any more (:class:`TrialStopped`); ``built`` is set when one is about to."""
    from mmray.train import trainer

    def before_fit(_trainer) -> None:
        if stopping is not None and stopping.is_set():
            raise TrialStopped("the trial was stopped before its training started")
        if built is not None:
            built.set()

    return trainer.train(cfg, callbacks=callbacks, before_fit=before_fit)


def adopt_run(src: str, dst: str) -> None:
    """Copy another trial's run directory (its checkpoints and Train's checkpoint index) into a new run directory,
    so that the new run resumes from the other's latest checkpoint (PBT's exploit). Its cost record stays behind."""
    import pyarrow.fs as pafs

    fs, src_inner = storage.resolve(src)
    _, dst_inner = storage.resolve(dst)
    for attempt in range(3):  # the source trial may rotate a checkpoint away while it is copied
        try:
            pafs.copy_files(src_inner, dst_inner, source_filesystem=fs, destination_filesystem=fs)
            break
        except OSError:
            if attempt == 2:
                raise
            time.sleep(1.0)
    storage.delete(storage.join(dst, "cost.json"))


class SweepTrial(tune.Trainable):
    """The Tune trainable: trains the base config with this trial's parameters; one Tune result per Train report."""

    def setup(self, config: dict, spec: SweepSpec):
        self.spec, self.params = spec, dict(config)
        self.started_at = time.time()
        self.runs_root = storage.join(spec.sweep_dir, RUNS_DIR)
        self.run_name = self.trial_id
        self.queue = self.worker = self.controller = None
        self.outcome: dict[str, Any] = {}
        self.stopping, self.built = threading.Event(), threading.Event()
        self.last: dict[str, Any] = {}
        self.train_checkpoint = ""
        self.finished = False

    # ---------------------------------------------------------------------------------------------------- running
    def _start(self) -> None:
        from ray.util.queue import Queue

        cfg = self.spec.trial_config({**self.params, "run.storage_path": self.runs_root, "run.name": self.run_name})
        self.queue = Queue(actor_options={"num_cpus": 0})
        callbacks = [ReportBridge(self.queue, self.started_at, self.spec.metric),
                     RunWatcher(self.queue, storage.join(self.spec.sweep_dir, PLACEMENT_GROUPS_DIR), self.trial_id)]

        def work() -> None:
            try:
                self.outcome["summary"] = train_with_callbacks(cfg, callbacks, self.stopping, self.built)
            except BaseException as e:  # raised again from step(), where Tune records it
                self.outcome["error"] = e

        self.worker = threading.Thread(target=work, name="mmray-trial-train", daemon=True)
        self.worker.start()

    def _next_item(self) -> dict | None:
        """The next message of the bridge, or None once the run has ended and every report has been read."""
        from ray.util.queue import Empty

        while True:
            try:
                return self.queue.get(timeout=0.5)
            except Empty:
                if not self.worker.is_alive() and self.queue.empty():  # the controller reports before fit() returns
                    return None

    def step(self) -> dict:
        if self.worker is None:
            self._start()
        while True:
            item = self._next_item()
            if item is None:
                return self._final()
            if "controller" in item:
                self.controller = item["controller"]
                continue
            self.last = item["metrics"]
            if item["checkpoint"]:
                self.train_checkpoint = item["checkpoint"].rstrip("/").rsplit("/", 1)[-1]
            return dict(self.last)

    def _final(self) -> dict:
        self.worker.join()
        self.finished = True
        if "error" in self.outcome:
            raise self.outcome["error"]
        summary = self.outcome["summary"]
        if self.spec.metric not in self.last:
            raise ValueError(f"the trial never reported sweep.metric={self.spec.metric!r}; its final metrics are: "
                             f"{', '.join(sorted(summary['metrics']))}")
        return {**self.last, "trial_wall_s": round(time.time() - self.started_at, 3),
                "train_wall_s": summary["wall_s"], "run_dir": summary["run_dir"], "done": True}

    def cleanup(self):
        """Tune is ending this trial (finished, stopped early, or the sweep is over): end its Train run first, so
        that the run's placement group is released before this process (and the controller with it) goes away."""
        self.stopping.set()
        if self.worker is not None and self.worker.is_alive():
            from ray.util.queue import Empty

            deadline = time.time() + ABORT_TIMEOUT_S
            # a run being built or started announces its controller within seconds
            while self.controller is None and self.built.is_set() and self.worker.is_alive() \
                    and time.time() < deadline:
                try:
                    item = self.queue.get(timeout=0.5)
                except Empty:
                    continue
                self.controller = item.get("controller", self.controller)
            if self.controller is not None:
                try:
                    ray.get(self.controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
                except Exception:  # the controller exits while it answers: that is the abort succeeding
                    pass
            self.worker.join(timeout=ABORT_TIMEOUT_S)  # lets train() close its cost meter cleanly
        if self.queue is not None:
            self.queue.shutdown()

    # ------------------------------------------------------------------------------------------ PBT checkpoints
    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        """A pointer to the run's latest Train checkpoint (the weights stay in the run directory)."""
        return {"trial_id": self.trial_id, "run_name": self.run_name, "checkpoint": self.train_checkpoint}

    def load_checkpoint(self, checkpoint: dict):
        """Continue from a pointer: this trial's own run (a resumed sweep), or a copy of another trial's run
        (PBT's exploit, as a new generation of this trial's run)."""
        if checkpoint["trial_id"] == self.trial_id:
            self.run_name = checkpoint["run_name"]
            return
        generation = 1
        while storage.exists(storage.join(self.runs_root, f"{self.trial_id}-g{generation}")):
            generation += 1
        self.run_name = f"{self.trial_id}-g{generation}"
        log.info("PBT: trial %s continues from %s of trial %s", self.trial_id, checkpoint["checkpoint"],
                 checkpoint["trial_id"])
        adopt_run(storage.join(self.runs_root, checkpoint["run_name"]), storage.join(self.runs_root, self.run_name))
