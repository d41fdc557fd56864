"""The sweep's budget: price every trial, project it before it starts, and end the sweep before the cap.

Price of a trial. A trial reserves R = {CPU: workers x cpus_per_worker, GPU: workers or 0} (the same for every trial
of a sweep). It runs on ``sweep.budget.instance_type`` at that market's hourly price P (mmray.cost.prices, with
``budget.prices`` / ``$MMRAY_PRICES`` merged over the packaged table). Its share of an instance is GPU / instance
GPUs when it uses GPUs, else CPU / instance vCPUs; an entry without vCPUs (``local``) counts the Ray cluster's CPUs as
the instance. So a trial costs P x share per hour, and uses GPU GPU-hours per hour.

Spend. A :class:`CostSource` says what the sweep has spent. Each trial is charged from the moment its Tune actor
starts to the moment it ends (wall time x rate: :class:`WallClockCost`, which also gives each trial's cost in the
results); the sweep's total comes from the cost meter (:class:`MeteredCost`: mmray.cost.meter on the sweep directory,
pricing every node of the cluster from its labels, head and idle time included), and is never less than the trials'
sum. While the cluster burns more than its running trials are priced at, the projections below charge each running
trial its share of the cluster's burn. GPU-hours are counted from the trials' wall time.

Projection. A trial's duration is projected as ``(startup_s + max_steps x step_s) x safety + stop_reserve_s``, with
``step_s`` (seconds per step, evaluations included) and ``startup_s`` (trial start to first step) the slowest
measured by any trial so far, from the wall time and step of its reports. Before anything is measured the config's
first estimate is used (``sweep.budget.step_s``); without one, a pilot trial runs alone until it has reported.

Admission (:meth:`Ledger.can_admit`): a trial starts only if

    spent + committed + projected(new trial)  <=  cap

where ``committed`` is what the admitted, unfinished trials are projected to spend still (at least a stop each).
The stop (:meth:`Ledger.must_stop`): when ``spent + stop reserve of every running trial >= cap``, the sweep's stopper
ends every trial and the search, so the stops themselves fit under the cap. The guarantee holds as long as a stop
takes at most ``stop_reserve_s x safety``; projections that turn out short only make the stop come sooner.

The ledger is saved to SWEEP_DIR/ledger.json on every event (and at most every few seconds in between), so that a
resumed sweep (``mmray sweep --resume``) continues the same spend: a trial that was running when the driver died is
charged up to the last save.

Pure Python: the Tune adapters that drive the ledger (a search-algorithm gate, a stopper, a callback) are in
:mod:`mmray.sweep.tuning`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Protocol

LEDGER_FILE = "ledger.json"
SAVE_EVERY_S = 2.0
UNITS = ("usd", "gpu_hours")


@dataclass(frozen=True)
class TrialPrice:
    """What one trial costs per hour of wall time, and how that was worked out."""

    usd_per_hour: float
    gpus: float  # GPU-hours per hour
    instance_type: str
    market: str
    instance_usd_per_hour: float
    share: float  # of one instance

    def rate(self, unit: str) -> float:
        return self.usd_per_hour if unit == "usd" else self.gpus


def price_trial(resources: dict[str, float], instance, market: str, cluster_cpus: float) -> TrialPrice:
    """Price a trial reserving ``resources`` on ``instance`` (a mmray.cost.prices.InstancePrice)."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if gpus and instance.gpus:
        share = gpus / instance.gpus
    else:
        share = cpus / (instance.vcpus or max(cluster_cpus, 1.0))
    hourly = instance.usd_per_hour(market)
    return TrialPrice(usd_per_hour=hourly * share, gpus=gpus, instance_type=instance.name, market=market,
                      instance_usd_per_hour=hourly, share=share)


@dataclass(frozen=True)
class Limits:
    """The caps (0: none) and the projection settings of sweep.budget."""

    usd: float = 0.0
    gpu_hours: float = 0.0
    safety: float = 1.25
    stop_reserve_s: float = 30.0
    step_s: float = 0.0  # first estimate; 0: unknown (pilot)
    startup_s: float = 60.0

    def cap(self, unit: str) -> float:
        return self.usd if unit == "usd" else self.gpu_hours


def projected_seconds(max_steps: int, step_s: float, startup_s: float, limits: Limits) -> float:
    """Wall seconds a trial of ``max_steps`` is projected to take, a stop included."""
    return (startup_s + max_steps * step_s) * limits.safety + limits.stop_reserve_s


def estimate(progress: list[list[float]]) -> tuple[float, float] | None:
    """(startup_s, step_s) from one trial's (wall_s, step) reports since its start; None without a report.

    Two reports give the step time between them and the start-up before the first. One report gives an upper bound
    (its wall time over its step, no start-up), which projects at least as long as the truth for any longer run.
    """
    points = [(w, s) for w, s in progress if s > 0]
    if not points:
        return None
    (w0, s0), (w1, s1) = points[0], points[-1]
    if s1 > s0:
        step_s = (w1 - w0) / (s1 - s0)
        return max(0.0, w0 - s0 * step_s), max(step_s, 0.0)
    return 0.0, w1 / s1


class CostSource(Protocol):
    """Dollars a sweep has spent. The wall-clock estimate below is the default; the cost meter
    (mmray.cost.meter, which prices the cluster's nodes from their labels) can take its place."""

    def spent_usd(self, ledger: "Ledger", now: float) -> float: ...


class WallClockCost:
    """Every trial's wall time x its hourly price (see the module docstring)."""

    def spent_usd(self, ledger: "Ledger", now: float) -> float:
        return sum(ledger.trial_spent(tid, now, "usd") for tid in ledger.trials)


class MeteredCost:
    """The cost meter's dollars for the whole cluster since the sweep began, never less than :class:`WallClockCost`.

    The meter is the Ray actor that mmray.sweep.runner starts on the sweep directory (it keeps SWEEP_DIR/cost.json,
    so a resumed sweep continues its total). It is looked up by name on each (cached, at most every
    ``refresh_s``) query rather than held, since the ledger travels in Tune's saved search state. Without a meter
    (none started, or it does not answer) the wall-clock figure stands.
    """

    def __init__(self, run_dir: str, refresh_s: float = 1.0):
        self.run_dir, self.refresh_s = run_dir, refresh_s
        self._at, self._status = -1e18, None

    def __getstate__(self):
        return {"run_dir": self.run_dir, "refresh_s": self.refresh_s}

    def __setstate__(self, state):
        self.__init__(state["run_dir"], state["refresh_s"])

    def status(self, now: float) -> dict | None:
        if now - self._at >= self.refresh_s:
            import ray

            from mmray.cost import meter as meter_lib

            self._at = now
            try:
                handle = meter_lib.get_meter(self.run_dir) if ray.is_initialized() else None
                self._status = ray.get(handle.status.remote(), timeout=30) if handle is not None else None
            except Exception:  # noqa: BLE001 - a meter that does not answer: keep the last figures
                pass
        return self._status

    def spent_usd(self, ledger: "Ledger", now: float) -> float:
        status = self.status(now)
        wall = WallClockCost().spent_usd(ledger, now)
        return max(wall, status["spent_usd"]) if status else wall

    def burn_usd_per_hour(self, now: float) -> float:
        status = self.status(now)
        return status["burn_usd_per_hour"] if status else 0.0


@dataclass
class Ledger:
    """Trials' wall-time intervals and progress, the spend derived from them, and the budget decisions."""

    path: str  # SWEEP_DIR/ledger.json ("" keeps it in memory, for tests)
    price: TrialPrice
    limits: Limits
    max_steps: int
    cost_source: CostSource = field(default_factory=WallClockCost)
    trials: dict[str, dict] = field(default_factory=dict)
    exhausted: str = ""  # why the budget ended the sweep ("" while it has not)
    exhausted_at: float = 0.0
    search_done: bool = False  # the search has no trial left to start (False after an interrupted sweep)
    saved_at: float = 0.0

    # ----------------------------------------------------------------------------------------------- accounting
    def _trial(self, trial_id: str) -> dict:
        return self.trials.setdefault(trial_id, {"intervals": [], "progress": [], "starts": 0, "done": False,
                                                 "admitted_at": None, "measure": None, "stopped_for_budget": False})

    def trial_seconds(self, trial_id: str, now: float) -> float:
        return sum((end if end is not None else now) - start for start, end in self.trials[trial_id]["intervals"])

    def trial_spent(self, trial_id: str, now: float, unit: str) -> float:
        return self.trial_seconds(trial_id, now) * self.price.rate(unit) / 3600.0

    def spent(self, now: float) -> dict[str, float]:
        return {"usd": self.cost_source.spent_usd(self, now),
                "gpu_hours": sum(self.trial_spent(t, now, "gpu_hours") for t in self.trials)}

    def running(self) -> list[str]:
        """Trials whose actor is up (an open interval)."""
        return [t for t, r in self.trials.items() if r["intervals"] and r["intervals"][-1][1] is None]

    def active(self) -> list[str]:
        """Admitted and not finished: they may spend more."""
        return [t for t, r in self.trials.items() if not r["done"]]

    # ------------------------------------------------------------------------------------------------ estimates
    def step_estimate(self) -> tuple[float, float] | None:
        """(startup_s, step_s): the slowest measured by any trial, else the config's first estimate, else None."""
        measured = [r["measure"] for r in self.trials.values() if r["measure"]]
        if measured:
            return max(m[0] for m in measured), max(m[1] for m in measured)
        if self.limits.step_s > 0:
            return self.limits.startup_s, self.limits.step_s
        return None

    def projected_new_s(self) -> float | None:
        est = self.step_estimate()
        return None if est is None else projected_seconds(self.max_steps, est[1], est[0], self.limits)

    def remaining_s(self, trial_id: str, now: float) -> float:
        """What an admitted, unfinished trial is projected to run still (a stop at least)."""
        r = self.trials[trial_id]
        est = self.step_estimate()
        stop = self.limits.stop_reserve_s
        if est is None:
            return stop
        last = r["progress"][-1] if r["progress"] else None
        if last:
            return (self.max_steps - last[1]) * est[1] * self.limits.safety + stop
        elapsed = now - r["intervals"][-1][0] if r["intervals"] and r["intervals"][-1][1] is None else 0.0
        return max(projected_seconds(self.max_steps, est[1], est[0], self.limits) - elapsed, stop)

    def rate(self, unit: str, now: float, trials: int) -> float:
        """Per second of a trial's wall time, with ``trials`` running: its price, or for dollars its share of the
        cluster's metered burn when that is higher."""
        rate = self.price.rate(unit)
        burn = getattr(self.cost_source, "burn_usd_per_hour", None)
        if unit == "usd" and burn is not None:
            rate = max(rate, burn(now) / max(1, trials))
        return rate / 3600.0

    # ------------------------------------------------------------------------------------------------ decisions
    def can_admit(self, now: float) -> tuple[bool, str]:
        """May one more trial start now? (see the module docstring); the reason names the figures."""
        if self.exhausted:
            return False, self.exhausted
        new_s = self.projected_new_s()
        active = self.active()
        if new_s is None:
            if active:
                return False, "no step time measured yet: the pilot trial runs alone until it has reported"
            new_s = (self.limits.startup_s * self.limits.safety + self.limits.stop_reserve_s)
        spent = self.spent(now)
        for unit in UNITS:
            cap = self.limits.cap(unit)
            if not cap:
                continue
            rate = self.rate(unit, now, len(self.running()) + 1)
            committed = sum(self.remaining_s(t, now) for t in active) * rate
            projected = new_s * rate
            if spent[unit] + committed + projected > cap:
                return False, (f"budget: {_fmt(spent[unit], unit)} spent + {_fmt(committed, unit)} committed to "
                               f"{len(active)} running trial(s) + {_fmt(projected, unit)} projected for a new trial "
                               f"({new_s:.0f} s) > the {_fmt(cap, unit)} cap")
        return True, f"projected {new_s:.0f} s for a new trial"

    def must_stop(self, now: float) -> tuple[bool, str]:
        """Has the spend come so close to a cap that only stopping every running trial still fits under it?"""
        if self.exhausted:
            return True, self.exhausted
        spent = self.spent(now)
        reserve_s = len(self.running()) * self.limits.stop_reserve_s * self.limits.safety
        for unit in UNITS:
            cap = self.limits.cap(unit)
            if cap and spent[unit] + reserve_s * self.rate(unit, now, len(self.running())) >= cap:
                return True, (f"budget: {_fmt(spent[unit], unit)} spent and stopping {len(self.running())} running "
                              f"trial(s) takes up to {reserve_s:.0f} s: the {_fmt(cap, unit)} cap is reached")
        return False, ""

    # --------------------------------------------------------------------------------------------------- events
    def admit(self, trial_id: str, now: float, params: dict | None = None) -> None:
        r = self._trial(trial_id)
        r["admitted_at"] = now
        r["params"] = {k: v for k, v in (params or {}).items() if isinstance(v, (int, float, str, bool))}
        self.save(now, force=True)

    def started(self, trial_id: str, now: float) -> None:
        r = self._trial(trial_id)
        if r["intervals"] and r["intervals"][-1][1] is None:
            r["intervals"][-1][1] = now  # a restart without an end event: close the previous interval
        r["intervals"].append([now, None])
        r["starts"] += 1
        r["progress"] = []
        r["done"] = False
        self.save(now, force=True)

    def progress(self, trial_id: str, wall_s: float, step: float, now: float) -> None:
        """A report of the trial: ``wall_s`` since this start of the trial, at optimizer step ``step``."""
        r = self._trial(trial_id)
        point = [float(wall_s), float(step)]
        r["progress"] = [r["progress"][0], point] if r["progress"] else [point]  # the first and the latest
        if r["starts"] == 1:  # a resumed start begins mid-run: its start-up would be mis-measured
            r["measure"] = estimate(r["progress"])
        self.save(now)

    def paused(self, trial_id: str, now: float) -> None:
        r = self._trial(trial_id)
        if r["intervals"] and r["intervals"][-1][1] is None:
            r["intervals"][-1][1] = now
            self.save(now, force=True)

    def ended(self, trial_id: str, now: float) -> None:
        self.paused(trial_id, now)
        r = self._trial(trial_id)
        r["done"] = True
        if self.exhausted:
            r["stopped_for_budget"] = True
        self.save(now, force=True)

    def exhaust(self, reason: str, now: float) -> None:
        if not self.exhausted:
            self.exhausted, self.exhausted_at = reason, now
            self.save(now, force=True)

    # ------------------------------------------------------------------------------------------------ persisting
    def to_dict(self, now: float) -> dict:
        return {"version": 1, "saved_at": now, "price": asdict(self.price), "limits": asdict(self.limits),
                "max_steps": self.max_steps, "exhausted": self.exhausted, "exhausted_at": self.exhausted_at,
                "search_done": self.search_done,
                "spent": self.spent(now), "trials": self.trials}

    def save(self, now: float, force: bool = False) -> None:
        if not self.path or (not force and now - self.saved_at < SAVE_EVERY_S):
            return
        from mmray import storage

        self.saved_at = now
        storage.write_text(self.path, json.dumps(self.to_dict(now), indent=1))

    def restore(self) -> bool:
        """Continue a saved ledger (a resumed sweep). Trials left running are charged up to the last save."""
        from mmray import storage

        if not self.path or not storage.exists(self.path):
            return False
        state = json.loads(storage.read_text(self.path))
        saved_at = float(state["saved_at"])
        self.trials = state["trials"]
        for r in self.trials.values():
            if r["intervals"] and r["intervals"][-1][1] is None:
                r["intervals"][-1][1] = saved_at
        self.exhausted, self.exhausted_at = state.get("exhausted", ""), state.get("exhausted_at", 0.0)
        self.search_done = bool(state.get("search_done", False))
        self.saved_at = saved_at
        return True


def _fmt(value: float, unit: str) -> str:
    return f"${value:.4f}" if unit == "usd" else f"{value:.4f} GPU-h"
