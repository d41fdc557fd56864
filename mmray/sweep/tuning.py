"""The Ray Tune side of a sweep: the search algorithm, the scheduler, and the adapters that feed the budget ledger.

- :class:`BudgetGate` wraps the search algorithm: a trial is created only when the ledger admits it
  (:meth:`mmray.sweep.budget.Ledger.can_admit`); when none can be afforded and nothing runs, the search ends.
- :class:`BudgetStopper` ends every trial and the search when only the stops still fit under the cap.
- :class:`LedgerCallback` tells the ledger when trials start, report and end, and restores it on ``--resume``.

All three share one :class:`~mmray.sweep.budget.Ledger`; Tune pickles them together into the experiment's
tuner.pkl, so a restored sweep gets them back sharing it again.
"""
from __future__ import annotations

import json
import logging
import time

from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, SearchGenerator
from ray.tune.stopper import Stopper

from mmray import storage
from mmray.sweep.budget import Ledger
from mmray.sweep.spec import SweepSpec

log = logging.getLogger("mmray")

TRIAL_DRIVER_CPU = 0.01  # the trial's own actor only waits on its Train run
ASHA_FILE = "asha.json"


class BudgetGate(SearchAlgorithm):
    """Delegates to ``inner``; refuses the trials that the budget cannot afford now, and ends the search when it can
    afford none and no trial is left that could free budget."""

    def __init__(self, inner: SearchAlgorithm, ledger: Ledger, clock=time.time):
        super().__init__()
        self.inner, self.ledger, self.clock = inner, ledger, clock
        self._waiting_for = ""

    @property
    def metric(self):
        return self.inner.metric

    @property
    def total_samples(self):
        return self.inner.total_samples

    def set_search_properties(self, metric, mode, config, **spec):
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments):
        self.inner.add_configurations(experiments)

    def next_trial(self):
        if self.is_finished():
            return None
        now = self.clock()
        ok, why = self.ledger.can_admit(now)
        if not ok:
            if not self.ledger.active():
                # Only the budget's doing if the search had another trial to run: a finished grid is not a stop for
                # budget (the trial asked for here is dropped either way: the sweep ends).
                if self.inner.next_trial() is None and self.inner.is_finished():
                    self.set_finished()
                    return None
                log.warning("no new trial: %s; the sweep ends", why)
                if why.startswith("budget"):
                    self.ledger.exhaust(why, now)
                self.set_finished()
            elif why != self._waiting_for:
                log.info("waiting for running trials before starting another: %s", why)
            self._waiting_for = why
            return None
        trial = self.inner.next_trial()
        if trial is None:
            if self.inner.is_finished():
                self.set_finished()
            return None
        self._waiting_for = ""
        self.ledger.admit(trial.trial_id, now, trial.config)
        return trial

    def on_trial_result(self, trial_id, result):
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def is_finished(self):
        done = self._finished or self.inner.is_finished()
        if done and not self.ledger.search_done:
            self.ledger.search_done = True
            self.ledger.save(self.clock(), force=True)
        return done

    def set_finished(self):
        super().set_finished()
        self.inner.set_finished()

    def has_checkpoint(self, dirpath):
        return self.inner.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath, **kwargs):
        self.inner.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath):
        self.inner.restore_from_dir(dirpath)


class BudgetStopper(Stopper):
    """Ends the whole sweep (Tune checks stop_all every step) when the budget only has room for the stops."""

    def __init__(self, ledger: Ledger, clock=time.time):
        self.ledger, self.clock = ledger, clock

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        now = self.clock()
        stop, why = self.ledger.must_stop(now)
        if stop and not self.ledger.exhausted:
            log.warning("%s: stopping every running trial and ending the sweep", why)
            self.ledger.exhaust(why, now)
        return stop


class LedgerCallback(Callback):
    """Feeds the ledger: trial starts and ends, and the (wall time, step) of every report."""

    def __init__(self, ledger: Ledger, clock=time.time):
        self.ledger, self.clock = ledger, clock

    def setup(self, **info):
        if self.ledger.restore():
            log.info("resumed the sweep's ledger: $%.4f spent so far", self.ledger.spent(self.clock())["usd"])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.ledger.started(trial.trial_id, self.clock())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "trial_wall_s" in result and "step" in result:
            self.ledger.progress(trial.trial_id, result["trial_wall_s"], result["step"], self.clock())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ledger.ended(trial.trial_id, self.clock())

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ledger.ended(trial.trial_id, self.clock())

    def on_step_end(self, iteration, trials, **info):
        now = self.clock()
        for trial in trials:  # PBT pauses trials without a callback of its own: stop charging a paused trial
            if trial.status in (Trial.PAUSED, Trial.PENDING) and trial.trial_id in self.ledger.trials:
                self.ledger.paused(trial.trial_id, now)
        self.ledger.save(now)

    def on_experiment_end(self, trials, **info):
        self.ledger.save(self.clock(), force=True)


class ResumableASHA(ASHAScheduler):
    """ASHA that keeps its rungs across ``--resume``: Tune saves a search algorithm's state with the experiment but
    not a scheduler's, so a restored ASHA would judge the remaining trials against empty rungs (and let worse trials
    train to the end). The rungs' recorded values are written to ``path`` after every decision and read back when
    the first trial is added after a restore."""

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        self.path, self._restored = path, False

    def _state(self) -> list:
        return [[[milestone, dict(recorded)] for milestone, recorded in b._rungs] for b in self._brackets]

    def _persist(self) -> None:
        storage.write_text(self.path, json.dumps(self._state()))

    def _restore(self) -> None:
        self._restored = True
        if not storage.exists(self.path):
            return
        for bracket, rungs in zip(self._brackets, json.loads(storage.read_text(self.path))):
            for (milestone, recorded), (saved_milestone, values) in zip(bracket._rungs, rungs):
                if milestone == saved_milestone:
                    recorded.update(values)

    def on_trial_add(self, tune_controller, trial):
        if not self._restored:
            self._restore()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()


class ReleaseCallback(Callback):
    """Releases what a trial's Train run left behind once the trial is over (see trial.release_placement_groups)."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def _release(self, trial) -> None:
        from mmray.sweep.trial import release_placement_groups

        if release_placement_groups(self.record_dir, {trial.trial_id}):
            log.info("released the placement group left by trial %s", trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


def param_space(spec: SweepSpec) -> dict:
    """The Tune search space: one flat entry per dotted key (the trial applies them to the base config).

    A key that only sweep.points set is added with the base config's value, since Tune fills points into keys of
    the space only.
    """
    space = {d.key: d.to_tune(as_grid=spec.search == "grid") for d in spec.space}
    resolved = spec.config.to_dict()
    for point in spec.points:
        for key in point:
            if key not in space:
                section, name = key.split(".", 1)
                space[key] = resolved[section][name]
    return space


def search_algorithm(spec: SweepSpec, max_concurrent: int) -> SearchAlgorithm:
    """Random / grid (Tune's variant generator) or Optuna's TPE, each limited to ``max_concurrent`` trials."""
    points = [dict(p) for p in spec.points]
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=spec.metric, mode=spec.mode, points_to_evaluate=points or None,
                                seed=spec.seed)
        return SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))
    return BasicVariantGenerator(points_to_evaluate=points or None, max_concurrent=max_concurrent,
                                 random_state=spec.seed)


def scheduler(spec: SweepSpec):
    """ASHA (stops the worse trials at each rung of optimizer steps), PBT, or FIFO (no early stopping)."""
    s, max_steps = spec.scheduler, spec.config.train.max_steps
    if s.name == "asha":
        # Trials that reach max_steps finish on their own (stop_last_trials=False), so their run ends cleanly
        # with its final evaluation and checkpoint.
        return ResumableASHA(storage.join(spec.sweep_dir, ASHA_FILE), time_attr="step", max_t=max_steps,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                             stop_last_trials=False)
    if s.name == "pbt":
        by_key = {d.key: d for d in spec.space}
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations={k: by_key[k].to_tune() for k in s.mutations})
    return FIFOScheduler()


def trial_dirname(trial) -> str:
    """Tune drivers name each trial after its id, with no timestamps."""
    return trial.trial_id


def trainable(spec: SweepSpec):
    """The trainable with the sweep bound to it. The Tune trial itself reserves next to nothing (Tune refuses an
    empty request): its Ray Train run reserves the workers, and the sweep bounds how many trials run at once."""
    from mmray.sweep.trial import SweepTrial

    return tune.with_resources(tune.with_parameters(SweepTrial, spec=spec), {"CPU": TRIAL_DRIVER_CPU})
